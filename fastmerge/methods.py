"""Merge methods the engine runs, per tensor, on fastmerge's fused kernels.

Each method declares its parameters as mergekit does (scope: shared, per input, or per non-base input;
a default, or required), the base policy, and a function merging one tensor. With the default
``compat: mergekit`` the maths is mergekit 0.1.5's (``generalized_task_arithmetic``, ``sparsify``,
``linear``, ``slerp``, ``passthrough``), done in fp32 and rounded once. The randomised sparsifiers (DARE,
DELLA) draw from fastmerge's counter-based Philox stream keyed by (seed, tensor name, task), so a merge is
bit-identical on every backend and independent of the tensor order; mergekit's ``torch.bernoulli`` can only
be matched statistically.

Methods with whole-model statistics (``fastmerge: {trim: global}``) get them from streaming passes before the
merge pass (:func:`prepare`). ``tall`` and ``emr`` give one model per task and write a multi-task store
(see fastmerge.store).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import consensus, doge, ops, store, svd_methods
from .config import ConfigError, MergeConfig

REQUIRED = object()
SHARED, INPUT, NONBASE = "shared", "input", "nonbase"


@dataclass(frozen=True)
class Param:
    name: str
    scope: str
    kind: type
    default: Any = REQUIRED
    lo: float | None = None      # inclusive bounds every value must lie in (checked when the config is loaded)
    hi: float | None = None
    lo_open: bool = False        # lo itself excluded


FP32_MAX = 3.4028234663852886e38


def _check_range(p: Param, v: Any, where: str) -> None:
    """One value of a numeric parameter: finite as fp32 (the kernels' arithmetic), within the parameter's range."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return  # not a number: _coerce names it when the tensor is resolved
    if not math.isfinite(v) or abs(v) > FP32_MAX:
        raise ConfigError(f"{where}: {v!r} is not a finite float32 number")
    if p.kind is int and v != int(v):
        raise ConfigError(f"{where}: expected an integer, got {v!r}")
    low = p.lo is not None and (v <= p.lo if p.lo_open else v < p.lo)
    if low or (p.hi is not None and v > p.hi):
        lo = "-inf" if p.lo is None else p.lo
        hi = "inf" if p.hi is None else p.hi
        raise ConfigError(f"{where}: {v!r} is outside {'(' if p.lo_open else '['}{lo}, {hi}]")


def _leaves(setting: Any):
    """The scalar values inside a setting (a scalar, a gradient list, or {filter, value} conditions)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        for e in setting:
            yield from _leaves(e["value"] if isinstance(e, dict) else e)
    else:
        yield setting


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[Param, ...]
    fn: Callable[[TensorCall], torch.Tensor] | None
    base: str = "required"           # required | optional | forbidden
    min_inputs: int = 1
    max_inputs: int | None = None
    sink: Callable[[Any, Any], dict] | None = None  # (engine, OutputDir) -> summary extras: writes a multi-task
    #                                               store instead of one model (fastmerge.store)
    doc: str = ""
    batch: Callable[[list[TensorCall]], list[torch.Tensor]] | None = None  # a stack of same-shape tensors at once
    prepare: Callable[[Any], None] | None = None  # streaming statistics passes before the merge (gets the engine)
    mergekit_trim: bool = False      # under compat mergekit, global trim keeps mergekit's per-tensor rounding rule

    @property
    def store(self) -> bool:
        return self.sink is not None


@dataclass
class TensorCall:
    """Everything one tensor's merge sees."""

    name: str
    inputs: list[torch.Tensor]                    # every input, config order (the base is one of them)
    base_index: int | None
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]               # aligned with inputs (empty dicts for the base)
    seed: int
    out_dtype: torch.dtype
    options: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)   # whole-model statistics from the stats passes
    notes: dict[str, int] = field(default_factory=dict)   # counters the merge summary reports (e.g. fallbacks)

    @property
    def base(self) -> torch.Tensor | None:
        return None if self.base_index is None else self.inputs[self.base_index]

    @property
    def experts(self) -> list[torch.Tensor]:
        return [x for i, x in enumerate(self.inputs) if i != self.base_index]

    @property
    def expert_params(self) -> list[dict[str, Any]]:
        return [p for i, p in enumerate(self.per_input) if i != self.base_index]

    @property
    def key(self) -> int:
        return ops.name_key(self.name)


# ---------------------------------------------------------------------------------------------------------
# linear family


def _linear(c: TensorCall) -> torch.Tensor:
    w = [p["weight"] for p in c.per_input]
    merge = "wmean" if c.shared["normalize"] else "sum"
    return ops.ties_merge(None, c.inputs, ops.ties_params(len(w), weights=w), elect="none", merge=merge,
                          out_dtype=c.out_dtype)[0]


def _passthrough(c: TensorCall) -> torch.Tensor:
    s = c.per_input[0].get("scale")
    x = c.inputs[0]
    return (x if s is None else x.float() * s).to(c.out_dtype)


def _slerp(c: TensorCall) -> torch.Tensor:
    """mergekit's slerp of the whole flattened tensor: base at t=0, the other model at t=1 (fp32 maths)."""
    t = float(c.shared["t"])
    v0, v1 = c.base, c.experts[0]
    a, b = v0.reshape(-1).float(), v1.reshape(-1).float()
    if a.numel() == 0:
        return v0.to(c.out_dtype)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > 1e-8 else torch.ones_like(na)
    nb = nb if nb > 1e-8 else torch.ones_like(nb)
    dot = float(torch.dot(a / na, b / nb).clamp(-1, 1))
    if abs(dot) > 0.9995:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        st = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / st, math.sin(t * theta) / st
    w = ops.ties_params(2, weights=[ca, cb])
    return ops.ties_merge(None, [v0, v1], w, elect="none", merge="sum", out_dtype=c.out_dtype)[0]


# ---------------------------------------------------------------------------------------------------------
# generalised task arithmetic: sparsify each task vector, weight, optional sign consensus, combine


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
            delta = consensus._delta(x, base, buf)
            cut = _bf16_cut if bf16 else float
            if self.sparsify == "magnitude":
                k = consensus.keep_rank(x.numel(), d, "peft" if compat == "peft" else "mergekit")
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
                    pruned[t] = ops.prune(consensus._delta(experts[t], base), lo[t], hi[t])[0]
            out = ops.ties_merge(None, pruned, ops.ties_params(T, weights=w), elect=elect, merge=merge,
                                 weighted_elect=True, lam=lam, out_dtype=torch.float32)[0]
            return (base.float() + out).to(c.out_dtype)
        params = ops.ties_params(T, weights=w, lo=lo, hi=hi, p=drop, scale=scale)
        return ops.ties_merge(base, experts, params, elect=elect, merge=merge, weighted_elect=True, lam=lam,
                              seed=c.seed, key=c.key, out_dtype=c.out_dtype)[0]

    def _ties_compat(self, c: TensorCall, compat: str) -> torch.Tensor:
        """TIES with the official / FusionBench / PEFT rules (fastmerge.consensus.ties)."""
        prm = c.expert_params
        zero_sign = c.stats.get("zero_sign")
        if c.stats.get("lo") is not None:
            el, mg = "sum", ("mean" if compat == "official" else "sum")
            params = ops.ties_params(len(prm), lo=c.stats["lo"])
            return ops.ties_merge(c.base, c.experts, params, elect=el, merge=mg, zero_sign=zero_sign,
                                  lam=c.shared["lambda"], out_dtype=c.out_dtype)[0]
        return consensus.ties(c.base, c.experts, [p["density"] for p in prm], weights=[p["weight"] for p in prm],
                              lam=c.shared["lambda"], compat=compat, normalize=c.shared["normalize"],
                              zero_sign=zero_sign, out_dtype=c.out_dtype)


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


def _mtl(c: TensorCall, ties: bool) -> torch.Tensor | None:
    """The multi-task vector (fp32): the sum of the task vectors, or their TIES dis-sum merge."""
    deltas = [consensus._delta(x, c.base) for x in c.experts]
    T = len(deltas)
    if not ties:
        return ops.ties_merge(None, deltas, ops.ties_params(T), elect="none", merge="sum")[0]
    lo = c.stats.get("lo")
    zero_sign = c.stats.get("zero_sign")
    if lo is None:
        lo = [consensus.magnitude_threshold_for(d, p["density"], "official")
              for d, p in zip(deltas, c.expert_params, strict=True)]
    params = ops.ties_params(T, lo=lo)
    if zero_sign is None:
        counts = ops.ties_merge(None, deltas, params, elect="sum", merge="sum", write=False)[1]
        zero_sign = float(torch.sign(counts[0] - counts[1]))
    return ops.ties_merge(None, deltas, params, elect="sum", merge="sum", zero_sign=zero_sign)[0]


def _consensus(ties: bool) -> Callable[[TensorCall], torch.Tensor]:
    def run(c: TensorCall) -> torch.Tensor:
        lams = [p["tall_lambda"] for p in c.expert_params]
        mtl = _mtl(c, True) if ties else None
        return ops.consensus_merge(c.base, c.experts, lams, mtl, min_count=int(c.shared["k"]), lam=c.shared["lambda"],
                                   out_dtype=c.out_dtype)

    return run


def tall_parts(c: TensorCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shared task vector tau_MTL (fp32), bool masks (T, *shape), fp64 (T, 2) stats unused by TALL)."""
    mtl = _mtl(c, c.shared["mtl"] == "ties")
    masks = ops.tall_masks(c.base, c.experts, [p["tall_lambda"] for p in c.expert_params], mtl)
    return mtl, masks, torch.zeros(len(c.experts), 2, dtype=torch.float64)


def emr_parts(c: TensorCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ops.emr_elect(c.base, c.experts)


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
_TALL_PARAMS = (Param("tall_lambda", NONBASE, float, 0.4, 0.0), Param("density", NONBASE, float, 0.2, 0.0, 1.0))


def _subspace(name: str, doc: str) -> Method:
    fn = svd_methods.FNS[name]

    def batch(calls: list[TensorCall]) -> list[torch.Tensor]:
        return fn(calls, svd_methods.options(calls[0].options))

    params = [Param("alpha", SHARED, float, 1.0), Param("weight", NONBASE, float, 1.0)]
    if name == "iso_cts":
        params.append(Param("common_fraction", SHARED, float, 0.8, 0.0, 1.0, lo_open=True))
    return Method(name, tuple(params), lambda c: batch([c])[0], min_inputs=2, doc=doc, batch=batch)

METHODS: dict[str, Method] = {
    "linear": Method("linear", (Param("weight", INPUT, float), Param("normalize", SHARED, bool, True)), _linear,
                     base="optional", doc="weighted average of the models"),
    "slerp": Method("slerp", (Param("t", SHARED, float, REQUIRED, 0.0, 1.0),), _slerp, min_inputs=2, max_inputs=2,
                    doc="spherical interpolation between the base (t=0) and one other model (t=1)"),
    "passthrough": Method("passthrough", (Param("scale", INPUT, float, None),), _passthrough, base="optional",
                          max_inputs=1, doc="copy one model (optionally scaled)"),
    **{name: Method(name, g.params(), g, doc="task vectors: sparsify, weight, consensus, combine",
                    mergekit_trim=name in ("ties", "magnitude_prune"))
       for name, g in _GTA.items()},
    "consensus_ta": Method("consensus_ta", (Param("lambda", SHARED, float, 1.0), Param("k", SHARED, int, 2, 0.0),
                                            *_TALL_PARAMS), _consensus(False),
                           doc="TALL-mask consensus over the task-arithmetic vector"),
    "consensus_ties": Method("consensus_ties", (Param("lambda", SHARED, float, 1.0), Param("k", SHARED, int, 2, 0.0),
                                                *_TALL_PARAMS), _consensus(True),
                             doc="TALL-mask consensus over the TIES (dis-sum) vector"),
    "tall": Method("tall", (Param("mtl", SHARED, str, "ta"), *_TALL_PARAMS), None,
                   sink=functools.partial(store.write_mask_store, parts=tall_parts, rescale=False),
                   doc="TALL masks: a multi-task store (shared tau_MTL + one packed mask per task)"),
    "emr": Method("emr", (), None, sink=functools.partial(store.write_mask_store, parts=emr_parts, rescale=True),
                  doc="EMR-merging: a multi-task store (tau_uni + one packed mask and scale per task)"),
    **{name: _subspace(name, doc) for name, doc in (
        ("tsv_m", "Task Singular Vectors merge: top r/T triplets per task, orthogonalised, original values"),
        ("iso_c", "Iso-C: mean singular value x polar factor of the summed task vectors"),
        ("iso_cts", "Iso-CTS: common + task-specific subspaces, orthogonalised, flattened spectrum"))},
    "tsv_c": Method("tsv_c", (Param("weight", NONBASE, float, 1.0),), None, sink=store.write_tsvc_store, min_inputs=2,
                    doc="TSV-C: a multi-task store of each task's top r/T singular triplets per matrix",
                    batch=lambda calls: svd_methods.tsv_c_factors(
                        calls, svd_methods.options(calls[0].options, "tsv_c"))),
}
_DOGE_RANGES = {"density": (0.0, 1.0, True), "subspace": (1, None, False), "steps": (1, None, False),
                "lr": (0.0, None, True), "beta1": (0.0, 1.0, False), "beta2": (0.0, 1.0, False),
                "eps": (0.0, None, True), "eta": (None, None, False)}
_DOGE_PARAMS = tuple(Param(k, SHARED, int if k in ("subspace", "steps") else float, v, *_DOGE_RANGES[k])
                     for k, v in doge.DEFAULTS.items())
METHODS["doge_ta"] = Method("doge_ta", _DOGE_PARAMS, lambda c: doge.merge_stack([c])[0], min_inputs=2,
                            batch=doge.merge_stack, prepare=doge.stats,
                            doc="DOGE: projected Adam on a shared modification of the task vectors, adaptive "
                                "coefficients, global top-K masks")
METHODS["doge_am"] = Method("doge_am", _DOGE_PARAMS, None, min_inputs=2, sink=store.write_task_vector_store,
                            batch=doge.am_stack,
                            prepare=doge.stats,
                            doc="DOGE_AM: per-task modified task vectors (tau_i + Delta_i) * M_i, as a task-vector "
                                "store")
SUBSPACE = ("tsv_m", "iso_c", "iso_cts", "tsv_c")
SUBSPACE_OPTIONS = ("svd", "svd_oversample", "svd_power_iters", "exclude_keys")
GLOBAL_TRIM = ("ties", "magnitude_prune", "consensus_ties", "tall")


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown merge_method {name!r}; expected one of {', '.join(sorted(METHODS))}") from None


def param_specs(method: Method, compat: str) -> tuple[Param, ...]:
    """The method's parameters; outside mergekit compat the TIES weight defaults to 1 (the papers have none)."""
    if compat == "mergekit":
        return method.params
    return tuple(Param(p.name, p.scope, p.kind, 1.0) if p.name == "weight" else p for p in method.params)


def validate(cfg: MergeConfig) -> None:
    """Method-level checks: base policy, input counts, parameter names and scopes, fastmerge options."""
    m = get(cfg.method)
    compat = cfg.options.get("compat", "mergekit")
    if m.base == "required" and cfg.base is None:
        raise ConfigError(f"merge_method {m.name} needs 'base_model'")
    n = len(cfg.models)
    if n < m.min_inputs or (m.max_inputs is not None and n > m.max_inputs):
        want = f"{m.min_inputs}" if m.max_inputs == m.min_inputs else f"{m.min_inputs}..{m.max_inputs or 'any'}"
        raise ConfigError(f"merge_method {m.name} takes {want} models (base included), got {n}")
    if (m.store or m.base == "required") and len(cfg.experts) < 1:
        raise ConfigError(f"merge_method {m.name} needs at least one model besides the base "
                          f"(models: lists only {cfg.base.label if cfg.base else 'one model'})")
    names = {p.name: p for p in param_specs(m, compat)}
    if "int8_mask" in cfg.parameters and "int8_mask" in names:
        warnings.warn("parameters.int8_mask: ignored (mergekit stores its masks as int8 to save memory; fastmerge's "
                      "kernels never materialise float masks), the result is the same", stacklevel=2)
    for k, v in cfg.parameters.items():
        if k not in names:
            raise ConfigError(f"parameters.{k}: not a parameter of {m.name}; expected one of {', '.join(names)}")
        for leaf in _leaves(v):
            _check_range(names[k], leaf, f"parameters.{k}")
    for i, model in enumerate(cfg.models):
        for k, v in model.parameters.items():
            p = names.get(k)
            where = f"models[{i}] ({model.label}).parameters.{k}"
            if p is None:
                raise ConfigError(f"{where}: not a parameter of {m.name}; expected one of {', '.join(names)}")
            if p.scope == SHARED:
                raise ConfigError(f"{where}: {k} is a global parameter of {m.name}; set it under the top-level "
                                  "'parameters:'")
            for leaf in _leaves(v):
                _check_range(p, leaf, where)
    if cfg.options.get("trim") == "global":
        if m.name not in GLOBAL_TRIM:
            raise ConfigError(f"fastmerge.trim: global applies to {', '.join(GLOBAL_TRIM)}, not {m.name}")
        for model in cfg.experts:
            d = model.parameters.get("density", cfg.parameters.get("density", 1.0 if m.name != "tall" else 0.2))
            if not isinstance(d, (int, float)) or isinstance(d, bool):
                raise ConfigError(f"fastmerge.trim: global needs one density per model; {model.label} has {d!r}")
    if m.name in ("doge_ta", "doge_am"):
        doge.options(cfg.options)
        for k in ("steps", "subspace"):
            v = cfg.parameters.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"parameters.{k}: expected an integer >= 1, got {v!r}")
    elif m.name in SUBSPACE:
        svd_methods.check_config(cfg)
    else:
        given = [k for k in (*SUBSPACE_OPTIONS, "doge_layers") if k in cfg.options]
        if given:
            who = "doge_ta, doge_am" if given[0] == "doge_layers" else f"the subspace methods ({', '.join(SUBSPACE)})"
            raise ConfigError(f"fastmerge.{given[0]}: applies to {who}, not {m.name}")
    if compat != "mergekit" and m.name not in ("ties",):
        raise ConfigError(f"fastmerge.compat: {compat} changes the semantics of ties only, not {m.name}")


def resolve(cfg: MergeConfig, tensor: str, t: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Shared and per-input parameter values for one tensor (mergekit's precedence: model, then global)."""
    from .config import evaluate

    m = get(cfg.method)
    specs = param_specs(m, cfg.options.get("compat", "mergekit"))

    def value(p: Param, sources: list[dict], where: str) -> Any:
        for src in sources:
            if p.name in src:
                v = evaluate(src[p.name], tensor, t, p.kind, f"{where}.{p.name}")
                if v is not None:
                    return v
        if p.default is REQUIRED:
            raise ConfigError(f"{where}: missing required parameter {p.name!r} of {m.name} (tensor {tensor})")
        return p.default

    shared = {p.name: value(p, [cfg.parameters], "parameters") for p in specs if p.scope == SHARED}
    per_input = []
    for model in cfg.models:
        is_base = model is cfg.base
        per_input.append({p.name: value(p, [model.parameters, cfg.parameters], model.label) for p in specs
                          if p.scope == INPUT or (p.scope == NONBASE and not is_base)})
        d, eps = per_input[-1].get("density"), per_input[-1].get("epsilon")
        if eps is not None and 0 < d < 1 and not (d - eps > 0 and d + eps < 1):
            raise ConfigError(f"{model.label}: della needs density ± epsilon inside (0, 1); tensor {tensor} has "
                              f"density {d:g}, epsilon {eps:g}")
    return shared, per_input
