"""Allocating Python API over the fastmerge ops, and the exact streaming magnitude threshold.

Every function here checks its arguments, allocates outputs and calls ``torch.ops.fastmerge.*``, which
dispatches to the best backend for the inputs' device and dtype (FASTMERGE_BACKEND forces one).
fp16/bf16 inputs are accumulated in fp32 by every backend.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import torch

from . import (
    _ops,  # noqa: F401 - registers torch.ops.fastmerge.*
    context,
)
from .reference import ELECT, HIST_BINS, MERGE

_I64 = 1 << 64
_NAN_BIN = 0x7F81  # level-0 bins above +inf's bin (0x7F80) hold NaN keys only


_cache = threading.local()  # per-thread scratch (the one-shot threshold histograms)


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or a buffer from the op context's allocator (host memory only): the engine reuses buffers
    across tensors, since first-touch page faults cost as much as the maths."""
    fn = context.current().allocator
    if fn is not None and torch.device(device).type == "cpu":
        return fn(tuple(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def allocating(fn: Callable[[tuple, torch.dtype], torch.Tensor] | None):
    """Within the block, outputs and scratch buffers of the ops come from ``fn(shape, dtype)`` (None: torch)."""
    return context.use(allocator=fn)


def to_i64(v: int) -> int:
    """A uint64 (or any Python int) as the signed int64 that torch.library schemas carry."""
    v %= _I64
    return v - _I64 if v >= 1 << 63 else v


def name_key(name: str) -> int:
    """64-bit FNV-1a hash of a tensor name: the ``key`` of its random stream (as a signed int64)."""
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) % _I64
    return to_i64(h)


# ---------------------------------------------------------------------------------------------------------
# thresholds


def abs_histogram(x: torch.Tensor, hist: torch.Tensor | None = None, *, level: int = 0, prefix: int = 0):
    """Accumulate the magnitude-key histogram of ``x`` into ``hist`` (int64 (65536,), created if None)."""
    if hist is None:
        hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=x.device)
    torch.ops.fastmerge.abs_histogram(x, hist, level, prefix)
    return hist


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


_SMALL = 1 << 14  # below this many elements one radix select beats a 65536-bin histogram and its scan


def _small_threshold(ts: list[torch.Tensor], n: int, k: int) -> float:
    """magnitude_threshold for few elements: the fp32 magnitudes as one row, ranked by the radix-select op."""
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] (elements seen), got {k}")
    for t in ts:
        if bool(torch.isnan(t).any()):
            raise ValueError(f"NaN in tensor (shape {tuple(t.shape)}): cannot rank magnitudes")
    row = torch.cat([t.detach().to(ts[0].device).float().reshape(-1) for t in ts]).reshape(1, n)
    return float(row_kth_largest_abs(row, k)[0])


def row_kth_largest_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest |x| of every row of a 2-D tensor (radix select), fp32 (rows,); k = 0 gives +inf."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, cols), got shape {tuple(x.shape)}")
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    torch.ops.fastmerge.row_kth_largest_abs(x, int(k), out)
    return out


# ---------------------------------------------------------------------------------------------------------
# elementwise sparsifiers


def _rows(v, rows: int, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().to(device=device, dtype=torch.float32).reshape(-1)
    return torch.full((rows,), float(v), dtype=torch.float32, device=device)


def prune(
    x: torch.Tensor,
    lo: float | torch.Tensor = 0.0,
    hi: float | torch.Tensor = math.inf,
    *,
    p: float = 0.0,
    seed: int = 0,
    key: int = 0,
    offset: int = 0,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x * [lo <= |x| < hi] * [u >= p] * scale, and fp64 [sum |x|, sum |kept|].

    lo/hi: floats (per tensor) or fp32 tensors of one value per row of the last dimension.
    u: Philox uniform of (seed, key) at each element's linear index + offset.
    """
    rows = lo.numel() if isinstance(lo, torch.Tensor) else hi.numel() if isinstance(hi, torch.Tensor) else 1
    out = empty(x.shape, out_dtype or x.dtype, x.device)
    stats = torch.zeros(2, dtype=torch.float64, device=x.device)
    torch.ops.fastmerge.prune(
        x, _rows(lo, rows, x.device), _rows(hi, rows, x.device), out, stats, float(p), to_i64(seed),
        to_i64(key), int(offset), float(scale),
    )
    return out, stats


def della_prune(x, density: float, epsilon: float, *, seed: int = 0, key: int = 0, rescale: bool = True,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """DELLA MagPrune per row of the last dimension (see fastmerge.reference.della_prune)."""
    out = empty(x.shape, out_dtype or x.dtype, x.device)
    torch.ops.fastmerge.della_prune(x, out, float(density), float(epsilon), to_i64(seed), to_i64(key), bool(rescale))
    return out


# ---------------------------------------------------------------------------------------------------------
# sign consensus


def ties_params(n: int, *, weights=None, lo=None, hi=None, p=None, scale=None) -> torch.Tensor:
    """The (T, 5) fp32 table of ties_merge: per task (weight, lo, hi, drop p, scale), broadcasting scalars."""
    cols = []
    for name, v, default in (("weights", weights, 1.0), ("lo", lo, 0.0), ("hi", hi, math.inf), ("p", p, 0.0),
                             ("scale", scale, 1.0)):
        v = default if v is None else v
        t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} values for {n} experts")
        cols.append(t)
    return torch.stack(cols, dim=1).contiguous()


def ties_merge(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    params: torch.Tensor | None = None,
    *,
    elect: str = "sum",
    merge: str = "mean",
    weighted_elect: bool = False,
    zero_sign: float = 1.0,
    lam: float = 1.0,
    seed: int = 0,
    key: int = 0,
    offset: int = 0,
    out_dtype: torch.dtype | None = None,
    write: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Fused trim/drop/elect/disjoint-merge in one pass (semantics: fastmerge.reference.ties_merge).

    Returns (merged tensor, written into ``out`` when given, or None when ``write`` is False,
    int64 [#s>0, #s<0]).
    """
    experts = list(experts)
    if not experts:
        raise ValueError("experts must hold at least one tensor, got an empty list")
    if elect not in ELECT:
        raise ValueError(f"elect must be one of {list(ELECT)}, got {elect!r}")
    if merge not in MERGE:
        raise ValueError(f"merge must be one of {list(MERGE)}, got {merge!r}")
    if params is None:
        params = ties_params(len(experts))
    e0 = experts[0]
    if write and out is None:
        out = empty(e0.shape, out_dtype or e0.dtype, e0.device)
    elif not write:
        out = None
    counts = torch.zeros(2, dtype=torch.int64, device=e0.device)
    torch.ops.fastmerge.ties_merge(
        base, experts, params, out, counts, to_i64(seed), to_i64(key), int(offset), ELECT[elect], MERGE[merge],
        bool(weighted_elect), float(zero_sign), float(lam),
    )
    return out, counts


def tall_masks(base, experts, lambdas, mtl=None) -> torch.Tensor:
    """TALL masks, bool (T, *shape): |delta_t| > lambda_t * |mtl - delta_t| (mtl = sum of deltas by default)."""
    experts = list(experts)
    if not experts:
        raise ValueError("experts must hold at least one tensor, got an empty list")
    lam = torch.as_tensor(lambdas, dtype=torch.float32).reshape(-1).expand(len(experts)).contiguous()
    masks = empty((len(experts), *experts[0].shape), torch.bool, experts[0].device)
    torch.ops.fastmerge.tall_masks(base, experts, lam, mtl, masks)
    return masks


def consensus_merge(base, experts, lambdas, mtl=None, *, min_count: int = 2, lam: float = 1.0,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """base + lam * [#TALL masks >= min_count] * mtl, fused (no mask is stored)."""
    experts = list(experts)
    if not experts:
        raise ValueError("experts must hold at least one tensor, got an empty list")
    lamt = torch.as_tensor(lambdas, dtype=torch.float32).reshape(-1).expand(len(experts)).contiguous()
    out = empty(experts[0].shape, out_dtype or experts[0].dtype, experts[0].device)
    torch.ops.fastmerge.consensus_merge(base, experts, lamt, mtl, int(min_count), float(lam), out)
    return out


def emr_elect(base, experts, out_dtype: torch.dtype = torch.float32):
    """EMR elect: (tau_uni, bool masks (T, *shape), fp64 (T, 2) [sum |delta_t|, sum |tau_uni| mask_t])."""
    experts = list(experts)
    if not experts:
        raise ValueError("experts must hold at least one tensor, got an empty list")
    e0 = experts[0]
    uni = empty(e0.shape, out_dtype, e0.device)
    masks = empty((len(experts), *e0.shape), torch.bool, e0.device)
    stats = torch.zeros(len(experts), 2, dtype=torch.float64, device=e0.device)
    torch.ops.fastmerge.emr_elect(base, experts, uni, masks, stats)
    return uni, masks, stats


def orth_project(x: torch.Tensor, u: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """X - U (U^T X) for a matrix or a stack of matrices (..., m, n), U (..., m, k) with orthonormal columns:
    the part of X outside span(U). fp32 maths (fp64 for fp64 inputs); the result in ``out_dtype`` (default:
    fp32, or fp64 for fp64 inputs)."""
    if x.dim() < 2 or u.dim() != x.dim() or u.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"orth_project: x (..., m, n) and u (..., m, k) must share (..., m); got "
                         f"{tuple(x.shape)} and {tuple(u.shape)}")
    lead = x.shape[:-2]
    xs = x.reshape(-1, *x.shape[-2:])
    us = u.reshape(-1, *u.shape[-2:])
    dt = out_dtype or (torch.float64 if torch.float64 in (x.dtype, u.dtype) else torch.float32)
    out = empty(xs.shape, dt, x.device)
    torch.ops.fastmerge.orth_project(xs, us, out)
    return out.reshape(*lead, *x.shape[-2:])


def doge_grad(taus: torch.Tensor, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """-2 sum_j (a_j - rowdot(tau_j, d)) tau_j per stack member: DOGE's loss gradient core (fp32, (B, m, n))."""
    out = empty(d.shape, torch.float32, d.device)
    torch.ops.fastmerge.doge_grad(taus, a, d, out)
    return out


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              scale: torch.Tensor, *, repeat: int = 1, lr: float, beta1: float = 0.9, beta2: float = 0.999,
              eps: float = 1e-8, step: int) -> None:
    """In place: torch.optim.Adam's update of every slice of param (S, ...), slice s with gradient
    scale[s] * grad[s // repeat]: one fused pass instead of Adam's six."""
    torch.ops.fastmerge.adam_step(param, grad, exp_avg, exp_avg_sq, scale, int(repeat), float(lr), float(beta1),
                                  float(beta2), float(eps), int(step))


def tv_combine(base: torch.Tensor, taus: torch.Tensor, coef: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """theta = base + sum_t coef[t, s] * taus[t] over flat parameters, segment s = offsets[s]:offsets[s + 1];
    taus (T, P) fp32/fp16/bf16 (one stacked copy), base (P,) fp32. One pass."""
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    torch.ops.fastmerge.tv_combine(base, taus, coef, offsets, out)
    return out


def tv_coef_grad(grad: torch.Tensor, taus: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(T, S) = sum over segment s of grad[p] * taus[t, p]: the gradient of the coefficients of tv_combine."""
    out = torch.empty(taus.shape[0], offsets.numel() - 1, dtype=torch.float32, device=taus.device)
    torch.ops.fastmerge.tv_coef_grad(grad, taus, offsets, out)
    return out
