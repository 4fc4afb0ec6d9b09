"""The compact multi-task store written by the per-task methods (TALL masks, EMR; later TSV-C), and
``reconstruct``, which rebuilds any one task's model from it.

Layout of a store directory::

    store.json      format, method, task names, per-task scales, sizes
    base/           the pretrained model (HF safetensors + config/tokenizer files)
    shared/         one shared task vector per floating tensor (tau_MTL for TALL, tau_uni for EMR)
    masks/          per floating tensor, uint8 (T, ceil(n/8)): task t's mask, bit-packed (numpy packbits order)

Task t's model is ``base + scale_t * unpack(mask_t) * shared`` (fp32 maths, cast to the base's dtype); tensors
that are not floating are the base's. T masks cost T/8 bytes per parameter: for 8 tasks and a bf16 model the
store is about 2.5x one model instead of 8x.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import torch

from .io import Checkpoint, OutputDir, ShardedWriter

FORMAT = "fastmerge-multitask-store"


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def write_store(engine, od: OutputDir) -> dict:
    """Stream the engine's jobs into a store inside ``od`` (called by Engine.run)."""
    from . import methods

    cfg, jobs = engine.cfg, engine.jobs
    experts = cfg.experts
    T = len(experts)
    names = cfg.options.get("tasks") or [os.path.basename(os.path.normpath(m.path)) for m in experts]
    if len(names) != T or len(set(names)) != T:
        raise ValueError(f"fastmerge.tasks must name each of the {T} non-base models once, got {names}")
    parts = methods.emr_parts if cfg.method == "emr" else methods.tall_parts
    fl = [j for j in jobs if j.floating]
    bi = cfg.models.index(cfg.base)
    base_layout = [(j.name, (cfg.dtype or j.sources[bi].dtype) if j.floating else j.out_dtype, j.shape) for j in jobs]
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
        shared, masks, stats = parts(engine._call(job, tensors))
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
    if cfg.method == "emr":
        scales = torch.where(den > 0, num / den.clamp(min=1e-300), torch.ones_like(num)).tolist()
    else:
        scales = [1.0] * T
    src = engine.side_source()
    if src:
        for f in os.listdir(src):
            p = os.path.join(src, f)
            if os.path.isfile(p) and not f.endswith(".safetensors") and f != "model.safetensors.index.json":
                shutil.copy2(p, os.path.join(od.sub("base"), f))
    one_model = sum(j.out_bytes for j in jobs)
    size = _dir_bytes(od.tmp)
    meta = {"format": FORMAT, "version": 1, "method": cfg.method, "tasks": names, "scales": scales,
            "experts": [m.path for m in experts], "base": cfg.base.path,
            "bytes": size, "bytes_of_separate_models": one_model * T,
            "size_ratio": size / max(one_model * T, 1)}
    with open(os.path.join(od.tmp, "store.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return {"bytes_written": wb.bytes_written + ws.bytes_written + wm.bytes_written, "tasks": names,
            "scales": scales, "store_bytes": size, "size_ratio": meta["size_ratio"]}


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
    base, shared, masks = (Checkpoint(os.path.join(store_dir, p), name=f"store {p}") for p in
                           ("base", "shared", "masks"))
    names = sorted(base.tensors.values(), key=lambda ti: (ti.file, ti.start))
    layout = [(ti.name, ti.dtype, ti.shape) for ti in names]
    written = 0
    try:
        with OutputDir(out_dir) as od:
            w = ShardedWriter(od.tmp, layout, parse_size(out_shard_size))
            try:
                for ti in names:
                    x = base.read(ti.name)
                    if ti.name in shared:
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
        for ck in (base, shared, masks):
            ck.close()
    return {"task": tasks[t], "scale": scale, "bytes_written": written, "out_dir": os.path.abspath(out_dir)}
