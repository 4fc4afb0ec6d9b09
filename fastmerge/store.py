"""The compact multi-task store written by the per-task methods (TALL masks, EMR, TSV-C), and
``reconstruct``, which rebuilds any one task's model from it.

Layout of a store directory::

    store.json      format, method, task names, per-task scales, sizes
    base/           the pretrained model (HF safetensors + config/tokenizer files)
    shared/         one shared task vector per floating tensor (tau_MTL for TALL, tau_uni for EMR)
    masks/          per floating tensor, uint8 (T, ceil(n/8)): task t's mask, bit-packed (numpy packbits order)

Task t's model is ``base + scale_t * unpack(mask_t) * shared`` (fp32 maths, cast to the base's dtype); tensors
that are not floating are the base's. T masks cost T/8 bytes per parameter: for 8 tasks and a bf16 model the
store is about 2.5x one model instead of 8x.

A TSV-C store has ``factors/`` instead of ``shared/`` and ``masks/``: per matrix, task t's top int(r/T) singular
triplets as ``NAME.U`` (T, m, k), ``NAME.S`` (T, k, fp32) and ``NAME.Vh`` (T, k, n); per other floating tensor
the task vectors ``NAME.tau`` (T, *shape). Task t's model is ``base + U_t diag(S_t) Vh_t`` (``+ tau_t``), which
costs T k (m + n + 1) values per matrix: about one model in all for any T, instead of T.

A task-vector store (``doge_am``) has ``task_vectors/``: per floating tensor the T task vectors as one
(T, *shape) tensor; task t's model is ``base + tau_t``. fastmerge's AdaMerging reads it directly.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import torch

from .io import Checkpoint, OutputDir, ShardedWriter
from .plan import Group
from .signals import interruptible

FORMAT = "fastmerge-multitask-store"


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _task_names(cfg) -> list[str]:
    T = len(cfg.experts)
    names = cfg.options.get("tasks") or [os.path.basename(os.path.normpath(m.path)) for m in cfg.experts]
    if len(names) != T or len(set(names)) != T:
        raise ValueError(f"fastmerge.tasks must name each of the {T} non-base models once, got {names}")
    return list(names)


def _copy_base_side_files(engine, od: OutputDir) -> None:
    src = engine.side_source()
    if src:
        for f in os.listdir(src):
            p = os.path.join(src, f)
            if os.path.isfile(p) and not f.endswith(".safetensors") and f != "model.safetensors.index.json":
                shutil.copy2(p, os.path.join(od.sub("base"), f))


def _finish_meta(engine, od: OutputDir, names: list[str], scales: list[float], bytes_written: int,
                 **extra) -> dict:
    cfg, jobs = engine.cfg, engine.jobs
    T = len(names)
    _copy_base_side_files(engine, od)
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


def _base_layout(engine) -> list:
    cfg, bi = engine.cfg, engine.cfg.models.index(engine.cfg.base)
    return [(j.name, (cfg.dtype or j.sources[bi].dtype) if j.floating else j.out_dtype, j.shape) for j in engine.jobs]


def _stream_stacks(engine, writers: list[ShardedWriter], items_of) -> None:
    """Stream the engine's units (same-shape stacks) into ``writers``: every tensor's base values into
    writers[0], and ``items_of([(job, inputs)] of the floating jobs)`` -> [(writer, name, tensor)] for the rest."""
    bi = engine.cfg.models.index(engine.cfg.base)

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
        engine.stream(engine.units(), one, f"{engine.cfg.method} store", write=write)
        for w in writers:
            w.finish()
    finally:
        for w in writers:
            w.close()


def write_tsvc_store(engine, od: OutputDir) -> dict:
    """TSV-C: stream stacks of same-shape tensors, compress each task vector to its top int(r/T) triplets."""
    from . import svd_methods

    cfg, jobs = engine.cfg, engine.jobs
    names = _task_names(cfg)
    T = len(names)
    o = svd_methods.options(cfg.options, "tsv_c")
    fac_layout, ranks = [], {}
    for j in jobs:
        if not j.floating:
            continue
        if svd_methods.is_matrix(j.name, j.shape, o):
            m, n = j.shape
            k = ranks[j.name] = svd_methods.tsv_c_rank(min(m, n), T)
            fac_layout += [(j.name + ".U", j.out_dtype, (T, m, k)), (j.name + ".S", torch.float32, (T, k)),
                           (j.name + ".Vh", j.out_dtype, (T, k, n))]
        else:
            fac_layout.append((j.name + ".tau", j.out_dtype, (T, *j.shape)))
    wb = ShardedWriter(od.sub("base"), _base_layout(engine), engine.out_shard_bytes)
    wf = ShardedWriter(od.sub("factors"), fac_layout, engine.out_shard_bytes)

    def factors(fl):
        items = []
        for (j, _), parts in zip(fl, svd_methods.tsv_c_factors([engine.tensor_call(j, ts) for j, ts in fl], o),
                                 strict=True):
            if len(parts) == 1:
                items.append((wf, j.name + ".tau", parts[0].to(j.out_dtype)))
            else:
                u, s, vh = parts
                items += [(wf, j.name + ".U", u.to(j.out_dtype)), (wf, j.name + ".S", s.float()),
                          (wf, j.name + ".Vh", vh.to(j.out_dtype))]
        return items

    _stream_stacks(engine, [wb, wf], factors)
    return _finish_meta(engine, od, names, [1.0] * T, wb.bytes_written + wf.bytes_written,
                        ranks_per_task=sorted(set(ranks.values())))


def write_task_vector_store(engine, od: OutputDir) -> dict:
    """Stream stacks of same-shape tensors through the method's ``batch`` (which gives (T, *shape) task vectors
    per tensor) into task_vectors/."""
    names = _task_names(engine.cfg)
    T = len(names)
    tv_layout = [(j.name, j.out_dtype, (T, *j.shape)) for j in engine.jobs if j.floating]
    wb = ShardedWriter(od.sub("base"), _base_layout(engine), engine.out_shard_bytes)
    wt = ShardedWriter(od.sub("task_vectors"), tv_layout, engine.out_shard_bytes)

    def vectors(fl):
        vecs = engine.method.batch([engine.tensor_call(j, ts) for j, ts in fl])
        return [(wt, j.name, v.to(j.out_dtype)) for (j, _), v in zip(fl, vecs, strict=True)]

    _stream_stacks(engine, [wb, wt], vectors)
    return _finish_meta(engine, od, names, [1.0] * T, wb.bytes_written + wt.bytes_written, kind="task_vectors")


def write_mask_store(engine, od: OutputDir, *, parts, rescale: bool) -> dict:
    """A shared tensor + one packed mask per task (TALL, EMR), streamed from the engine's jobs into ``od``.
    ``parts(call)`` -> (shared, masks (T, ...), stats (T, 2)); ``rescale``: per-task scales from the stats
    (EMR's sum of mean|tau_t| over that of mean|tau_uni * mask_t|), else 1."""
    cfg, jobs = engine.cfg, engine.jobs
    names = _task_names(cfg)
    T = len(names)
    fl = [j for j in jobs if j.floating]
    bi = cfg.models.index(cfg.base)
    base_layout = _base_layout(engine)
    shared_layout = [(j.name, j.out_dtype, j.shape) for j in fl]
    mask_layout = [(j.name, torch.uint8, (T, math.ceil(j.numel / 8))) for j in fl]
    wb = ShardedWriter(od.sub("base"), base_layout, engine.out_shard_bytes)
    ws = ShardedWriter(od.sub("shared"), shared_layout, engine.out_shard_bytes)
    wm = ShardedWriter(od.sub("masks"), mask_layout, engine.out_shard_bytes)
    # EMR's rescalers: sum over tensors of mean|tau_t| and of mean|tau_uni * mask_t|
    num = torch.zeros(T, dtype=torch.float64)
    den = torch.zeros(T, dtype=torch.float64)

    def one(job, tensors):
        if not job.floating:
            return [(wb, job.name, tensors[0])]
        shared, masks, stats = parts(engine.tensor_call(job, tensors))
        if job.numel:
            num.add_(stats[:, 0].cpu() / job.numel)
            den.add_(stats[:, 1].cpu() / job.numel)
        packed = torch.from_numpy(np.packbits(masks.reshape(T, -1).cpu().numpy(), axis=1))
        return [(wb, job.name, tensors[bi]), (ws, job.name, shared.to(job.out_dtype)), (wm, job.name, packed)]

    def write(items):
        for w, name, t in items:
            w.write(name, t)

    try:
        engine.stream(jobs, one, f"{cfg.method} store", write=write)
        for w in (wb, ws, wm):
            w.finish()
    finally:
        for w in (wb, ws, wm):
            w.close()
    if rescale:
        scales = torch.where(den > 0, num / den.clamp(min=1e-300), torch.ones_like(num)).tolist()
    else:
        scales = [1.0] * T
    return _finish_meta(engine, od, names, scales, wb.bytes_written + ws.bytes_written + wm.bytes_written)


def reconstruct(store_dir: str, task: str | int, out_dir: str, *, out_shard_size: int | str = "5B",
                quiet: bool = True) -> dict:
    """Write task ``task``'s model (name or index) from a store as an HF safetensors directory."""
    from .io import parse_size

    meta_path = os.path.join(store_dir, "store.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{store_dir} is not a fastmerge store (no store.json)") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a {FORMAT} (format {meta.get('format')!r})")
    tasks = meta["tasks"]
    if isinstance(task, str) and task.isdigit() and task not in tasks:
        task = int(task)
    if isinstance(task, int):
        if not 0 <= task < len(tasks):
            raise ValueError(f"task index {task} out of range: the store has {len(tasks)} tasks {tasks}")
        t = task
    elif task in tasks:
        t = tasks.index(task)
    else:
        raise ValueError(f"task {task!r} is not in the store; it has {tasks}")
    scale = float(meta["scales"][t])
    tsvc = os.path.isdir(os.path.join(store_dir, "factors"))  # TSV-C's layout: base + per-task factors
    tv = meta.get("kind") == "task_vectors"
    parts = ("base", "factors") if tsvc else ("base", "task_vectors") if tv else ("base", "shared", "masks")
    cks = [Checkpoint(os.path.join(store_dir, p), name=f"store {p}") for p in parts]
    base = cks[0]
    names = sorted(base.tensors.values(), key=lambda ti: (ti.file, ti.start))
    layout = [(ti.name, ti.dtype, ti.shape) for ti in names]
    written = 0
    try:
        with interruptible(), OutputDir(out_dir) as od:
            w = ShardedWriter(od.tmp, layout, parse_size(out_shard_size))
            try:
                for ti in names:
                    x = base.read(ti.name)
                    if tsvc:
                        x = _tsvc_task(cks[1], ti.name, t, x)
                    elif tv:
                        if ti.name in cks[1]:
                            x = (x.float() + cks[1].read(ti.name)[t].float()).to(ti.dtype)
                    elif ti.name in cks[1]:
                        shared, masks = cks[1], cks[2]
                        n = x.numel()
                        bits = masks.read(ti.name)[t].numpy()
                        m = torch.from_numpy(np.unpackbits(bits, count=n).astype(np.bool_)).reshape(x.shape)
                        tau = shared.read(ti.name).float()
                        x = (x.float() + scale * tau * m).to(ti.dtype)
                    w.write(ti.name, x)
                w.finish()
                written = w.bytes_written
            finally:
                w.close()
            src = os.path.join(store_dir, "base")
            for f in os.listdir(src):
                p = os.path.join(src, f)
                if os.path.isfile(p) and not f.endswith(".safetensors") and f != "model.safetensors.index.json":
                    shutil.copy2(p, os.path.join(od.tmp, f))
            od.commit()
    finally:
        for ck in cks:
            ck.close()
    return {"task": tasks[t], "scale": scale, "bytes_written": written, "out_dir": os.path.abspath(out_dir)}


def _tsvc_task(factors: Checkpoint, name: str, t: int, x: torch.Tensor) -> torch.Tensor:
    """Task t's tensor from a TSV-C store: base + U_t diag(S_t) Vh_t, or base + tau_t."""
    if name + ".tau" in factors:
        return (x.float() + factors.read(name + ".tau")[t].float()).to(x.dtype)
    if name + ".U" not in factors:
        return x
    u, s, vh = (factors.read(name + suffix)[t].float() for suffix in (".U", ".S", ".Vh"))
    return (x.float() + (u * s) @ vh).to(x.dtype)
