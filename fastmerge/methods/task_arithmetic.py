"""Generalised task arithmetic (mergekit's ``generalized_task_arithmetic``): sparsify each task vector
(magnitude, random/DARE, outliers/breadcrumbs, DELLA), weight it, optionally elect signs (TIES), combine.

With the default ``compat: mergekit`` every deterministic configuration (no sparsification, magnitude,
outliers, or a density that leaves nothing to chance) runs mergekit 0.1.5's arithmetic in the inputs' dtype
and gives its bytes (_mergekit). The randomised sparsifiers run the fused fp32 kernels, rounded once, and draw
from fastmerge's counter-based Philox stream keyed by (seed, tensor name, task), so a merge is bit-identical on
every backend and independent of the tensor order; mergekit's ``torch.bernoulli`` can only be matched
statistically. ``ties`` also follows ``fastmerge.compat`` (official / fusionbench / peft,
fastmerge.algo.ties) and, like ``magnitude_prune``, ``fastmerge.trim: global`` (whole-model thresholds from a
streaming pass).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .. import context, ops
from ..algo import ties as sign_consensus
from .base import NONBASE, SHARED, Method, Param, TensorCall
from .registry import register


@dataclass(frozen=True)
class GTA:
    sparsify: str | None        # magnitude | random | outliers | della | None
    consensus: bool
    normalize: bool
    rescale: bool

    def params(self) -> tuple[Param, ...]:
        ps = [Param("int8_mask", SHARED, bool, False), Param("normalize", SHARED, bool, self.normalize),
              Param("rescale", SHARED, bool, self.rescale), Param("lambda", SHARED, float, 1.0),
              Param("weight", NONBASE, float), Param("density", NONBASE, float, 1.0, 0.0, 1.0)]
        if self.sparsify == "outliers":
            ps.append(Param("gamma", NONBASE, float, 0.01, 0.0, 1.0))
        if self.sparsify == "della":
            ps.append(Param("epsilon", NONBASE, float, 0.15, 0.0, 1.0))
        return tuple(ps)

    def __call__(self, c: TensorCall) -> torch.Tensor:
        base, experts, prm = c.base, c.experts, c.expert_params
        if not experts:
            return base.to(c.out_dtype)
        compat = c.options.get("compat", "mergekit")
        if compat != "mergekit" and self.sparsify == "magnitude" and self.consensus:
            return self._ties_compat(c, compat)
        if compat == "mergekit" and c.stats.get("lo") is None and (
                self.sparsify in (None, "magnitude", "outliers") or all(p["density"] >= 1 for p in prm)):
            return _mergekit(self, c)
        T = len(experts)
        w = [p["weight"] for p in prm]
        lo, hi, drop, scale = [0.0] * T, [math.inf] * T, [0.0] * T, [1.0] * T
        pruned: list[torch.Tensor | None] = [None] * T
        rescale = c.shared["rescale"]
        glo = c.stats.get("lo")
        buf = None
        for t, (x, p) in enumerate(zip(experts, prm, strict=True)):
            d = p["density"]
            if self.sparsify is None or d >= 1.0:
                continue
            if glo is not None:
                lo[t] = glo[t]
                continue
            if d <= 0.0 or x.numel() == 0:
                lo[t] = math.inf
                continue
            if self.sparsify == "random":
                drop[t] = 1.0 - d
                if not rescale:
                    continue
            # In a bf16 merge mergekit ranks (and L1-sums) bf16-rounded task vectors: so does fastmerge, on a
            # bf16 delta buffer (half the traffic, one histogram pass); the fused merge then cuts the exact fp32
            # deltas at the fp32 bound of the same rounding class (_bf16_cut).
            bf16 = x.dtype == torch.bfloat16 and base.dtype == torch.bfloat16 and self.sparsify != "della"
            if buf is None:
                buf = ops.empty(x.shape, torch.bfloat16 if bf16 else torch.float32, x.device)
            delta = sign_consensus.delta(x, base, buf)
            cut = _bf16_cut if bf16 else float
            if self.sparsify == "magnitude":
                k = sign_consensus.keep_rank(x.numel(), d, "peft" if compat == "peft" else "mergekit")
                lo[t] = math.inf if not k else ops.magnitude_threshold(delta, k)
            elif self.sparsify == "outliers":
                lo[t], hi[t] = _outlier_band(delta, d, p["gamma"])
            elif self.sparsify == "della":  # per-row ranks, materialised (fp32), merged as a dense task vector
                pruned[t] = _della(delta, d, p["epsilon"], rescale, c.seed, c.key + t)
                continue
            if rescale:
                _, st = ops.prune(delta, lo[t], hi[t], p=drop[t], seed=c.seed, key=c.key + t)
                before, after = float(st[0]), float(st[1])
                if before >= 1e-7 and after >= 1e-7:
                    scale[t] = before / after
            lo[t], hi[t] = cut(lo[t]), cut(hi[t])
        elect = "sum" if self.consensus else "none"
        if self.consensus:
            merge = "wmean" if c.shared["normalize"] else "sum"
            lam = c.shared["lambda"]
        else:
            merge, lam = "sum", c.shared["lambda"]
            if c.shared["normalize"]:
                s = sum(w)
                lam = lam / (s if abs(s) >= 1e-8 else 1.0)
        if any(q is not None for q in pruned):
            for t in range(T):
                if pruned[t] is None:
                    pruned[t] = ops.prune(sign_consensus.delta(experts[t], base), lo[t], hi[t])[0]
            out = ops.ties_merge(None, pruned, ops.ties_params(T, weights=w), elect=elect, merge=merge,
                                 weighted_elect=True, lam=lam, out_dtype=torch.float32)[0]
            return (base.float() + out).to(c.out_dtype)
        params = ops.ties_params(T, weights=w, lo=lo, hi=hi, p=drop, scale=scale)
        return ops.ties_merge(base, experts, params, elect=elect, merge=merge, weighted_elect=True, lam=lam,
                              seed=c.seed, key=c.key, out_dtype=c.out_dtype)[0]

    def _ties_compat(self, c: TensorCall, compat: str) -> torch.Tensor:
        """TIES with the official / FusionBench / PEFT rules (fastmerge.algo.ties)."""
        prm = c.expert_params
        zero_sign = c.stats.get("zero_sign")
        if c.stats.get("lo") is not None:
            el, mg = "sum", ("mean" if compat == "official" else "sum")
            params = ops.ties_params(len(prm), lo=c.stats["lo"])
            return ops.ties_merge(c.base, c.experts, params, elect=el, merge=mg, zero_sign=zero_sign,
                                  lam=c.shared["lambda"], out_dtype=c.out_dtype)[0]
        return sign_consensus.ties(c.base, c.experts, [p["density"] for p in prm], weights=[p["weight"] for p in prm],
                              lam=c.shared["lambda"], compat=compat, normalize=c.shared["normalize"],
                              zero_sign=zero_sign, out_dtype=c.out_dtype)


def _mergekit(g: GTA, c: TensorCall) -> torch.Tensor:
    """mergekit's own arithmetic in the inputs' dtype (every intermediate rounded as its whole-tensor ops round
    it: ops.gta_merge, one fused pass) with its exact-k magnitude masks in its sort's tie order (ops.order_window,
    no sort): the same bytes as mergekit for every deterministic configuration. The fp32 fused path
    (GTA.__call__) serves the randomised sparsifiers."""
    base, prm, sh, experts = c.base, c.expert_params, c.shared, c.experts
    T = len(prm)
    inputs = list(experts)
    keep = [_KEEP_ALL] * T
    scales = [1.0] * T

    def task_mask(t: int) -> None:
        p = prm[t]
        if g.sparsify is None or p["density"] >= 1:
            return
        n = base.numel()
        if g.sparsify == "magnitude" and (p["density"] <= 0 or n == 0):
            inputs[t] = base  # mergekit's zeros_like: a task vector of exact zeros
            return
        delta = experts[t] - base
        if g.sparsify == "magnitude":
            start, stop, descending = 0, max(1, int(p["density"] * n)), True
        else:  # outliers: drop the int(gamma * n) largest, keep the next int(density * n)
            target, n_top = int(p["density"] * n), int(p["gamma"] * n)
            start = max(0, n - target - n_top)
            stop, descending = start + target, False
        keep[t] = _window(delta, start, stop, descending)
        if sh["rescale"]:  # mergekit's L1 rescale: sum |delta| / sum |kept delta|, both in the dtype
            before = delta.abs().sum()
            after = delta.mul_(keep[t]).abs().sum()
            if not (before < 1e-7 or after < 1e-7):
                scales[t] = float(before / after)

    # the tasks' masks are independent, and order_window is one thread each: one task per core
    workers = min(T, torch.get_num_threads()) if g.sparsify is not None and base.numel() >= 1 << 16 else 1
    if workers > 1:
        list(_pool(workers).map(context.worker(task_mask), range(T)))
    else:
        for t in range(T):
            task_mask(t)
    return ops.gta_merge(base, inputs, keep, [p["weight"] for p in prm], scales, consensus=g.consensus,
                         normalize=sh["normalize"], lam=sh["lambda"], out_dtype=c.out_dtype)


_KEEP_ALL = torch.empty(0, dtype=torch.bool)


def _window(delta: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """The mask of positions [start, stop) of mergekit's magnitude order of ``delta``."""
    if delta.device.type == "cpu":
        return ops.order_window(delta, start, stop, descending=descending)
    # mergekit's GPU order: torch's device sort of |delta| in its own dtype
    order = torch.sort(delta.abs().reshape(-1), descending=descending).indices[start:stop]
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    keep[order] = True
    return keep.reshape(delta.shape)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        if n not in _POOLS:
            _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="fastmerge-mask")
        return _POOLS[n]


def _bf16_cut(v: float) -> float:
    """The least fp32 magnitude whose bf16 rounding (nearest, ties to even) is >= v, for a bf16 value v >= 0:
    |bf16(d)| >= v  <=>  |d| >= _bf16_cut(v). Lets the fused fp32 kernel cut exactly where a bf16 ranking did."""
    if v <= 0.0 or math.isinf(v) or math.isnan(v):
        return v
    bits = int(torch.tensor([v], dtype=torch.float32).view(torch.int32))
    mid = bits - 0x8000                      # halfway to the next bf16 value below
    if (bits >> 16) & 1:                     # odd mantissa: the halfway point rounds down (to the even one)
        mid += 1
    return float(torch.tensor([mid], dtype=torch.int32).view(torch.float32))


def _outlier_band(delta: torch.Tensor, density: float, gamma: float) -> tuple[float, float]:
    """mergekit's magnitude_outliers as a magnitude band [lo, hi): drop the top gamma, keep the next density."""
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    if target <= 0:
        return math.inf, math.inf
    n_bot = n - target - n_top
    if n_bot < 0:
        n_bot, n_top = 0, n - target
    hi = ops.magnitude_threshold(delta, n_top) if n_top else math.inf
    lo = ops.magnitude_threshold(delta, n - n_bot)
    return lo, hi


def _della(delta: torch.Tensor, density: float, eps: float, rescale: bool, seed: int, key: int) -> torch.Tensor:
    """mergekit's della_magprune (per-row rank keep probabilities, L1-norm rescale) on fastmerge's Philox."""
    if density <= 0:
        return torch.zeros_like(delta)
    x = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    kept = ops.della_prune(x, density, eps, seed=seed, key=key, rescale=False).reshape(delta.shape)
    if rescale:
        before, after = float(delta.abs().sum(dtype=torch.float64)), float(kept.abs().sum(dtype=torch.float64))
        if before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
    return kept


# ---------------------------------------------------------------------------------------------------------
# TALL-mask consensus (single model) and the multi-task store methods


_GTA = {
    "task_arithmetic": GTA(None, False, False, False),
    "ties": GTA("magnitude", True, True, False),
    "dare_ties": GTA("random", True, False, True),
    "dare_linear": GTA("random", False, False, True),
    "breadcrumbs": GTA("outliers", False, False, False),
    "breadcrumbs_ties": GTA("outliers", True, False, False),
    "della": GTA("della", True, True, True),
    "della_linear": GTA("della", False, False, True),
    "magnitude_prune": GTA("magnitude", False, False, False),
}
# ties follows fastmerge.compat; the magnitude-trimmed ones take whole-model thresholds (fastmerge.trim: global)
register(*(Method(name, g.params(), g, doc="task vectors: sparsify, weight, consensus, combine",
                  compat=name == "ties", global_trim=g.sparsify == "magnitude", mergekit_trim=g.sparsify == "magnitude")
           for name, g in _GTA.items()))
