"""consensus_merge: consensus merging (TALL paper), base + lam * [#TALL masks >= min_count] * mtl, fused: no mask
is stored. The task vectors of a tile stay in registers between the sum and the masks, as in tall_masks."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import launch_tall, load_expert


@triton.jit
def _consensus_merge_kernel(
    base_ptr,
    table_ptr,
    lams_ptr,
    mtl_ptr,
    out_ptr,
    n,
    min_count,
    lam,
    T: tl.constexpr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_BASE: tl.constexpr,
    HAS_MTL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """M and the TALL masks m_t as in _tall_masks_kernel;
    out = base + lam * (M * [sum_t m_t >= min_count])."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=m, other=0.0).to(tl.float32)
    cnt = tl.zeros([BLOCK], tl.int32)
    if HAS_MTL:
        mt = tl.load(mtl_ptr + offs, mask=m, other=0.0).to(tl.float32)
        for t in tl.static_range(T):
            d = load_expert(table_ptr, t, offs, m, DTYPE, ALIGNED)
            if HAS_BASE:
                d = d - b
            cnt += (tl.abs(d) > tl.load(lams_ptr + t) * tl.abs(mt - d)).to(tl.int32)
    else:
        ds = ()
        mt = tl.zeros([BLOCK], tl.float32)
        for t in tl.static_range(T):
            d = load_expert(table_ptr, t, offs, m, DTYPE, ALIGNED)
            if HAS_BASE:
                d = d - b
            ds = ds + (d,)
            mt = mt + d
        for t in tl.static_range(T):
            d = ds[t]
            cnt += (tl.abs(d) > tl.load(lams_ptr + t) * tl.abs(mt - d)).to(tl.int32)
    res = lam * (mt * (cnt >= min_count).to(tl.float32))
    if HAS_BASE:
        res = b + res
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=m)


def consensus_merge(base, experts, lambdas, mtl, min_count, lam, out) -> None:
    """out = base + lam * [#TALL masks >= min_count] * mtl (see fastmerge.ops.consensus_merge.consensus_merge_ref)."""
    launch_tall(_consensus_merge_kernel, base, experts, lambdas, mtl, out, int(min_count), float(lam))
