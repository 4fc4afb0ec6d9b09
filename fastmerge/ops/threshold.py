"""The exact k-th largest magnitude over a stream of tensors, from the ops abs_histogram (two passes, any size) and
row_kth_largest_abs (few elements)."""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from .abs_histogram import abs_histogram
from .keys import HIST_BINS
from .row_kth_largest_abs import row_kth_largest_abs

_NAN_BIN = 0x7F81  # level-0 bins above +inf's bin (0x7F80) hold NaN keys only
_SMALL = 1 << 14  # below this many elements one radix select beats a 65536-bin histogram and its scan

_cache = threading.local()  # per-thread scratch (the one-shot threshold histograms)


class MagnitudeThreshold:
    """Exact k-th largest |x| over a stream of tensors (chunks, tensors, shards, a whole model).

    Pass 1 feeds every tensor to :meth:`add`; :meth:`select` then finds the 16-bit bucket that holds the
    k-th largest key. If every tensor fed was bf16 (whose fp32 keys have zero low halves) or the bucket
    holds a single distinct key, the threshold is known; otherwise ``select`` returns True and the same
    tensors are fed again (pass 2 only counts elements of that one bucket). Counts are int64: correct far
    beyond 2^31 elements. No sort, no index arrays.

        sel = MagnitudeThreshold()
        for t in tensors: sel.add(t)
        if sel.select(k):
            for t in tensors: sel.add(t)
        thr = sel.threshold()     # keep |x| >= thr (ties kept)
    """

    def __init__(self, device: torch.device | str = "cpu", hist: torch.Tensor | None = None):
        self.device = torch.device(device)
        if hist is None:
            hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=self.device)
        self.hist = hist  # a caller's buffer must be zeroed int64 (65536,) on device
        self.n = 0
        self.all_bf16 = True
        self._k = None
        self._bucket = None
        self._rank = None
        self._low = None
        self._result = None
        self._nan = 0

    def add(self, x: torch.Tensor, name: str | None = None) -> None:
        """Feed one tensor (any float dtype, any device: moved to this selector's device)."""
        x = x.detach().to(self.device)
        if self._bucket is None:
            self.all_bf16 &= x.dtype == torch.bfloat16
            abs_histogram(x, self.hist)
            nan = int(self.hist[_NAN_BIN:].cpu().numpy().sum())
            if nan != self._nan:
                raise ValueError(f"NaN in {name or 'tensor'} (shape {tuple(x.shape)}): cannot rank magnitudes")
            self.n += x.numel()
        elif self._low is not None:
            abs_histogram(x, self._low, level=1, prefix=self._bucket)
        else:
            raise RuntimeError("MagnitudeThreshold: threshold already known, no second pass needed")

    def select(self, k: int) -> bool:
        """Fix k (1-based k-th largest); True when a second pass over the same tensors is needed."""
        if not 0 <= k <= self.n:
            raise ValueError(f"k must be in [0, {self.n}] (elements seen), got {k}")
        self._k = k
        if k == 0:
            self._result = math.inf
            return False
        b, above_b = _bucket_of(self.hist, k)
        self._bucket = b
        self._rank = k - above_b
        if self.all_bf16:
            self._result = _key_to_float(b << 16)
            return False
        self._low = torch.zeros(HIST_BINS, dtype=torch.int64, device=self.device)
        return True

    def threshold(self) -> float:
        """The k-th largest magnitude, as a Python float (exactly representable in fp32)."""
        if self._result is None:
            if self._low is None:
                raise RuntimeError("MagnitudeThreshold: call select(k) (and the second pass it asks for) first")
            total = int(self._low.sum())
            if total != int(self.hist[self._bucket]):
                raise RuntimeError(
                    f"MagnitudeThreshold: pass 2 saw {total} elements in the boundary bucket, pass 1 saw "
                    f"{int(self.hist[self._bucket])}: feed exactly the same tensors in both passes"
                )
            lo, _ = _bucket_of(self._low, self._rank)
            self._result = _key_to_float((self._bucket << 16) | lo)
        return self._result


def _bucket_of(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The highest bin b whose count of keys in bins >= b reaches k (1-based), and the count strictly above b."""
    h = hist.cpu().numpy()[::-1]
    above = np.cumsum(h)                       # above[i] = #keys in the top i+1 bins
    i = int(np.searchsorted(above, k))         # first i with above[i] >= k
    return len(h) - 1 - i, int(above[i - 1]) if i else 0


def _key_to_float(key: int) -> float:
    return torch.tensor([key], dtype=torch.int32).view(torch.float32).item()


def _zeroed_hist(device: torch.device) -> torch.Tensor:
    """This thread's reusable histogram for one-shot thresholds, zeroed (zero_ is ~10x cheaper than zeros)."""
    cache = _cache.__dict__.setdefault("hists", {})
    h = cache.get(device)
    if h is None:
        h = cache[device] = torch.zeros(HIST_BINS, dtype=torch.int64, device=device)
    else:
        h.zero_()
    return h


def magnitude_threshold(tensors: torch.Tensor | list[torch.Tensor], k: int) -> float:
    """Exact k-th largest |x| over one tensor or a set of tensors (1-based k; k = 0 gives +inf)."""
    ts = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if not ts:
        raise ValueError("tensors must hold at least one tensor, got an empty list")
    n = sum(t.numel() for t in ts)
    if n <= _SMALL:
        return _small_threshold(ts, n, k)
    sel = MagnitudeThreshold(ts[0].device, _zeroed_hist(ts[0].device))
    for t in ts:
        sel.add(t)
    if sel.select(k):
        for t in ts:
            sel.add(t)
    return sel.threshold()


def _small_threshold(ts: list[torch.Tensor], n: int, k: int) -> float:
    """magnitude_threshold for few elements: the fp32 magnitudes as one row, ranked by the radix-select op."""
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] (elements seen), got {k}")
    for t in ts:
        if bool(torch.isnan(t).any()):
            raise ValueError(f"NaN in tensor (shape {tuple(t.shape)}): cannot rank magnitudes")
    row = torch.cat([t.detach().to(ts[0].device).float().reshape(-1) for t in ts]).reshape(1, n)
    return float(row_kth_largest_abs(row, k)[0])
