"""DOGE_TA and DOGE_AM as merge methods: their parameters, the layer rule (``fastmerge.doge_layers``), the
streaming statistics pass (each task's global top-K magnitude threshold) and the per-stack merge on
fastmerge.algo.doge's optimiser."""

from __future__ import annotations

from typing import Any

import torch

from ..algo.doge import doge_am_vectors, doge_ta_update
from ..config import ConfigError, layer_index
from ..execute import sinks
from ..plan.stats import magnitude_thresholds
from .base import SHARED, Method, Param
from .registry import register
from .subspace import svd_mode, task_stack

DEFAULTS = {"eta": 0.07, "density": 0.30, "subspace": 6, "lr": 1e-4, "steps": 400, "beta1": 0.9, "beta2": 0.999,
            "eps": 1e-8}
SELECT = ("auto", "official", "blocks")


def official_layer(name: str) -> bool:
    """FusionBench's DOGE layer rule (CLIP/T5-style names): 'encoder' and 'weight' in the name, no 'layer_norm'."""
    return "encoder" in name and "weight" in name and "layer_norm" not in name


def block_layer(name: str) -> bool:
    """fastmerge's rule for LLM checkpoints: the weights of numbered transformer blocks (model.layers.N.*)."""
    return name.endswith("weight") and layer_index(name) is not None and "norm" not in name


def resolve_rule(rule: str, names: list[tuple[str, tuple[int, ...]]]) -> str:
    """``auto``: the official rule when any 2-D tensor name matches it, else the transformer-block rule."""
    if rule != "auto":
        return rule
    return "official" if any(len(s) == 2 and official_layer(n) for n, s in names) else "blocks"


def selected(name: str, shape: tuple[int, ...], rule: str) -> bool:
    if len(shape) != 2 or min(shape) == 0:
        return False
    return official_layer(name) if rule == "official" else block_layer(name)


def options(opts: dict[str, Any]) -> dict[str, Any]:
    rule = opts.get("doge_layers", "auto")
    if rule not in SELECT:
        raise ConfigError(f"fastmerge.doge_layers: expected one of {', '.join(SELECT)}, got {rule!r}")
    return {"rule": rule, "mode": svd_mode(opts)}


def stats(run) -> None:
    """Pass 1 (and 2 for non-bf16 inputs): each task's global top-K magnitude threshold over the selected layers
    (keep |tau_i| >= threshold, the official k-th-value rule), into run.stats["doge_lo"]."""
    cfg = run.cfg
    o = options(cfg.options)
    jobs = [j for j in run.jobs if j.floating]
    rule = resolve_rule(o["rule"], [(j.name, j.shape) for j in jobs])
    sel = [j for j in jobs if selected(j.name, j.shape, rule)]
    run.stats["doge_rule"] = rule
    run.stats["doge_layers"] = len(sel)
    if not sel:
        raise ConfigError(f"{cfg.method}: no tensor matches the layer rule {rule!r} (fastmerge.doge_layers); "
                          f"e.g. {jobs[0].name if jobs else 'no floating tensors'}")
    density = float(sel[0].shared["density"])
    run.stats["doge_lo"] = magnitude_thresholds(run, sel, [density] * len(cfg.experts), "official")


def _params(call) -> dict[str, Any]:
    return {k: call.shared[k] for k in DEFAULTS}


def merge_stack(calls) -> list[torch.Tensor]:
    """doge_ta on a stack of same-shape tensor calls (TensorCall)."""
    c0 = calls[0]
    if not selected(c0.name, tuple(c0.base.shape), c0.stats["doge_rule"]):
        return [c.base.to(c.out_dtype) for c in calls]
    upd = doge_ta_update(task_stack(calls), c0.stats["doge_lo"], _params(c0), options(c0.options)["mode"])
    return [(c.base.float() + u).to(c.out_dtype) for c, u in zip(calls, upd, strict=True)]


def am_stack(calls) -> list[torch.Tensor]:
    """doge_am's task vectors of a stack of calls: (T, *shape) fp32 each; unselected tensors keep tau_i."""
    c0 = calls[0]
    taus = task_stack(calls)
    if not selected(c0.name, tuple(c0.base.shape), c0.stats["doge_rule"]):
        return list(taus)
    return list(doge_am_vectors(taus, c0.stats["doge_lo"], _params(c0), options(c0.options)["mode"]))


def _check(cfg) -> None:
    options(cfg.options)
    for k in ("steps", "subspace"):
        v = cfg.parameters.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"parameters.{k}: expected an integer >= 1, got {v!r}")


_RANGES = {"density": (0.0, 1.0, True), "subspace": (1, None, False), "steps": (1, None, False),
           "lr": (0.0, None, True), "beta1": (0.0, 1.0, False), "beta2": (0.0, 1.0, False),
           "eps": (0.0, None, True), "eta": (None, None, False)}
_PARAMS = tuple(Param(k, SHARED, int if k in ("subspace", "steps") else float, v, *_RANGES[k])
                for k, v in DEFAULTS.items())
_OPTIONS = frozenset({"doge_layers", "svd"})
register(
    Method("doge_ta", _PARAMS, lambda c: merge_stack([c])[0], min_inputs=2, batch=merge_stack, prepare=stats,
           options=_OPTIONS, check=_check,
           doc="DOGE: projected Adam on a shared modification of the task vectors, adaptive coefficients, global "
               "top-K masks"),
    Method("doge_am", _PARAMS, None, min_inputs=2, sink=sinks.write_task_vector_store, batch=am_stack,
           prepare=stats, options=_OPTIONS, check=_check,
           doc="DOGE_AM: per-task modified task vectors (tau_i + Delta_i) * M_i, as a task-vector store"),
)
