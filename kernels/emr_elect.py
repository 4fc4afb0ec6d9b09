"""emr_elect: EMR-Merging's elect / mask / rescale statistics for one tensor, in one pass (the task vectors
of a tile stay in registers between the election and the masking)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTS, device_args, load_expert, nan_max, on_device, tile_size, tl_dtype


@triton.jit
def _emr_elect_kernel(
    base_ptr,
    table_ptr,
    tau_ptr,
    masks_ptr,
    stats_ptr,
    n,
    T: tl.constexpr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_BASE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """d_t = expert_t - base; flag = +1 where sum_t d_t > 0 (fp32, task order) else -1;
    agree_t = d_t * flag > 0; tau_uni = flag * max_t |d_t| agree_t (NaN propagates);
    masks[t] = agree_t;  stats[t] += [sum |d_t|, sum |tau_uni| agree_t] (fp64)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ds = ()
    acc = tl.zeros([BLOCK], tl.float32)
    for t in tl.static_range(T):
        d = load_expert(table_ptr, t, offs, m, DTYPE, ALIGNED)
        if HAS_BASE:
            d = d - b
        ds = ds + (d,)
        acc = acc + d
        tl.atomic_add(stats_ptr + 2 * t, tl.sum(tl.abs(d), axis=0).to(tl.float64), sem="relaxed")
    pos = acc > 0
    mx = tl.zeros([BLOCK], tl.float32)
    for t in tl.static_range(T):
        d = ds[t]
        agree = tl.where(pos, d > 0, d < 0)
        mx = nan_max(mx, tl.abs(d) * agree.to(tl.float32))
    uni = tl.where(pos, 1.0, -1.0) * mx
    tl.store(tau_ptr + offs, uni.to(tau_ptr.dtype.element_ty), mask=m)
    ua = tl.abs(uni)
    mask_offs = offs
    for t in tl.static_range(T):
        d = ds[t]
        agree = tl.where(pos, d > 0, d < 0)
        tl.store(masks_ptr + mask_offs, agree.to(tl.uint8), mask=m)
        mask_offs = mask_offs + n
        part = tl.sum(tl.where(m, ua * agree.to(tl.float32), 0.0), axis=0)
        tl.atomic_add(stats_ptr + 2 * t + 1, part.to(tl.float64), sem="relaxed")


def emr_elect(base, experts, tau_uni, masks, stats) -> None:
    """Fill tau_uni and masks (bool, (T, *shape)); stats (fp64, (T, 2)) += per-task sums (see
    fastmerge.ops.emr_elect.emr_elect_ref)."""
    T = len(experts)
    n = experts[0].numel() if T else 0
    if n == 0:
        return
    table, _, aligned = device_args(experts)
    block = tile_size(T, 1024)
    with on_device(experts[0].device):
        _emr_elect_kernel[(triton.cdiv(n, block),)](
            base if base is not None else experts[0],
            table,
            tau_uni,
            masks.view(torch.uint8),
            stats,
            n,
            T=T,
            DTYPE=tl_dtype(experts[0].dtype),
            ALIGNED=aligned,
            HAS_BASE=base is not None,
            BLOCK=block,
            num_warps=4,
            **LAUNCH_OPTS,
        )
