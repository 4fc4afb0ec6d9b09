"""tall_masks: TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging and
Compression"). Without an explicit multi-task vector the task vectors of a tile are kept in registers (a tuple
of T tiles) between the pass that sums them and the pass that compares against the sum."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch_tall, load_expert


@triton.jit
def _tall_masks_kernel(
    base_ptr,
    table_ptr,
    lams_ptr,
    mtl_ptr,
    masks_ptr,
    n,
    T: tl.constexpr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_BASE: tl.constexpr,
    HAS_MTL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """d_t = expert_t - base, M = mtl if given else sum_t d_t (fp32, in task order);
    masks[t] = |d_t| > lambda_t * |M - d_t|."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=m, other=0.0).to(tl.float32)
    mask_offs = offs
    if HAS_MTL:
        mt = tl.load(mtl_ptr + offs, mask=m, other=0.0).to(tl.float32)
        for t in tl.static_range(T):
            d = load_expert(table_ptr, t, offs, m, DTYPE, ALIGNED)
            if HAS_BASE:
                d = d - b
            keep = tl.abs(d) > tl.load(lams_ptr + t) * tl.abs(mt - d)
            tl.store(masks_ptr + mask_offs, keep.to(tl.uint8), mask=m)
            mask_offs = mask_offs + n
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
            keep = tl.abs(d) > tl.load(lams_ptr + t) * tl.abs(mt - d)
            tl.store(masks_ptr + mask_offs, keep.to(tl.uint8), mask=m)
            mask_offs = mask_offs + n


def tall_masks(base, experts, lambdas, mtl, masks) -> None:
    """masks (bool, (T, *shape)) = TALL masks of the experts (see fastmerge.ops.tall_masks.tall_masks_ref)."""
    launch_tall(_tall_masks_kernel, base, experts, lambdas, mtl, masks.view(torch.uint8))
