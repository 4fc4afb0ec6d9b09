"""abs_histogram: 65536-bin histogram of magnitude keys (level 0: key >> 16; level 1: key & 0xFFFF of the
elements whose key >> 16 == prefix). Accumulates into an int64 histogram."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import LAUNCH_OPTS, abs_key, on_device


@triton.jit
def _abs_histogram_kernel(x_ptr, hist_ptr, n, prefix, LEVEL: tl.constexpr, BLOCK: tl.constexpr):
    """key = bits(fp32(|x|)) & 0x7FFFFFFF;
    LEVEL 0: hist[key >> 16] += 1;  LEVEL 1: hist[key & 0xFFFF] += 1 where key >> 16 == prefix."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = abs_key(tl.load(x_ptr + offs, mask=m, other=0.0))
    if LEVEL == 0:
        bins = key >> 16
        valid = m
    else:
        bins = key & 0xFFFF
        valid = m & ((key >> 16) == prefix)
    ones = tl.full([BLOCK], 1, tl.int64)
    tl.atomic_add(hist_ptr + bins, ones, mask=valid, sem="relaxed")


def abs_histogram(x, hist, level, prefix) -> None:
    """hist (int64, 65536) += histogram of the magnitude keys of x (see
    fastmerge.ops.abs_histogram.abs_histogram_ref)."""
    level = int(level)
    if level not in (0, 1):
        raise ValueError(f"level must be 0 or 1, got {level}")
    n = x.numel()
    if n == 0:
        return
    block = 2048
    grid = (triton.cdiv(n, block),)
    with on_device(x.device):
        _abs_histogram_kernel[grid](x, hist, n, int(prefix), LEVEL=level, BLOCK=block, num_warps=8, **LAUNCH_OPTS)
