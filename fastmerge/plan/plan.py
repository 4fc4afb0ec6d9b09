"""Plan: open every model's safetensors headers (nothing else is read), check that each model has the base's
tensor names, shapes and floating dtypes, and freeze one job per output tensor with its input locations and
its resolved parameters. Every error is raised here, before anything is written."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..config import _LAYER, LAYER_KEYS, ConfigError, MergeConfig, layer_index, layer_t
from ..io import SIDE_FILES, Checkpoint, CheckpointError, TensorInfo, read_model_config
from ..methods import Method, get
from ..methods.base import Inputs, input_groups
from ..methods.base import resolve as resolve_in
from .jobs import Job
from .schedule import order


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _resolver(cfg: MergeConfig, group: Inputs) -> Callable[[str, float], tuple]:
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
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)

    collect(group.shared)
    collect(group.params)
    flt = sorted(filters)
    method = get(cfg.method)
    cache: dict[tuple, tuple] = {}

    def resolve_one(name: str, t: float) -> tuple:
        key = (t, *(f in name for f in flt))
        hit = cache.get(key)
        if hit is None:  # shared between jobs: nothing downstream writes into them
            hit = cache[key] = resolve_in(method, cfg, name, t, group)
        return hit

    return resolve_one


def num_layers(ck: Checkpoint) -> int:
    """The model's layer count: config.json's, else one more than the highest layer index of its tensors."""
    c = read_model_config(ck.path) or {}
    for k in LAYER_KEYS:
        if isinstance(c.get(k), int) and not isinstance(c.get(k), bool):
            return c[k]
    return max((i for i in map(layer_index, ck.tensors) if i is not None), default=-1) + 1


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


def _check_input(cfg: MergeConfig, ck: Checkpoint, inf: TensorInfo, ref: Checkpoint, ti: TensorInfo,
                 vocab: bool = False) -> None:
    """One input of a floating or non-floating tensor against the reference's: same shape (but for the token
    rows of a ``vocab`` tensor), same kind, and the same dtype unless the config casts."""
    name = ti.name
    if (inf.shape[1:] != ti.shape[1:] or len(inf.shape) != len(ti.shape)) if vocab else inf.shape != ti.shape:
        raise CheckpointError(f"{ck.name}: {inf.file}: tensor {inf.name!r} has shape {list(inf.shape)}, "
                              f"{ref.name} has {list(ti.shape)}" + (f" ({name!r})" if name != inf.name else ""))
    floating = ti.dtype.is_floating_point
    if inf.dtype.is_floating_point != floating:
        raise CheckpointError(f"{ck.name}: {inf.file}: tensor {inf.name!r} is {inf.dtype}, {ref.name} has "
                              f"{ti.dtype}: a floating tensor can only be merged with floating ones")
    if floating and cfg.dtype is None and inf.dtype != ti.dtype:
        raise CheckpointError(f"{ck.name}: {inf.file}: tensor {inf.name!r} is {_dname(inf.dtype)}, "
                              f"{ref.name} has {_dname(ti.dtype)}; set `dtype:` in the config (e.g. "
                              "dtype: float32) to merge models stored in different dtypes")


def _job(cfg: MergeConfig, name: str, ti: TensorInfo, ri: int, infos: tuple[TensorInfo, ...], g: Inputs,
         resolve_one: Callable[[str, float], tuple], t: float, vocab=None) -> Job:
    """The job writing ``name`` from ``infos`` (one per model of ``g``); ``ti`` is the reference's tensor,
    from checkpoint ``ri``: a tensor that is not floating is copied from it. With ``vocab`` (the output
    tokenizer), a token-indexed tensor gets the output vocabulary's rows."""
    if not ti.dtype.is_floating_point:
        return Job(name, ti.shape, (ti,), False, ti.dtype, {}, (), (ri,), None)
    shared, per_input = resolve_one(name, t)
    out_dtype = cfg.out_dtype or cfg.dtype or ti.dtype
    shape = (vocab.size, *ti.shape[1:]) if vocab is not None else ti.shape
    return Job(name, shape, infos, True, out_dtype, shared, tuple(per_input), g.models, g.base_index,
               vocab is not None)


def _vocab_of(vocab, name: str, shape: tuple[int, ...]):
    """The output tokenizer if ``name`` is a token-indexed tensor to re-index, else None."""
    from ..tokenizer import VOCAB_TENSOR

    return vocab if vocab is not None and len(shape) >= 1 and VOCAB_TENSOR.search(name) else None


def build(cfg: MergeConfig, method: Method, ckpts: list[Checkpoint], vocab=None) -> list[Job]:
    """One frozen job per output tensor, in schedule order (fastmerge.plan.schedule.order); ``vocab`` is the
    output tokenizer (fastmerge.tokenizer.Vocabulary) when the config builds one."""
    if cfg.slices is not None:
        return _build_slices(cfg, ckpts, vocab)
    ref = reference(cfg, ckpts)
    ri = ckpts.index(ref)
    _check_names(cfg, ckpts, ref)
    L = num_layers(ref)
    (g,) = input_groups(cfg)
    resolve_one = _resolver(cfg, g)
    check_side_files(ref)
    jobs = []
    for ti in order(ref.tensors.values()):
        infos = tuple(ck.tensors[ti.name] for ck in ckpts)
        v = _vocab_of(vocab, ti.name, ti.shape)
        for ck, inf in zip(ckpts, infos, strict=True):
            _check_input(cfg, ck, inf, ref, ti, v is not None)
        jobs.append(_job(cfg, ti.name, ti, ri, infos, g, resolve_one, layer_t(ti.name, L), v))
    return jobs


_PRE = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|wte|wpe|word_embeddings|tok_embeddings|embeddings)(?:\.|$)")


def renumber(name: str, layer: int) -> str:
    """``name`` (a layer's tensor) moved to layer ``layer``."""
    m = _LAYER.search(name)
    return name[:m.start(1)] + str(layer) + name[m.end(1):]


def _build_slices(cfg: MergeConfig, ckpts: list[Checkpoint], vocab=None) -> list[Job]:
    """mergekit's slice plan: the tensors before the layers (embeddings) merged over the first slice's sources,
    each slice's layers over its sources, layer by layer, renumbered consecutively (gradients run over the
    slice, t = i / (n - 1)), then the tensors after the layers (norm, head) over the last slice's sources, as
    many of them as the first slice has."""
    groups = input_groups(cfg)
    layers: list[dict[int, list[str]]] = []
    for ck in ckpts:
        by: dict[int, list[str]] = {}
        for n in ck.tensors:
            i = layer_index(n)
            if i is not None:
                by.setdefault(i, []).append(n)
        layers.append(by)
    for g, sl in zip(groups, cfg.slices, strict=True):
        for j, s in enumerate(sl.sources):
            L = num_layers(ckpts[s.model])
            if s.stop > L:
                raise ConfigError(f"{g.where}.sources[{j}]: layer_range [{s.start}, {s.stop}] runs past "
                                  f"{ckpts[s.model].name}'s {L} layers")
    ref = reference(cfg, ckpts)
    check_side_files(ref)
    jobs: list[Job] = []

    def add(g: Inputs, names: list[tuple[str, list[str]]], t: float, resolve_one) -> None:
        for out, ins in names:
            infos = []
            for k, n in zip(g.models, ins, strict=True):
                inf = ckpts[k].tensors.get(n)
                if inf is None:
                    raise CheckpointError(f"model {ckpts[k].name} lacks tensor {n!r} ({g.where}, output {out!r})")
                infos.append(inf)
            ti = infos[0]
            v = _vocab_of(vocab, out, ti.shape)
            for k, inf in zip(g.models, infos, strict=True):
                _check_input(cfg, ckpts[k], inf, ckpts[g.models[0]], ti, v is not None)
            jobs.append(_job(cfg, out, ti, g.models[0], tuple(infos), g, resolve_one, t, v))

    outside = [n for n in ckpts[groups[0].models[0]].tensors if layer_index(n) is None]
    first, last = groups[0], groups[-1]
    n0 = len(first.models)
    last = Inputs(last.where, last.labels[:n0], last.params[:n0], last.shared,
                  last.base_index if last.base_index is not None and last.base_index < n0 else None, last.models[:n0])
    pre = [(n, [n] * len(first.models)) for n in outside if _PRE.search(n)]
    add(first, pre, 0.0, _resolver(cfg, first))
    o = 0
    for g, sl in zip(groups, cfg.slices, strict=True):
        resolve_one = _resolver(cfg, g)
        by = layers[sl.sources[0].model]
        for i in range(sl.num_layers):
            t = i / (sl.num_layers - 1) if sl.num_layers > 1 else 1.0
            names = [(renumber(n, o), [renumber(n, s.start + i) for s in sl.sources])
                     for n in sorted(by.get(sl.sources[0].start + i, ()), key=lambda n: ckpts[sl.sources[0].model]
                                     .tensors[n].start)]
            add(g, names, t, resolve_one)
            o += 1
    post = [(n, [n] * len(last.models)) for n in outside if not _PRE.search(n)]
    add(last, post, 0.0, _resolver(cfg, last))
    return jobs
