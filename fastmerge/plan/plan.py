"""Plan: open every model's safetensors headers (nothing else is read), check that each model has the base's
tensor names, shapes and floating dtypes, and freeze one job per output tensor with its input locations and
its resolved parameters. Every error is raised here, before anything is written."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..config import MergeConfig, layer_index, layer_t
from ..io import SIDE_FILES, Checkpoint, CheckpointError
from ..methods import Method, resolve
from .jobs import Job
from .schedule import order


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _resolver(cfg: MergeConfig) -> Callable[[str, float], tuple]:
    """methods.resolve for one config, memoised: a tensor's parameters depend only on its layer position and
    on which of the config's filter substrings its name contains, so a model of 100 000s of tensors resolves
    a handful of distinct cases instead of evaluating every setting per tensor and model."""
    filters: set[str] = set()

    def collect(x: Any) -> None:
        if isinstance(x, dict):
            if x.get("filter") is not None:
                filters.add(str(x["filter"]))
            for v in x.values():
                collect(v)
        elif isinstance(x, list):
            for v in x:
                collect(v)

    collect(cfg.parameters)
    for m in cfg.models:
        collect(m.parameters)
    flt = sorted(filters)
    cache: dict[tuple, tuple] = {}

    def resolve_one(name: str, t: float) -> tuple:
        key = (t, *(f in name for f in flt))
        hit = cache.get(key)
        if hit is None:  # shared between jobs: nothing downstream writes into them
            hit = cache[key] = resolve(cfg, name, t)
        return hit

    return resolve_one


def _num_layers(path: str) -> int | None:
    cfg = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if cfg and os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                c = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        c = c.get("text_config", c) if isinstance(c, dict) else {}
        for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if isinstance(c.get(k), int):
                return c[k]
    return None


def reference(cfg: MergeConfig, ckpts: list[Checkpoint]) -> Checkpoint:
    """The model whose names, order and side files the output takes: the base, else the first model."""
    return ckpts[cfg.models.index(cfg.base)] if cfg.base is not None else ckpts[0]


def side_source(ref: Checkpoint) -> str | None:
    """The directory of the reference model's side files (config.json, tokenizer...), if it is one."""
    return ref.path if os.path.isdir(ref.path) else None


def check_side_files(ref: Checkpoint) -> None:
    """The reference's JSON side files are read and checked at plan time: a corrupt one fails before anything
    is merged, naming the file, instead of after the whole merge."""
    src = side_source(ref)
    if src is None:
        return
    for f in SIDE_FILES:
        p = os.path.join(src, f)
        if not f.endswith(".json") or not os.path.isfile(p):
            continue
        try:
            with open(p, "rb") as fh:
                doc = json.loads(fh.read())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{ref.name}: {p} is not valid JSON ({str(e)[:200]})") from None
        if f == "config.json" and not isinstance(doc, dict):
            raise CheckpointError(f"{ref.name}: {p} must hold a JSON object")


def _check_names(cfg: MergeConfig, ckpts: list[Checkpoint], ref: Checkpoint) -> None:
    policy = cfg.options.get("extra_tensors", "error")
    for ck in ckpts:
        missing = [n for n in ref.tensors if n not in ck.tensors]
        if missing and ck is not ref:
            raise CheckpointError(f"model {ck.name} lacks tensor {missing[0]!r} of {ref.name}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [n for n in ck.tensors if n not in ref.tensors]
        if extra:
            msg = (f"model {ck.name} has {len(extra)} tensor(s) that {ref.name} lacks, e.g. {extra[0]!r}")
            if policy == "error":
                raise CheckpointError(msg + "; the output would be without them. To merge anyway, leaving "
                                      "them out, set fastmerge: {extra_tensors: ignore}")
            warnings.warn(msg + "; they are not merged (fastmerge.extra_tensors: ignore)", stacklevel=3)


def build(cfg: MergeConfig, method: Method, ckpts: list[Checkpoint]) -> list[Job]:
    """One frozen job per output tensor, in schedule order (fastmerge.plan.schedule.order)."""
    ref = reference(cfg, ckpts)
    _check_names(cfg, ckpts, ref)
    L = _num_layers(ref.path)
    if L is None:
        idx = [layer_index(n) for n in ref.tensors]
        L = max((i for i in idx if i is not None), default=-1) + 1
    resolve_one = _resolver(cfg)
    check_side_files(ref)
    jobs = []
    for ti in order(ref.tensors.values()):
        name = ti.name
        infos = tuple(ck.tensors[name] for ck in ckpts)
        floating = ti.dtype.is_floating_point
        for ck, inf in zip(ckpts, infos, strict=True):
            if inf.shape != ti.shape:
                raise CheckpointError(f"{ck.name}: {inf.file}: tensor {name!r} has shape {list(inf.shape)}, "
                                      f"{ref.name} has {list(ti.shape)}")
            if inf.dtype.is_floating_point != floating:
                raise CheckpointError(f"{ck.name}: {inf.file}: tensor {name!r} is {inf.dtype}, {ref.name} has "
                                      f"{ti.dtype}: a floating tensor can only be merged with floating ones")
            if floating and cfg.dtype is None and inf.dtype != ti.dtype:
                raise CheckpointError(f"{ck.name}: {inf.file}: tensor {name!r} is {_dname(inf.dtype)}, "
                                      f"{ref.name} has {_dname(ti.dtype)}; set `dtype:` in the config (e.g. "
                                      "dtype: float32) to merge models stored in different dtypes")
        if not floating:
            jobs.append(Job(name, ti.shape, (ti,), False, ti.dtype, {}, ()))
            continue
        shared, per_input = resolve_one(name, layer_t(name, L))
        out_dtype = cfg.out_dtype or cfg.dtype or ti.dtype
        jobs.append(Job(name, ti.shape, infos, True, out_dtype, shared, tuple(per_input)))
    return jobs
