"""Magnitude keys, what every selection by magnitude ranks: ``key(x) = bits(fp32(|x|))`` as an unsigned 32-bit
integer. For non-negative floats the integer order is the numeric order, so selections work on keys; NaN keys sort
above +inf."""

from __future__ import annotations

import torch

HIST_BINS = 1 << 16  # bins of abs_histogram: one per 16-bit half of a key


def abs_keys(x: torch.Tensor) -> torch.Tensor:
    """x: any shape, floating -> int64 tensor of the same shape holding bits(fp32(|x|)) in [0, 2^31)."""
    return x.detach().float().contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
