"""abs_histogram: the 65536-bin histogram of magnitude keys, the building block of the streaming exact top-k
threshold (fastmerge.ops.threshold)."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check, check_buffer, check_float
from ._lib import contig, register
from .keys import HIST_BINS, abs_keys

SCHEMA = "abs_histogram(Tensor x, Tensor(a!) hist, int level, int prefix) -> ()"


def _check(x, hist, level, prefix) -> None:
    check_float("x", x)
    check_buffer("hist", hist, torch.int64, (1 << 16,), x.device)
    check(level in (0, 1), lambda: f"level must be 0 or 1, got {level}")
    check(0 <= prefix < (1 << 15), lambda: f"prefix must be in [0, 32768), got {prefix}")


def _run(x, hist, level, prefix) -> None:
    select("abs_histogram", x.device, (x.dtype,))(contig(x), hist, level, prefix)


register(SCHEMA, _check, _run)


def abs_histogram(x: torch.Tensor, hist: torch.Tensor | None = None, *, level: int = 0, prefix: int = 0):
    """Accumulate the magnitude-key histogram of ``x`` into ``hist`` (int64 (65536,), created if None)."""
    if hist is None:
        hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=x.device)
    torch.ops.fastmerge.abs_histogram(x, hist, level, prefix)
    return hist


def abs_histogram_ref(x: torch.Tensor, level: int, prefix: int = 0) -> torch.Tensor:
    """Histogram of magnitude keys (fastmerge.ops.keys), the building block of the streaming exact top-k threshold.

    x: any shape and strides, floating. Returns int64 (65536,).
    level 0: counts of ``key >> 16`` over all elements.
    level 1: counts of ``key & 0xFFFF`` over the elements whose ``key >> 16 == prefix``.
    Adding the histograms of several tensors (chunks, shards, a whole model) gives the histogram of their
    union, so the k-th largest magnitude of a set is found with one or two passes and no sort.
    """
    k = abs_keys(x).reshape(-1)
    if level == 0:
        return torch.bincount(k >> 16, minlength=HIST_BINS)
    if level == 1:
        return torch.bincount(k[(k >> 16) == prefix] & 0xFFFF, minlength=HIST_BINS)
    raise ValueError(f"level must be 0 or 1, got {level}")


@REFERENCE.kernel("abs_histogram")
def _reference(x, hist, level, prefix):
    hist += abs_histogram_ref(x, level, prefix).to(hist.device)
