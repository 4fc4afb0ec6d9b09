"""prune: magnitude band + DARE drop + rescale in one pass (magnitude prune, Breadcrumbs, DARE), plus the
fp64 L1 statistics [sum |x|, sum |kept|]."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import LAUNCH_OPTS, on_device, philox_u01, split_offset, u32_halves


@triton.jit(do_not_specialize=["off_al", "s_lo", "s_hi", "k_lo", "k_hi"])
def _prune_kernel(
    x_ptr,
    lo_ptr,
    hi_ptr,
    out_ptr,
    stats_ptr,
    n,
    cols,
    p,
    scale,
    off_al,
    s_lo,
    s_hi,
    k_lo,
    k_hi,
    PER_ROW: tl.constexpr,
    WIDE: tl.constexpr,
    DROP: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """x viewed as (R, cols), row = i // cols, a = |x|:
    keep = (lo[row] <= a < hi[row]) & (u >= p if DROP), u = philox_uniform(seed, key) at index i + offset;
    out = (x * keep) * scale;  stats += [sum a, sum |x * keep|] (fp64)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    if DROP:
        # [BLOCK / 4, 4] tile: one row per Philox group, so each block of 4 words is computed once
        G: tl.constexpr = BLOCK // 4
        col = tl.arange(0, 4)[None, :]
        loc = tl.arange(0, G)[:, None] * 4 + col
    else:
        loc = tl.arange(0, BLOCK)
    offs = start + loc
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = tl.abs(x)
    if PER_ROW:
        row0 = start // cols
        rem = start - row0 * cols  # position of the tile start inside row row0
        if WIDE:  # cols >= BLOCK: a tile spans rows row0 and (maybe) row0 + 1, four scalar loads
            has_next = (row0 + 1) * cols < n
            second = (rem + loc) >= cols
            lo = tl.where(second, tl.load(lo_ptr + row0 + 1, mask=has_next, other=0.0), tl.load(lo_ptr + row0))
            hi = tl.where(second, tl.load(hi_ptr + row0 + 1, mask=has_next, other=0.0), tl.load(hi_ptr + row0))
        else:  # cols < BLOCK: rem + loc < 2 * BLOCK, so int32 division is enough; lo/hi gathered (cached)
            row = row0 + ((rem.to(tl.int32) + loc) // cols).to(tl.int64)
            lo = tl.load(lo_ptr + row, mask=m, other=0.0)
            hi = tl.load(hi_ptr + row, mask=m, other=0.0)
    else:
        lo = tl.load(lo_ptr)
        hi = tl.load(hi_ptr)
    keep = (a >= lo) & (a < hi)
    if DROP:
        g_row = ((start + off_al.to(tl.int64)) >> 2) + tl.arange(0, G)[:, None].to(tl.int64)
        u = philox_u01(
            g_row,
            col,
            s_lo.to(tl.uint32, bitcast=True),
            s_hi.to(tl.uint32, bitcast=True),
            k_lo.to(tl.uint32, bitcast=True),
            k_hi.to(tl.uint32, bitcast=True),
            PHASE,
        )
        keep = keep & (u >= p)
    kept = x * keep.to(tl.float32)
    tl.store(out_ptr + offs, (kept * scale).to(out_ptr.dtype.element_ty), mask=m)
    # per-program fp32 partials, accumulated in fp64 by one atomic each
    s_abs = tl.sum(a).to(tl.float64)
    s_kept = tl.sum(tl.abs(kept)).to(tl.float64)
    tl.atomic_add(stats_ptr, s_abs, sem="relaxed")
    tl.atomic_add(stats_ptr + 1, s_kept, sem="relaxed")


def prune(x, lo, hi, out, stats, p, seed, key, offset, scale) -> None:
    """out = x * keep * scale, stats (fp64, 2) += [sum |x|, sum |x * keep|] (see fastmerge.ops.prune.prune_ref)."""
    n = x.numel()
    if n == 0:
        return
    rows = lo.numel()
    cols = n // rows
    p = float(p)
    drop = p > 0  # as the reference: NaN or p <= 0 never drops
    off_al, phase = split_offset(offset)
    s_lo, s_hi = u32_halves(seed)
    k_lo, k_hi = u32_halves(key)
    block = 2048
    grid = (triton.cdiv(n, block),)
    with on_device(x.device):
        _prune_kernel[grid](
            x,
            lo,
            hi,
            out,
            stats,
            n,
            cols,
            p,
            float(scale),
            off_al,
            s_lo,
            s_hi,
            k_lo,
            k_hi,
            PER_ROW=rows > 1,
            WIDE=cols >= block,
            DROP=drop,
            PHASE=phase if drop else 0,
            BLOCK=block,
            num_warps=4,
            **LAUNCH_OPTS,
        )
