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
import os
import shutil

import numpy as np
import torch

from .io import Checkpoint, OutputDir, ShardedWriter
from .signals import interruptible

FORMAT = "fastmerge-multitask-store"


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
