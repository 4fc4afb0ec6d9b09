"""TALL masks and consensus merging (Wang et al., "Localizing Task Information for Improved Model Merging
and Compression"). Without an explicit multi-task vector the task vectors of a tile are kept in registers
(a tuple of T tiles) between the pass that sums them and the pass that compares against the sum."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTS, device_args, load_expert, on_device, tile_size, tl_dtype


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


def _launch(kernel, base, experts, lambdas, mtl, dest, *scalars) -> None:
    """Shared launch of the two TALL kernels: (base, ptr table, lambdas, mtl, dest, n, *scalars)."""
    T = len(experts)
    n = experts[0].numel() if T else 0
    if n == 0:
        return
    table, lams, aligned = device_args(experts, lambdas)
    block = tile_size(T, 2048)
    with on_device(experts[0].device):
        kernel[(triton.cdiv(n, block),)](
            base if base is not None else experts[0],
            table,
            lams,
            mtl if mtl is not None else experts[0],
            dest,
            n,
            *scalars,
            T=T,
            DTYPE=tl_dtype(experts[0].dtype),
            ALIGNED=aligned,
            HAS_BASE=base is not None,
            HAS_MTL=mtl is not None,
            BLOCK=block,
            num_warps=4,
            **LAUNCH_OPTS,
        )


def tall_masks(base, experts, lambdas, mtl, masks) -> None:
    """masks (bool, (T, *shape)) = TALL masks of the experts (see reference.tall_masks)."""
    _launch(_tall_masks_kernel, base, experts, lambdas, mtl, masks.view(torch.uint8))


def consensus_merge(base, experts, lambdas, mtl, min_count, lam, out) -> None:
    """out = base + lam * [#TALL masks >= min_count] * mtl (see reference.consensus_merge)."""
    _launch(_consensus_merge_kernel, base, experts, lambdas, mtl, out, int(min_count), float(lam))
