"""What a merge method is, to the rest of fastmerge: a :class:`Method` declares its parameters (scope,
kind, default, range), its base policy and input counts, the ``fastmerge:`` options it accepts and its own
config checks, and what runs: ``fn`` per tensor or ``batch`` per stack of same-shape tensors, an optional
streaming statistics pass (``prepare``) and, for multi-task stores, its ``sink``. Nothing outside
``fastmerge.methods`` knows a method by its name.

:func:`validate` runs the checks every method shares and then the method's own; :func:`resolve` gives one
tensor's parameter values (mergekit's precedence: model, then global).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import ops
from ..config import ConfigError, MergeConfig, evaluate

REQUIRED = object()
# Every parameter name of mergekit 0.1.5's methods. mergekit ignores a parameter its method does not take (density
# left on a linear merge), so such a leftover is a warning here; a name no method knows (a typo) is an error.
MERGEKIT_PARAMS = frozenset({
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t", "filter_wise",
    "nuslerp_row_wise", "nuslerp_flatten", "scale", "r", "alpha", "select_topk", "normalize_weights", "eps",
    "max_iter", "tol"})
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
    min_nonbase: int = 0             # inputs besides the base (mergekit's min_non_base / max_non_base)
    max_nonbase: int | None = None
    sink: Callable[[Any, Any], dict] | None = None  # (run, OutputDir) -> summary extras: writes a multi-task
    #                                               store instead of one model (fastmerge.execute.sinks)
    doc: str = ""
    batch: Callable[[list[TensorCall]], list[torch.Tensor]] | None = None  # a stack of same-shape tensors at once
    prepare: Callable[[Any], None] | None = None  # streaming statistics passes before the merge (gets the run)
    options: frozenset[str] = frozenset()  # the method-specific ``fastmerge:`` options it accepts
    check: Callable[[MergeConfig], None] | None = None  # its own config checks, after the shared ones
    compat: bool = False             # follows ``fastmerge.compat`` (official / fusionbench / peft semantics)
    global_trim: bool = False        # accepts ``fastmerge.trim: global`` (whole-model magnitude thresholds)
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


def param_specs(method: Method, compat: str) -> tuple[Param, ...]:
    """The method's parameters; outside mergekit compat the TIES weight defaults to 1 (the papers have none)."""
    if compat == "mergekit":
        return method.params
    return tuple(Param(p.name, p.scope, p.kind, 1.0) if p.name == "weight" else p for p in method.params)


@dataclass(frozen=True)
class Inputs:
    """The models one tensor is merged from (the whole config's, or one slice's), where each one's parameter
    settings come from (highest precedence first), and where the shared parameters come from."""

    where: str
    labels: tuple[str, ...]
    params: tuple[tuple[dict[str, Any], ...], ...]
    shared: tuple[dict[str, Any], ...]
    base_index: int | None
    models: tuple[int, ...]                          # indices into cfg.models


def input_groups(cfg: MergeConfig) -> list[Inputs]:
    """The ``models:`` form as one group; the ``slices:`` form as one group per slice."""
    if cfg.slices is None:
        bi = cfg.models.index(cfg.base) if cfg.base is not None else None
        return [Inputs("models", tuple(m.label for m in cfg.models),
                       tuple((m.parameters, cfg.module_parameters, cfg.parameters) for m in cfg.models),
                       (cfg.module_parameters, cfg.parameters), bi,
                       tuple(range(len(cfg.models))))]
    groups = []
    for i, sl in enumerate(cfg.slices):
        idx = tuple(s.model for s in sl.sources)
        if sl.base is not None and sl.base not in idx:
            raise ConfigError(f"slices[{i}]: base_model {cfg.models[sl.base].label} is not among its sources "
                              "(list it with a layer_range)")
        groups.append(Inputs(f"slices[{i}]", tuple(cfg.models[j].label for j in idx),
                             tuple((s.parameters, sl.parameters, cfg.module_parameters, cfg.parameters)
                                   for s in sl.sources),
                             (sl.parameters, cfg.module_parameters, cfg.parameters),
                             None if sl.base is None else idx.index(sl.base), idx))
    return groups


def _check_counts(m: Method, g: Inputs, where: str) -> None:
    if m.base == "required" and g.base_index is None:
        raise ConfigError(f"merge_method {m.name} needs 'base_model'{where}")
    if m.base == "forbidden" and g.base_index is not None:
        raise ConfigError(f"merge_method {m.name} takes no 'base_model'{where}")
    n = len(g.labels)
    if n < m.min_inputs or (m.max_inputs is not None and n > m.max_inputs):
        want = f"{m.min_inputs}" if m.max_inputs == m.min_inputs else f"{m.min_inputs}..{m.max_inputs or 'any'}"
        raise ConfigError(f"merge_method {m.name} takes {want} models (base included), got {n}{where}")
    k = n - (g.base_index is not None)
    lo = max(m.min_nonbase, 1 if (m.store or m.base == "required") else 0)
    if k < lo:
        only = g.labels[g.base_index] if g.base_index is not None else "one model"
        raise ConfigError(f"merge_method {m.name} needs at least {'one model' if lo == 1 else f'{lo} models'} "
                          f"besides the base (lists only {only}){where}")
    if m.max_nonbase is not None and k > m.max_nonbase:
        raise ConfigError(f"merge_method {m.name} takes {'exactly' if lo == m.max_nonbase else 'at most'} "
                          f"{m.max_nonbase} models besides the base, got {k}{where}")


def validate(m: Method, cfg: MergeConfig, methods: dict[str, Method]) -> None:
    """The checks every method shares (base policy, input counts, parameter names, scopes and ranges, the
    method-specific ``fastmerge:`` options), then the method's own. ``methods`` (the registry) names the
    methods an option does apply to."""
    compat = cfg.options.get("compat", "mergekit")
    groups = input_groups(cfg)
    whole = [why for why, on in (("a multi-task store", m.store), ("whole-model statistics", m.prepare),
                                 ("same-shape stacks", m.batch), ("global trim", cfg.options.get("trim")
                                                                  == "global")) if on]
    if cfg.slices is not None and whole:
        raise ConfigError(f"slices: merge_method {m.name} works on {whole[0]} of whole models; list whole "
                          "models under 'models:'")
    if cfg.tokenizer is not None and whole:
        key = "tokenizer_source" if "tokenizer_source" in cfg.raw else "tokenizer"
        raise ConfigError(f"{key}: merge_method {m.name} works on {whole[0]} of the models as they are; it "
                          "cannot re-index their vocabularies (leave the key out to keep the base's tokenizer)")
    for g in groups:
        _check_counts(m, g, "" if cfg.slices is None else f" in {g.where}")
    names = {p.name: p for p in param_specs(m, compat)}
    if "int8_mask" in cfg.parameters and "int8_mask" in names:
        warnings.warn("parameters.int8_mask: ignored (mergekit stores its masks as int8 to save memory; fastmerge's "
                      "kernels never materialise float masks), the result is the same", stacklevel=2)
    def leftover(k: str, where: str) -> None:
        if k not in MERGEKIT_PARAMS:
            raise ConfigError(f"{where}: not a parameter of {m.name}; expected one of {', '.join(names)}")
        warnings.warn(f"{where}: {m.name} takes no {k!r}; ignored, as mergekit does", stacklevel=3)

    shared = [("parameters", cfg.parameters), ("modules.parameters", cfg.module_parameters)] + [
        (f"slices[{i}].parameters", sl.parameters) for i, sl in enumerate(cfg.slices or ())]
    for who, settings in shared:  # global and slice settings: any parameter of the method
        for k, v in settings.items():
            if k not in names:
                leftover(k, f"{who}.{k}")
                continue
            for leaf in _leaves(v):
                _check_range(names[k], leaf, f"{who}.{k}")
    per_input = ([(f"models[{i}] ({model.label})", model.parameters) for i, model in enumerate(cfg.models)]
                 if cfg.slices is None else
                 [(f"slices[{i}].sources[{j}] ({cfg.models[s.model].label})", s.parameters)
                  for i, sl in enumerate(cfg.slices) for j, s in enumerate(sl.sources)])
    for who, settings in per_input:
        for k, v in settings.items():
            p = names.get(k)
            where = f"{who}.parameters.{k}"
            if p is None:
                leftover(k, where)
                continue
            if p.scope == SHARED:
                raise ConfigError(f"{where}: {k} is a global parameter of {m.name}; set it under the top-level "
                                  "'parameters:'")
            for leaf in _leaves(v):
                _check_range(p, leaf, where)
    if cfg.options.get("trim") == "global":
        if not m.global_trim:
            who = ", ".join(n for n, x in methods.items() if x.global_trim)
            raise ConfigError(f"fastmerge.trim: global applies to {who}, not {m.name}")
        density = names["density"].default
        for model in cfg.experts:
            d = model.parameters.get("density", cfg.parameters.get("density", density))
            if not isinstance(d, (int, float)) or isinstance(d, bool):
                raise ConfigError(f"fastmerge.trim: global needs one density per model; {model.label} has {d!r}")
    specific = {k for x in methods.values() for k in x.options}
    for k in cfg.options:
        if k in specific and k not in m.options:
            who = ", ".join(n for n, x in methods.items() if k in x.options)
            raise ConfigError(f"fastmerge.{k}: applies to {who}, not {m.name}")
    if compat != "mergekit" and not m.compat:
        who = ", ".join(n for n, x in methods.items() if x.compat)
        raise ConfigError(f"fastmerge.compat: {compat} changes the semantics of {who} only, not {m.name}")
    if m.check is not None:
        m.check(cfg)


def resolve(m: Method, cfg: MergeConfig, tensor: str, t: float,
            group: Inputs | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Shared and per-input parameter values for one tensor of ``group`` (default: the ``models:`` form's one
    group), in mergekit's precedence: the input's own settings, then its slice's, then the global ones."""
    specs = param_specs(m, cfg.options.get("compat", "mergekit"))
    if group is None:
        group = input_groups(cfg)[0]

    def value(p: Param, sources: tuple[dict, ...], where: str) -> Any:
        for src in sources:
            if p.name in src:
                v = evaluate(src[p.name], tensor, t, p.kind, f"{where}.{p.name}")
                if v is not None:
                    return v
        if p.default is REQUIRED:
            raise ConfigError(f"{where}: missing required parameter {p.name!r} of {m.name} (tensor {tensor})")
        return p.default

    shared = {p.name: value(p, group.shared, "parameters") for p in specs if p.scope == SHARED}
    per_input = []
    for i, (label, sources) in enumerate(zip(group.labels, group.params, strict=True)):
        is_base = i == group.base_index
        per_input.append({p.name: value(p, sources, label) for p in specs
                          if p.scope == INPUT or (p.scope == NONBASE and not is_base)})
        d, eps = per_input[-1].get("density"), per_input[-1].get("epsilon")
        if eps is not None and 0 < d < 1 and not (d - eps > 0 and d + eps < 1):
            raise ConfigError(f"{label}: della needs density ± epsilon inside (0, 1); tensor {tensor} has "
                              f"density {d:g}, epsilon {eps:g}")
    return shared, per_input
