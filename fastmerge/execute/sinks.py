"""Sinks: where a merge's results go. A method with a ``sink`` writes a multi-task store (its layout and
reader are in fastmerge.store); every other method's results go to :func:`write_model`, one HF safetensors
model. A sink gets the run (fastmerge.execute.executor.Executor) and the output directory, streams the run's
units through the executor with a writer of its own, and returns the summary's extras (``bytes_written``
among them)."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings

import numpy as np
import torch

from .. import chat_templates
from ..config import LAYER_KEYS, out_layers
from ..io import OWNER, SIDE_FILES, OutputDir, ShardedWriter
from ..plan.jobs import Group
from ..store import FORMAT

RECORD = "fastmerge_config.yml"
MERGEKIT_RECORD = "mergekit_config.yml"
# what mergekit's --copy-tokenizer copies (generation_config.json among them)
TOKENIZER_FILES = frozenset({"generation_config.json", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
                             "added_tokens.json", "chat_template.jinja"})


def write_model(run, od: OutputDir) -> dict:
    """The default sink: one model, tensors in the plan's order, into sharded safetensors files; every merged
    tensor is checked for NaN/inf on the writer thread."""
    layout = [(j.name, j.out_dtype, j.shape) for j in run.jobs]
    w = ShardedWriter(od.tmp, layout, run.out_shard_bytes, metadata={"merged_by": "fastmerge"})
    try:
        def write(r) -> None:
            if isinstance(r[0], Group):
                for j, t in zip(r[0].jobs, r[1], strict=True):
                    run.check_finite(j, t)
                    w.write(j.name, t)
                return
            run.check_finite(r[0], r[1])
            w.write(r[0].name, r[1])

        run.stream(run.units(), run.merge, f"{run.cfg.method}", write=write)
        w.finish()
    finally:
        w.close()
    return {"bytes_written": w.bytes_written}


def copy_side_files(run, directory: str, tokenizer: bool = True) -> None:
    """The base's side files (config.json, tokenizer...) into ``directory``; a model's config.json gets the
    output's floating dtype. ``tokenizer=False`` (mergekit's --no-copy-tokenizer): config.json only, and the
    sentence-transformers module files."""
    src = run.side_source()
    built = run.vocab is not None  # the config's own tokenizer replaces the base's tokenizer files
    for f in SIDE_FILES if src is not None else ():
        if (not tokenizer or built) and f in TOKENIZER_FILES:
            continue
        p = os.path.join(src, f)
        if not os.path.isfile(p):
            continue
        if f == "config.json" and not run.method.store:
            _write_config(run, p, os.path.join(directory, f))
        else:
            shutil.copy2(p, os.path.join(directory, f))
    if built:
        run.vocab.save(directory)
    _write_chat_template(run, directory, tokenizer or built)


def _write_chat_template(run, directory: str, tokenizer: bool) -> None:
    """The config's chat_template into the copied tokenizer files (as mergekit: a warning where there are none)."""
    cfg = run.cfg
    if cfg.chat_template is None:
        return
    template = chat_templates.resolve(cfg.chat_template, [m.path for m in cfg.models if os.path.isdir(m.path)])
    if template is None:
        warnings.warn("chat_template: auto, but no input model has a chat template; none is written", stacklevel=2)
    elif not (tokenizer and chat_templates.write(directory, template)):
        warnings.warn("chat_template: no tokenizer is written (--no-copy-tokenizer, or the base has no "
                      "tokenizer_config.json), so the chat template is not saved", stacklevel=2)


def _write_config(run, src: str, dst: str) -> None:
    """config.json from the base, with its dtype set to the output's floating dtype and, for a ``slices:``
    merge, its layer count (and per-layer lists such as ``layer_types``) set to the output's layers."""
    with open(src) as f:
        c = json.load(f)
    fl = [j.out_dtype for j in run.jobs if j.floating]
    if fl and isinstance(c, dict):
        name = str(fl[0]).replace("torch.", "")
        for k in ("torch_dtype", "dtype"):
            if k in c:
                c[k] = name
    if run.cfg.slices is not None and isinstance(c, dict):
        _set_layers(c.get("text_config", c), out_layers(run.cfg))
    if run.vocab is not None and isinstance(c, dict):
        c.get("text_config", c)["vocab_size"] = run.vocab.size
    with open(dst, "w") as f:
        json.dump(c, f, indent=2)


def _set_layers(c: dict, layers: list[tuple[int, int]]) -> None:
    """The layer count under the key the config uses, and every per-layer list (``layer_types``...)
    rebuilt from the entries of the layers the output's layers come from."""
    key = next((k for k in LAYER_KEYS if isinstance(c.get(k), int)), "num_hidden_layers")
    n = c.get(key)
    for k, v in c.items():
        if "layer" in k and isinstance(v, list) and n and len(v) == n:
            c[k] = [v[min(src, n - 1)] for _, src in layers]
    c[key] = len(layers)


def write_record(run, directory: str) -> None:
    """fastmerge_config.yml: the config as given, and what it resolved to, beside the output."""
    import yaml

    from .._version import __version__

    rec = {"fastmerge_version": __version__, "seed": run.seed, "device": str(run.device),
           "config": dict(run.cfg.raw), "resolved": {"models": [m.path for m in run.cfg.models],
                                                     "base_model": run.cfg.base.path if run.cfg.base else None,
                                                     "dtype": str(run.cfg.dtype), "out_dtype": str(run.cfg.out_dtype),
                                                     "options": run.cfg.options, "stats": run.stats}}
    with open(os.path.join(directory, RECORD), "w") as f:
        yaml.safe_dump(json.loads(json.dumps(rec, default=str)), f, sort_keys=False)


def write_mergekit_files(run, directory: str, source: str | None, card: bool, name: str) -> None:
    """What mergekit writes beside a merged model: ``mergekit_config.yml`` (the config as given) and, with
    ``card``, a README.md model card (Hugging Face metadata, the method, the models, the config)."""
    import yaml

    cfg = run.cfg
    if source is None:
        source = yaml.safe_dump(json.loads(json.dumps(cfg.raw, default=str)), sort_keys=False)
    with open(os.path.join(directory, MERGEKIT_RECORD), "w", encoding="utf-8") as f:
        f.write(source)
    if not card:
        return
    labels = [m.label for m in cfg.models]
    base = cfg.base.label if cfg.base is not None else None
    meta = {"base_model": sorted(set(labels)), "library_name": "transformers", "tags": ["mergekit", "merge",
                                                                                     "fastmerge"]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", f"# {name}", "",
             f"A merge of {len(labels)} models made with fastmerge (mergekit-compatible configuration), "
             f"method `{cfg.method}`.", ""]
    if base is not None:
        lines += [f"Base model: `{base}`.", ""]
    lines += ["Models:", "", *(f"- `{x}`" for x in labels if x != base), "", "Configuration:", "", "```yaml",
              source.rstrip("\n"), "```", ""]
    with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------
# multi-task stores (layout: fastmerge.store)


def _dir_bytes(path: str) -> int:
    """The bytes of the files under ``path``, without the temporary directory's owner file (it holds a PID,
    whose length would make the recorded size differ from run to run)."""
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs if f != OWNER)


def task_names(cfg) -> list[str]:
    T = len(cfg.experts)
    names = cfg.options.get("tasks") or [os.path.basename(os.path.normpath(m.path)) for m in cfg.experts]
    if len(names) != T or len(set(names)) != T:
        raise ValueError(f"fastmerge.tasks must name each of the {T} non-base models once, got {names}")
    return list(names)


def _copy_base_side_files(run, od: OutputDir) -> None:
    src = run.side_source()
    if src:
        for f in os.listdir(src):
            p = os.path.join(src, f)
            if os.path.isfile(p) and not f.endswith(".safetensors") and f != "model.safetensors.index.json":
                shutil.copy2(p, os.path.join(od.sub("base"), f))


def finish_store(run, od: OutputDir, names: list[str], scales: list[float], bytes_written: int,
                 **extra) -> dict:
    cfg, jobs = run.cfg, run.jobs
    T = len(names)
    _copy_base_side_files(run, od)
    one_model = sum(j.out_bytes for j in jobs)
    size = _dir_bytes(od.tmp)
    meta = {"format": FORMAT, "version": 1, "method": cfg.method, "tasks": names, "scales": scales,
            "experts": [m.path for m in cfg.experts], "base": cfg.base.path,
            "bytes": size, "bytes_of_separate_models": one_model * T,
            "size_ratio": size / max(one_model * T, 1), **extra}
    with open(os.path.join(od.tmp, "store.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return {"bytes_written": bytes_written, "tasks": names, "scales": scales, "store_bytes": size,
            "size_ratio": meta["size_ratio"], **extra}


def base_layout(run) -> list:
    cfg, bi = run.cfg, run.cfg.models.index(run.cfg.base)
    return [(j.name, (cfg.dtype or j.sources[bi].dtype) if j.floating else j.out_dtype, j.shape) for j in run.jobs]


def stream_stacks(run, writers: list[ShardedWriter], items_of) -> None:
    """Stream the run's units (same-shape stacks) into ``writers``: every tensor's base values into
    writers[0], and ``items_of([(job, inputs)] of the floating jobs)`` -> [(writer, name, tensor)] for the rest."""
    bi = run.cfg.models.index(run.cfg.base)

    def one(unit, tensors):
        group = unit.jobs if isinstance(unit, Group) else (unit,)
        tensors = tensors if isinstance(unit, Group) else [tensors]
        items = [(writers[0], j.name, ts[bi]) for j, ts in zip(group, tensors, strict=True)]
        fl = [(j, ts) for j, ts in zip(group, tensors, strict=True) if j.floating]
        return items + (items_of(fl) if fl else [])

    def write(items):
        for w, name, t in items:
            w.write(name, t.contiguous())

    try:
        run.stream(run.units(), one, f"{run.cfg.method} store", write=write)
        for w in writers:
            w.finish()
    finally:
        for w in writers:
            w.close()


def write_task_vector_store(run, od: OutputDir) -> dict:
    """Stream stacks of same-shape tensors through the method's ``batch`` (which gives (T, *shape) task vectors
    per tensor) into task_vectors/."""
    names = task_names(run.cfg)
    T = len(names)
    tv_layout = [(j.name, j.out_dtype, (T, *j.shape)) for j in run.jobs if j.floating]
    wb = ShardedWriter(od.sub("base"), base_layout(run), run.out_shard_bytes)
    wt = ShardedWriter(od.sub("task_vectors"), tv_layout, run.out_shard_bytes)

    def vectors(fl):
        vecs = run.method.batch([run.tensor_call(j, ts) for j, ts in fl])
        return [(wt, j.name, v.to(j.out_dtype)) for (j, _), v in zip(fl, vecs, strict=True)]

    stream_stacks(run, [wb, wt], vectors)
    return finish_store(run, od, names, [1.0] * T, wb.bytes_written + wt.bytes_written, kind="task_vectors")


def write_mask_store(run, od: OutputDir, *, parts, rescale: bool) -> dict:
    """A shared tensor + one packed mask per task (TALL, EMR), streamed from the run's jobs into ``od``.
    ``parts(call)`` -> (shared, masks (T, ...), stats (T, 2)); ``rescale``: per-task scales from the stats
    (EMR's sum of mean|tau_t| over that of mean|tau_uni * mask_t|), else 1."""
    cfg, jobs = run.cfg, run.jobs
    names = task_names(cfg)
    T = len(names)
    fl = [j for j in jobs if j.floating]
    bi = cfg.models.index(cfg.base)
    layout = base_layout(run)
    shared_layout = [(j.name, j.out_dtype, j.shape) for j in fl]
    mask_layout = [(j.name, torch.uint8, (T, math.ceil(j.numel / 8))) for j in fl]
    wb = ShardedWriter(od.sub("base"), layout, run.out_shard_bytes)
    ws = ShardedWriter(od.sub("shared"), shared_layout, run.out_shard_bytes)
    wm = ShardedWriter(od.sub("masks"), mask_layout, run.out_shard_bytes)
    # EMR's rescalers: sum over tensors of mean|tau_t| and of mean|tau_uni * mask_t|
    num = torch.zeros(T, dtype=torch.float64)
    den = torch.zeros(T, dtype=torch.float64)

    def one(job, tensors):
        if not job.floating:
            return [(wb, job.name, tensors[0])]
        shared, masks, stats = parts(run.tensor_call(job, tensors))
        if job.numel:
            num.add_(stats[:, 0].cpu() / job.numel)
            den.add_(stats[:, 1].cpu() / job.numel)
        packed = torch.from_numpy(np.packbits(masks.reshape(T, -1).cpu().numpy(), axis=1))
        return [(wb, job.name, tensors[bi]), (ws, job.name, shared.to(job.out_dtype)), (wm, job.name, packed)]

    def write(items):
        for w, name, t in items:
            w.write(name, t)

    try:
        run.stream(jobs, one, f"{cfg.method} store", write=write)
        for w in (wb, ws, wm):
            w.finish()
    finally:
        for w in (wb, ws, wm):
            w.close()
    if rescale:
        scales = torch.where(den > 0, num / den.clamp(min=1e-300), torch.ones_like(num)).tolist()
    else:
        scales = [1.0] * T
    return finish_store(run, od, names, scales, wb.bytes_written + ws.bytes_written + wm.bytes_written)
