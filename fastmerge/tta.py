"""Test-time adaptation over any ``torch.nn.Module``: AdaMerging (task-wise / layer-wise) and Model Tinting.

The merged model is theta(lambda) = theta_0 + sum_t lambda[t, s] tau_t, one coefficient per task and per tensor s
(layer-wise) or per task (task-wise), trained on unlabelled inputs of each task (../shared/spec/algorithms.md
§3, §4.10):

* AdaMerging: entropy of each task's head on the merged features, ``batches_per_task`` batches per task per step
  (the official code's 2 x 16), summed over tasks, one Adam step on lambda (lr 1e-3, 500 steps, init 0.3,
  lambda clamped to [0, 1] in the forward).
* Model Tinting: lambda and one trainable layer per task (its head, the "tint") trained jointly by Adam (lr 1e-2);
  500 epochs, each a shuffled pass over the tasks with one batch per task and one step per batch (T steps);
  losses ``crosspseudo`` (cross-entropy against the expert's hard prediction), ``crosspseudoconf`` (Tinting++:
  only samples where merged and expert agree or the expert is at least as confident; an empty batch is skipped,
  never a NaN) and ``entropy``.

Speed by construction: the T task vectors live as one stacked (T, P) tensor (fp32 or bf16), theta(lambda) is
built by one fused kernel (``tv_combine``) into one flat buffer whose slices are the model's tensors, and the
gradient of lambda is ``tv_coef_grad``: per tensor and task <dL/dtheta, tau_t> in one pass over the task vectors.
Autograd never sees T parameter copies; the model itself runs through ``torch.func.functional_call``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

Batch = Any


# ---------------------------------------------------------------------------------------------------------
# task vectors


class TaskVectors:
    """T task vectors of a set of named tensors as one stacked (T, P) tensor plus the flat pretrained values.

    Segment s (tensor ``names[s]``) is columns ``offsets[s]:offsets[s + 1]``. ``dtype`` is the storage of the
    task vectors (fp32, or bf16 to halve their memory; the maths is fp32)."""

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], base: torch.Tensor, taus: torch.Tensor,
                 tasks: list[str]):
        self.names, self.shapes, self.base, self.taus, self.tasks = list(names), list(shapes), base, taus, list(tasks)
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = torch.tensor([0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()],
                                    dtype=torch.int64)
        if base.shape != (int(self.offsets[-1]),) or taus.shape != (len(tasks), int(self.offsets[-1])):
            raise ValueError(f"task vectors: base {tuple(base.shape)} / taus {tuple(taus.shape)} do not match "
                             f"{len(names)} tensors of {int(self.offsets[-1])} values and {len(tasks)} tasks")

    @property
    def num_tasks(self) -> int:
        return self.taus.shape[0]

    def to(self, device=None, dtype: torch.dtype | None = None) -> TaskVectors:
        return TaskVectors(self.names, self.shapes, self.base.to(device), self.taus.to(device=device, dtype=dtype),
                           self.tasks)

    @classmethod
    def from_state_dicts(cls, base: dict[str, torch.Tensor], experts: Sequence[dict[str, torch.Tensor]] | dict,
                         names: Iterable[str] | None = None, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> TaskVectors:
        """tau_t = expert_t - base over ``names`` (default: every floating tensor some expert changes)."""
        tasks, sds = _named(experts)
        return cls._build(lambda n: base[n], [(lambda n, sd=sd: sd[n]) for sd in sds], list(base), names, tasks,
                          dtype, device)

    @classmethod
    def from_checkpoints(cls, base: str, experts: Sequence[str] | dict[str, str], names: Iterable[str] | None = None,
                         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TaskVectors:
        """The same from safetensors checkpoints on disk (HF directories or files), one tensor at a time."""
        from .io import Checkpoint

        tasks, paths = _named(experts)
        b = Checkpoint(base, name="base")
        cks = [Checkpoint(p, name=t) for t, p in zip(tasks, paths, strict=True)]
        try:
            for ck in cks:
                missing = [n for n in b.tensors if n not in ck.tensors]
                if missing:
                    raise ValueError(f"expert {ck.name} ({ck.path}) lacks tensor {missing[0]!r} of the base")
            return cls._build(b.read, [ck.read for ck in cks], list(b.tensors), names, tasks, dtype, device)
        finally:
            for ck in (b, *cks):
                ck.close()

    @classmethod
    def from_store(cls, store: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
        """A task-vector store (``merge_method: doge_am``): base/ + task_vectors/ (T, *shape) per tensor."""
        from .io import Checkpoint

        with open(os.path.join(store, "store.json")) as f:
            meta = json.load(f)
        if meta.get("kind") != "task_vectors":
            raise ValueError(f"{store}: not a task-vector store (method {meta.get('method')!r})")
        b = Checkpoint(os.path.join(store, "base"), name="store base")
        tv = Checkpoint(os.path.join(store, "task_vectors"), name="store task_vectors")
        try:
            names = [n for n in b.tensors if n in tv.tensors]
            first = tv.read(names[0]) if names else torch.zeros(len(meta["tasks"]), 0)
            dt = dtype or (first.dtype if first.dtype.is_floating_point else torch.float32)
            last: dict[str, torch.Tensor] = {}

            def task(n: str, t: int) -> torch.Tensor:  # the (T, *shape) tensor is read once for its T tasks
                if n not in last:
                    last.clear()
                    last[n] = tv.read(n)
                return last[n][t]

            return cls._build(b.read, [(lambda n, t=t: task(n, t)) for t in range(len(meta["tasks"]))],
                              names, names, meta["tasks"], dt, device, are_deltas=True)
        finally:
            b.close()
            tv.close()

    @classmethod
    def _build(cls, base_get, expert_gets, all_names, names, tasks, dtype, device, are_deltas=False):
        """expert_gets[t](name) gives task t's tensor: an expert's weights, or (``are_deltas``) its task vector.
        ``names`` None: every floating tensor that some expert changes."""
        T = len(expert_gets)
        if T == 0:
            raise ValueError("task vectors need at least one expert")
        pick: list[tuple[str, torch.Tensor, list[torch.Tensor]]] = []
        for n in (list(names) if names is not None else all_names):
            b = base_get(n)
            if not b.dtype.is_floating_point:
                if names is not None:
                    raise ValueError(f"tensor {n!r} is {b.dtype}: only floating tensors have task vectors")
                continue
            xs = [g(n) for g in expert_gets]
            for t, x in zip(tasks, xs, strict=True):
                if tuple(x.shape) != tuple(b.shape):
                    raise ValueError(f"expert {t}: tensor {n!r} has shape {tuple(x.shape)}, the base {tuple(b.shape)}")
            deltas = [x.float() if are_deltas else x.float() - b.float() for x in xs]
            if names is None and all(not bool(d.any()) for d in deltas):
                continue  # no expert changed it (e.g. frozen embeddings): not a task-vector tensor
            pick.append((n, b, deltas))
        P = sum(b.numel() for _, b, _ in pick)
        base = torch.empty(P, dtype=torch.float32, device=device)
        taus = torch.empty(T, P, dtype=dtype, device=device)
        off = 0
        for _, b, deltas in pick:
            k = b.numel()
            base[off:off + k] = b.reshape(-1).float()
            for t, d in enumerate(deltas):
                taus[t, off:off + k] = d.reshape(-1).to(dtype)
            off += k
        return cls([n for n, _, _ in pick], [tuple(b.shape) for _, b, _ in pick], base, taus, tasks)


def _named(experts) -> tuple[list[str], list]:
    if isinstance(experts, dict):
        return [str(k) for k in experts], list(experts.values())
    items = list(experts)
    names = [os.path.basename(os.path.normpath(x)).removesuffix(".safetensors") if isinstance(x, str) else f"task{i}"
             for i, x in enumerate(items)]
    if len(set(names)) != len(names):
        names = [f"task{i}" for i in range(len(items))]
    return names, items


class _Buffers:
    """Flat buffers reused from step to step: a fresh 100 MB tensor per step costs a page fault per 4 KiB, which
    on a VM is slower than the kernels that fill it. ``theta`` holds the current step's merged tensors (the next
    forward overwrites it: use merged_state_dict() for a copy)."""

    def __init__(self, P: int, device):
        self.P, self.device = P, device
        self.theta = self.grad = self.expert = None

    def get(self, name: str) -> torch.Tensor:
        buf = getattr(self, name)
        if buf is None:
            buf = torch.empty(self.P, dtype=torch.float32, device=self.device)
            setattr(self, name, buf)
        return buf


class _Combine(torch.autograd.Function):
    """theta = base + sum_t coef[t, s] tau_t as one flat buffer, returned as the per-tensor slices; backward:
    dL/dcoef[t, s] = <dL/dtheta_s, tau_t,s> by one fused reduction."""

    @staticmethod
    def forward(ctx, coef, base, taus, offsets, sizes, bufs):
        theta = bufs.get("theta")
        torch.ops.fastmerge.tv_combine(base, taus, coef, offsets, theta)
        ctx.save_for_backward(taus, offsets)
        ctx.sizes, ctx.bufs = sizes, bufs
        return tuple(theta.split(sizes))

    @staticmethod
    def backward(ctx, *grads):
        taus, offsets = ctx.saved_tensors
        g = ctx.bufs.get("grad")
        for gr, part in zip(grads, g.split(ctx.sizes), strict=True):
            if gr is None:
                part.zero_()
            else:
                part.copy_(gr.reshape(-1))
        return ops.tv_coef_grad(g, taus, offsets), None, None, None, None, None


def default_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class MergedModel(nn.Module):
    """``model`` with theta(lambda) in place of the task-vector tensors; ``heads[t]`` maps its output to task t's
    logits. ``forward_fn(model, batch)`` turns a batch into features (default: ``model(batch)``)."""

    def __init__(self, model: nn.Module, tv: TaskVectors, heads: Sequence[nn.Module] | None = None, *,
                 granularity: str = "layer", init: float = 0.3, clamp: bool = True,
                 forward_fn: Callable[[nn.Module, Batch], torch.Tensor] = default_forward, fused: bool = True):
        super().__init__()
        if granularity not in ("layer", "task"):
            raise ValueError(f"granularity must be 'layer' or 'task', got {granularity!r}")
        params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
        bad = [n for n in tv.names if n not in params]
        if bad:
            raise ValueError(f"task-vector tensor {bad[0]!r} is not a parameter or buffer of the model")
        for n, s in zip(tv.names, tv.shapes, strict=True):
            t = params[n]
            if tuple(t.shape) != tuple(s):
                raise ValueError(f"tensor {n!r}: the model has shape {tuple(t.shape)}, the task vectors {s}")
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.tv = tv
        self.granularity, self.clamp, self.forward_fn, self.fused = granularity, clamp, forward_fn, fused
        self.__dict__["_bound"] = _Bound(model, forward_fn)  # not a registered submodule: no duplicate state
        S = len(tv.names)
        self.coef = nn.Parameter(torch.full((tv.num_tasks, S if granularity == "layer" else 1), float(init),
                                            device=tv.base.device))
        self.heads = nn.ModuleList(heads or [])
        self._sizes = [math.prod(s) for s in tv.shapes]
        self._bufs = _Buffers(int(tv.offsets[-1]), tv.base.device)

    def coefficients(self) -> torch.Tensor:
        """(T, S): the clamped coefficients, one per task and tensor (task-wise: repeated over tensors)."""
        c = self.coef.clamp(0.0, 1.0) if self.clamp else self.coef
        return c.expand(self.tv.num_tasks, len(self.tv.names))

    def merged_params(self, coef: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        coef = self.coefficients() if coef is None else coef
        if not self.fused:  # the plain-autograd twin (oracle and benchmark baseline): T products per tensor
            off = self.tv.offsets.tolist()
            return {n: (self.tv.base[a:b] + (coef[:, s, None] * self.tv.taus[:, a:b].float()).sum(0)).view(shape)
                    for s, (n, shape, a, b) in enumerate(zip(self.tv.names, self.tv.shapes, off, off[1:],
                                                             strict=False))}
        parts = _Combine.apply(coef.contiguous(), self.tv.base, self.tv.taus, self.tv.offsets, self._sizes,
                               self._bufs)
        return {n: p.view(s) for n, p, s in zip(self.tv.names, parts, self.tv.shapes, strict=True)}

    def expert_params(self, t: int) -> dict[str, torch.Tensor]:
        """theta_0 + tau_t (the expert, as far as the task vectors go), without autograd."""
        with torch.no_grad():
            flat = torch.add(self.tv.base, self.tv.taus[t], out=self._bufs.get("expert"))
        return {n: p.view(s) for n, p, s in zip(self.tv.names, flat.split(self._sizes), self.tv.shapes,
                                                 strict=True)}

    def features(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        params = self.merged_params() if params is None else params
        return _call(self.__dict__["_bound"], params, batch)

    def forward(self, batch: Batch, task: int | None = None) -> torch.Tensor:
        f = self.features(batch)
        return f if task is None else self.heads[task](f)

    def for_task(self, task: int) -> TaskModel:
        return TaskModel(self, task)

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the merged tensors (detached, in the model's dtypes)."""
        sd = {k: v.detach() for k, v in self.model.state_dict().items()}
        for n, p in self.merged_params().items():
            sd[n] = p.detach().to(sd[n].dtype).clone()
        return sd

    def save(self, out_dir: str) -> None:
        """out_dir/model.safetensors (merged weights), heads.safetensors (head_<t>.<name>), coefficients.json."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.merged_state_dict().items()},
                  os.path.join(out_dir, "model.safetensors"))
        heads = {f"head_{t}.{k}": v.detach().contiguous().cpu() for t, h in enumerate(self.heads)
                 for k, v in h.state_dict().items()}
        if heads:
            save_file(heads, os.path.join(out_dir, "heads.safetensors"))
        with open(os.path.join(out_dir, "coefficients.json"), "w") as f:
            json.dump({"tasks": self.tv.tasks, "tensors": self.tv.names, "granularity": self.granularity,
                       "coefficients": self.coefficients().detach().cpu().tolist()}, f)


class TaskModel(nn.Module):
    """The merged model run for one task: features through that task's head."""

    def __init__(self, merged: MergedModel, task: int):
        super().__init__()
        self.merged, self.task = merged, task

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.merged(batch, self.task)


class _Bound(nn.Module):
    """``forward_fn(model, batch)`` as a module's forward, for torch.func.functional_call."""

    def __init__(self, model: nn.Module, forward_fn: Callable):
        super().__init__()
        self.m = model
        self.forward_fn = forward_fn

    def forward(self, batch):
        return self.forward_fn(self.m, batch)


def _call(bound: _Bound, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
    from torch.func import functional_call

    return functional_call(bound, {f"m.{k}": v for k, v in params.items()}, (batch,), strict=False)


# ---------------------------------------------------------------------------------------------------------
# losses


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits), averaged over the batch (AdaMerging's objective)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def tinting_loss(kind: str, merged_logits: torch.Tensor, expert_logits: torch.Tensor | None) -> torch.Tensor | None:
    """crosspseudo | crosspseudoconf | entropy; None when the confidence filter keeps no sample."""
    if kind == "entropy":
        return entropy(merged_logits)
    p_ind = expert_logits.float().softmax(-1)
    c_ind, y_ind = p_ind.max(-1)
    if kind == "crosspseudo":
        return F.cross_entropy(merged_logits.float(), y_ind)
    if kind != "crosspseudoconf":
        raise ValueError(f"loss must be crosspseudo, crosspseudoconf or entropy, got {kind!r}")
    with torch.no_grad():
        c_mrg, y_mrg = merged_logits.float().softmax(-1).max(-1)
        keep = (y_ind == y_mrg) | (c_ind >= c_mrg)
    if not bool(keep.any()):
        return None
    return F.cross_entropy(merged_logits.float()[keep], y_ind[keep])


# ---------------------------------------------------------------------------------------------------------
# training loops


class _Cycle:
    """Endless batches from a re-iterable loader (a DataLoader with shuffle=True reshuffles on every pass)."""

    def __init__(self, loader):
        self.loader, self.it = loader, iter(loader)

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


@dataclass
class TTAResult:
    model: MergedModel
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    skipped: int = 0

    @property
    def coefficients(self) -> torch.Tensor:
        return self.model.coefficients().detach()

    @property
    def heads(self) -> nn.ModuleList:
        return self.model.heads

    def save(self, out_dir: str) -> None:
        self.model.save(out_dir)


def _inputs(batch):
    """The input part of a (inputs, labels) pair; other batches are inputs already."""
    return batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch


def adamerging(model: nn.Module, tv: TaskVectors, heads: Sequence[nn.Module], loaders: Sequence[Iterable], *,
               granularity: str = "layer", steps: int = 500, lr: float = 1e-3, init: float = 0.3, clamp: bool = True,
               batches_per_task: int = 2, forward_fn: Callable = default_forward, fused: bool = True,
               batch_forward: bool | None = None, callback=None) -> TTAResult:
    """AdaMerging: per step, the entropy of every task's head on ``batches_per_task`` unlabelled batches of that
    task (labels in (x, y) batches are ignored), summed, then one Adam step on the coefficients.

    ``batch_forward`` (default: with the fused path) runs the step's batches of all tasks as one batch through
    the model (tensors concatenated; dicts of (batch, length) tensors right-padded with 0, as for tokenized text
    with an attention mask): the same loss and gradient, one backward pass. Models whose output for a sample
    depends on the rest of the batch (BatchNorm in training mode) need ``batch_forward=False``."""
    if batch_forward is None:
        batch_forward = fused
    _check_tasks(tv, heads, loaders)
    merged = MergedModel(model, tv, heads, granularity=granularity, init=init, clamp=clamp, forward_fn=forward_fn,
                         fused=fused)
    for h in merged.heads:
        for p in h.parameters():
            p.requires_grad_(False)
    opt = torch.optim.Adam([merged.coef], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    cyc = [_Cycle(ld) for ld in loaders]
    res = TTAResult(merged)
    t0 = time.perf_counter()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        params = merged.merged_params()
        batches = [(t, _inputs(c.next())) for t, c in enumerate(cyc) for _ in range(batches_per_task)]
        joined = _concat([b for _, b in batches]) if batch_forward else None
        if joined is not None:  # every task's batches through one forward: one weight-gradient pass, not T x 2
            big, sizes = joined
            feats = merged.features(big, params).split(sizes)
        else:
            feats = [merged.features(b, params) for _, b in batches]
        _step(opt, sum(entropy(merged.heads[t](f)) for (t, _), f in zip(batches, feats, strict=True)), res)
        if callback is not None:
            callback(step, res)
    res.seconds = time.perf_counter() - t0
    return res


def tinting(model: nn.Module, tv: TaskVectors, heads: Sequence[nn.Module], loaders: Sequence[Iterable], *,
            loss: str = "crosspseudo", epochs: int = 500, lr: float = 1e-2, init: float = 0.3, clamp: bool = True,
            granularity: str = "layer", expert_heads: Sequence[nn.Module] | None = None, seed: int = 0,
            forward_fn: Callable = default_forward, fused: bool = True, callback=None) -> TTAResult:
    """Model Tinting: coefficients and the per-task heads (copied; the originals are the experts' heads unless
    ``expert_heads`` is given) trained jointly by one Adam; each epoch visits the tasks in a shuffled order, one
    batch and one step each. The expert of task t is theta_0 + tau_t with its own head."""
    import copy

    _check_tasks(tv, heads, loaders)
    if loss not in ("crosspseudo", "crosspseudoconf", "entropy"):
        raise ValueError(f"loss must be crosspseudo, crosspseudoconf or entropy, got {loss!r}")
    ex_heads = list(expert_heads) if expert_heads is not None else [copy.deepcopy(h) for h in heads]
    for h in ex_heads:
        for p in h.parameters():
            p.requires_grad_(False)
    tints = [copy.deepcopy(h) for h in heads]
    for h in tints:
        for p in h.parameters():
            p.requires_grad_(True)
    merged = MergedModel(model, tv, tints, granularity=granularity, init=init, clamp=clamp, forward_fn=forward_fn,
                         fused=fused)
    opt = torch.optim.Adam([merged.coef, *merged.heads.parameters()], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    cyc = [_Cycle(ld) for ld in loaders]
    rng = random.Random(seed)
    res = TTAResult(merged)
    t0 = time.perf_counter()
    T = tv.num_tasks
    for epoch in range(epochs):
        order = list(range(T))
        rng.shuffle(order)
        for t in order:
            x = _inputs(cyc[t].next())
            expert_logits = None
            if loss != "entropy":
                with torch.no_grad():
                    expert_logits = ex_heads[t](merged.features(x, merged.expert_params(t)))
            opt.zero_grad(set_to_none=True)
            value = tinting_loss(loss, merged(x, t), expert_logits)
            if value is None:  # the confidence filter dropped the whole batch: no step
                res.skipped += 1
                continue
            _step(opt, value, res)
        if callback is not None:
            callback(epoch, res)
    res.seconds = time.perf_counter() - t0
    return res


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, res: TTAResult) -> None:
    loss.backward()
    opt.step()
    res.losses.append(float(loss.detach()))
    res.steps += 1


def _concat(batches: list) -> tuple[Batch, list[int]] | None:
    """One batch out of several (and their sizes), or None when they cannot be joined."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        if all(isinstance(b, torch.Tensor) and b.shape[1:] == first.shape[1:] for b in batches):
            return torch.cat(batches), [b.shape[0] for b in batches]
        return None
    if isinstance(first, dict) and all(isinstance(b, dict) and b.keys() == first.keys() for b in batches):
        out = {}
        for k in first:
            ts = [b[k] for b in batches]
            if not all(isinstance(t, torch.Tensor) and t.dim() == ts[0].dim() for t in ts):
                return None
            if ts[0].dim() == 2:  # (batch, length): right-pad to the longest
                L = max(t.shape[1] for t in ts)
                ts = [F.pad(t, (0, L - t.shape[1])) for t in ts]
            elif not all(t.shape[1:] == ts[0].shape[1:] for t in ts):
                return None
            out[k] = torch.cat(ts)
        return out, [next(iter(b.values())).shape[0] for b in batches]
    return None


def _check_tasks(tv: TaskVectors, heads, loaders) -> None:
    T = tv.num_tasks
    if len(heads) != T or len(loaders) != T:
        raise ValueError(f"{T} task vectors ({', '.join(tv.tasks)}) need {T} heads and {T} loaders, got "
                         f"{len(heads)} and {len(loaders)}")
