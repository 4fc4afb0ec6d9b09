"""Execute: run a plan's jobs through a reader -> compute -> writer pipeline in bounded memory.

A reader thread reads the next jobs' tensors (zero-copy mappings on the CPU; pinned buffers and non-blocking
copies on a side stream on CUDA) while the main thread merges the current one, and a writer thread hands
results to a sink (fastmerge.execute.sinks). A byte budget covers every tensor in flight (inputs being read
or merged, outputs waiting to be written), so peak memory is about the budget plus one tensor's fp32
temporaries, whatever the model's size. Host buffers are pooled (:class:`_Pool`) and glibc's malloc is told
how to treat tensor-sized blocks (:class:`MallocPolicy`). Statistics passes (fastmerge.plan.stats) and the
method's own ``prepare`` use the same :meth:`Executor.stream`.
"""

from __future__ import annotations

import functools
import math
import queue
import resource
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .. import context, ops
from ..config import MergeConfig
from ..io import Checkpoint, TensorInfo, _itemsize, check_mapped
from ..methods import Method, TensorCall
from ..plan import schedule
from ..plan.jobs import Group, Job
from ..plan.plan import reference, side_source


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Budget:
    """Bytes in flight; acquire blocks while over the limit (one item always proceeds alone)."""

    def __init__(self, limit: int, stop: threading.Event):
        self.limit, self.used, self.stop = limit, 0, stop
        self.cond = threading.Condition()

    def acquire(self, n: int) -> bool:
        with self.cond:
            while self.used > 0 and self.used + n > self.limit:
                if self.stop.is_set():
                    return False
                self.cond.wait(0.1)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, tuple | list):
        return [t for e in x for t in _tensors(e)]
    return []


class _Pool:
    """Host buffers lent out for reads, outputs and scratch, and reused by size once given back: a fresh buffer
    costs a first-touch page fault per 4 KiB, which on a small VM is as slow as the merge maths itself (and
    on CUDA, pinning each buffer once instead of per tensor). Idle buffers are dropped least recently used
    first while lent + idle bytes exceed ``cap``; lending itself is never refused (the budget bounds it)."""

    SMALL = 64 << 10  # smaller tensors come from malloc's heap, where reuse is free anyway

    def __init__(self, cap: int, pin: bool):
        self.cap, self.pin = cap, pin
        self.idle: OrderedDict[int, torch.Tensor] = OrderedDict()  # data_ptr -> buffer, oldest first
        self.by_size: dict[int, list[int]] = {}
        self.lent: dict[int, torch.Tensor] = {}
        self.idle_bytes = self.lent_bytes = 0
        self.lock = threading.Lock()

    def get(self, n: int) -> torch.Tensor:
        """A uint8 buffer of n bytes, lent until :meth:`release`."""
        with self.lock:
            ptrs = self.by_size.get(n)
            if ptrs:
                buf = self.idle.pop(ptrs.pop())
                self.idle_bytes -= n
            else:
                buf = None
        if buf is None:
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=self.pin)
        with self.lock:
            self.lent[buf.data_ptr()] = buf
            self.lent_bytes += n
            self._trim()
        return buf

    def tensor(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * _itemsize(dtype)
        if n < self.SMALL and not self.pin:
            return torch.empty(shape, dtype=dtype)
        return self.get(n).view(dtype).view(shape)

    def release(self, t: torch.Tensor) -> None:
        """Give back the buffer under ``t`` (a no-op for tensors the pool did not lend)."""
        ptr = t.untyped_storage().data_ptr()
        with self.lock:
            buf = self.lent.pop(ptr, None)
            if buf is None:
                return
            n = buf.numel()
            self.lent_bytes -= n
            self.idle[ptr] = buf
            self.by_size.setdefault(n, []).append(ptr)
            self.idle_bytes += n
            self._trim()

    def _trim(self) -> None:
        while self.idle and self.idle_bytes + self.lent_bytes > self.cap:
            old, b = self.idle.popitem(last=False)
            self.by_size[b.numel()].remove(old)
            self.idle_bytes -= b.numel()


def _lend(pool: _Pool, lent: list[torch.Tensor], shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    t = pool.tensor(shape, dtype)
    lent.append(t)
    return t


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters


@functools.cache
def _glibc():
    """glibc, for mallopt and malloc_trim; None under another libc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


class MallocPolicy:
    """How glibc's malloc treats tensor-sized blocks during a merge.

    Always: a fixed 1 MiB mmap threshold. glibc raises its threshold (up to 32 MiB) each time a large block is
    freed, after which freed tensors stay in per-thread heaps: with a reader, a merger and a writer thread that
    is several tensors of resident memory nobody uses. Fixed, every tensor-sized block goes back to the OS on
    free, which is what the streaming methods want.

    ``keep_freed`` (stack methods on the CPU: TSV-M, Iso-C, DOGE, ...): their fp32/fp64 temporaries (Grams,
    eigenvectors, whole stacks) are allocated and freed over and over, and each block returned to the OS comes
    back as fresh zeroed pages, one fault per 4 KiB: 23 s of system time in a 78 s TSV-M merge of the 268M
    benchmark model on the 2-core CI VM. During the merge they stay in the heap instead (no mmap; the heap is
    trimmed only above 256 MiB free): 67 s, 3 s of system time, 0.6-0.9 GiB more peak RSS. glibc's defaults for
    both settings are restored, and the heap trimmed, when the merge ends."""

    def __init__(self, keep_freed: bool):
        self.libc = _glibc()
        self.keep = keep_freed and self.libc is not None

    def __enter__(self):
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        if self.keep:
            self.libc.mallopt(_M_MMAP_MAX, 0)
            self.libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
        return self

    def __exit__(self, *exc):
        if self.keep:
            self.libc.mallopt(_M_MMAP_MAX, 65536)
            self.libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
            self.libc.malloc_trim(0)


class Executor:
    """One merge's run: the planned jobs, the opened checkpoints, and what the passes over them collect
    (``stats`` for the method, ``notes`` for the summary, per-stage seconds, bytes read, passes). Method
    hooks (``prepare``, ``sink``) get this object."""

    def __init__(self, cfg: MergeConfig, method: Method, ckpts: list[Checkpoint], jobs: list[Job], *,
                 device: torch.device, seed: int, user_budget: int | None, out_shard_bytes: int, quiet: bool,
                 vocab=None):
        self.cfg, self.method, self.ckpts, self.jobs = cfg, method, ckpts, jobs
        self.vocab = vocab  # fastmerge.tokenizer.Vocabulary: the output tokenizer, when the config builds one
        self.device, self.seed, self.quiet = device, seed, quiet
        self.user_budget, self.out_shard_bytes = user_budget, out_shard_bytes
        self.ref = reference(cfg, ckpts)
        self.stats: dict[str, Any] = {}
        self.notes: dict[str, int] = {}
        self.stages: dict[str, float] = {"plan": 0.0, "stats": 0.0, "read": 0.0, "merge": 0.0, "write": 0.0}
        self.bytes_read = 0
        self.passes = 0

    def side_source(self) -> str | None:
        return side_source(self.ref)

    def budget_bytes(self, write: bool) -> int:
        return schedule.budget_bytes(self.jobs, self.user_budget, write)

    def units(self) -> list[Job | Group]:
        """The jobs as the merge pass takes them (fastmerge.plan.schedule.units): stacks for ``batch`` methods."""
        return schedule.units(self.jobs, stacked=self.method.batch is not None, limit=self.budget_bytes(True),
                              tasks=len(self.cfg.experts))

    def _load(self, job: Job | Group) -> tuple[list, list[torch.Tensor]]:
        """A job's input tensors (on the merge device, cast to the config's dtype) and the host buffers they
        were read into, which go back to the pool once the job is merged. A group gives one list per job."""
        if isinstance(job, Group):
            tensors, bufs = [], []
            for j in job.jobs:
                t, b = self._load(j)
                tensors.append(t)
                bufs += b
            return tensors, bufs
        dtype = self.cfg.dtype
        out, bufs = [], []
        cuda = self.device.type == "cuda"
        for ck, src in self._sources(job):
            if cuda:
                buf = self._pool.get(src.nbytes)
                t = ck.read(src.name, out=buf)
            else:  # zero-copy: the kernels read the page cache through a mapping
                t = buf = ck.map(src.name)
            if cuda:
                t = t.to(self.device, non_blocking=True)
            if job.floating and dtype is not None and t.dtype != dtype:
                if cuda:
                    t = t.to(dtype)
                else:
                    t = self._pool.tensor(tuple(t.shape), dtype).copy_(t)
                    self._pool.release(buf)
                    buf = t
            bufs.append(buf)
            out.append(t)
        return out, bufs

    def _sources(self, job: Job | Group) -> list[tuple[Checkpoint, TensorInfo]]:
        if isinstance(job, Group):
            return [s for j in job.jobs for s in self._sources(j)]
        return [(self.ckpts[i], src) for i, src in zip(job.inputs, job.sources, strict=True)]

    def stream(self, jobs: list[Job | Group], fn: Callable[[Any, list], Any], desc: str,
               write: Callable[[Any], int] | None = None) -> None:
        """Run ``fn(job, inputs)`` over jobs with a prefetching reader; ``write(result)`` runs on a writer thread
        and returns the bytes it wrote (budgeted from ``job.out_bytes`` until then)."""
        stop = threading.Event()
        budget = _Budget(self.budget_bytes(write is not None), stop)
        biggest = max((j.in_bytes + j.out_bytes for j in jobs), default=0)
        self._pool = _Pool(budget.limit + biggest, self.device.type == "cuda")
        ready: queue.Queue = queue.Queue()
        wq: queue.Queue = queue.Queue()
        errors: list[BaseException] = []
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def reader() -> None:
            try:
                for job in jobs:
                    need = job.in_bytes + (job.out_bytes if write else 0)
                    if not budget.acquire(need) or stop.is_set():
                        return
                    t0 = time.perf_counter()
                    if side is not None:
                        with torch.cuda.stream(side):
                            tensors, bufs = self._load(job)
                        side.synchronize()
                    else:
                        tensors, bufs = self._load(job)
                    self.stages["read"] += time.perf_counter() - t0
                    ready.put((job, (tensors, bufs)))
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                ready.put((None, e))

        def writer() -> None:
            while True:
                item = wq.get()
                if item is None:
                    return
                job, result = item
                try:
                    if not errors:
                        t0 = time.perf_counter()
                        write(result)
                        self.stages["write"] += time.perf_counter() - t0
                    for t in _tensors(result):
                        self._pool.release(t)
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)
                    stop.set()
                finally:
                    budget.release(job.out_bytes)

        bar = None
        if not self.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(j.in_bytes for j in jobs), unit="B", unit_scale=True, unit_divisor=1000,
                       desc=desc, dynamic_ncols=True, leave=True)
        rt = threading.Thread(target=context.worker(reader), name="fastmerge-reader", daemon=True)
        wt = threading.Thread(target=context.worker(writer), name="fastmerge-writer", daemon=True) if write else None
        rt.start()
        if wt:
            wt.start()
        done = 0
        try:
            for _ in jobs:
                while True:
                    try:
                        job, tensors = ready.get(timeout=0.2)
                        break
                    except queue.Empty:
                        if errors:
                            raise errors[0] from None
                if job is None:
                    raise tensors
                if errors:
                    raise errors[0]
                tensors, bufs = tensors
                t0 = time.perf_counter()
                scratch: list[torch.Tensor] = []
                with ops.allocating(functools.partial(_lend, self._pool, scratch)):
                    result = fn(job, tensors)
                check_mapped()  # an input that shrank under its mapping: its pages read as zeros
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
                self.stages["merge"] += time.perf_counter() - t0
                del tensors
                held = {t.untyped_storage().data_ptr() for t in _tensors(result)}
                for b in bufs + scratch:  # what the result still uses goes back after writing instead
                    if b.untyped_storage().data_ptr() not in held:
                        self._pool.release(b)
                if self.device.type == "cpu":  # mapped inputs leave this process (safe even if a result holds
                    for ck, src in self._sources(job):  # one: untouched pages fault back in from the file)
                        ck.unmap(src.name)
                self.bytes_read += job.in_bytes
                budget.release(job.in_bytes)
                if write:
                    wq.put((job, result))
                done += 1
                if bar is not None:
                    bar.update(job.in_bytes)
                    bar.set_postfix_str(f"{done}/{len(jobs)} tensors", refresh=False)
            if wt:
                wq.put(None)
                wt.join()
                wt = None
            if errors:
                raise errors[0]
        finally:
            stop.set()
            if wt:
                wq.put(None)
                wt.join()
            rt.join()
            if bar is not None:
                bar.close()
            self.passes += 1

    def tensor_call(self, job: Job, tensors: list[torch.Tensor]) -> TensorCall:
        """What a method's ``fn``/``batch`` (or a store sink) gets for one job and its input tensors."""
        return TensorCall(job.name, tensors, job.base_index, job.shared, list(job.per_input), self.seed, job.out_dtype,
                                  self.cfg.options, self.stats, self.notes)

    def merge(self, unit: Job | Group, tensors: list) -> tuple[Job | Group, Any]:
        """The method's result for one unit: a job's tensor (its input for a tensor that is not floating), or a
        group's list of tensors; errors name the tensor(s) and any input holding NaN/inf."""
        if isinstance(unit, Group):
            calls = [self.tensor_call(j, ts) for j, ts in zip(unit.jobs, tensors, strict=True)]
            try:
                return unit, self.method.batch(calls)
            except (ValueError, RuntimeError) as e:
                bad = "".join(self._nonfinite(j, ts) for j, ts in zip(unit.jobs, tensors, strict=True))
                raise type(e)(f"merging tensor(s) {unit.name!r} with {self.cfg.method}: {e}{bad}") from e
        if not unit.floating:
            return unit, tensors[0]
        if unit.vocab:
            tensors = self.vocab.permute(unit.name, unit.inputs, unit.base_index, tensors)
        try:
            return unit, self.method.fn(self.tensor_call(unit, tensors))
        except (ValueError, RuntimeError) as e:
            bad = self._nonfinite(unit, tensors)
            raise type(e)(f"merging tensor {unit.name!r} with {self.cfg.method}: {e}{bad}") from e

    def check_finite(self, job: Job, out: torch.Tensor) -> None:
        """On the writer thread: NaN/inf in a merged tensor is an error naming the tensor and the input(s) at
        fault (re-read from disk only then). One min/max pass over the output (NaN propagates through both, inf
        shows up in one), off the merge thread: about 18 GB/s per core, a quarter of a histogram pass."""
        if not out.dtype.is_floating_point or not out.numel():
            return
        lo, hi = torch.aminmax(out)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            inputs = [ck.read(src.name).to(out.device) for ck, src in self._sources(job)]
            why = self._nonfinite(job, inputs) or "; check the method's parameters"
            raise ValueError(f"merging tensor {job.name!r} with {self.cfg.method} produced NaN/inf{why}")

    def _nonfinite(self, job: Job, tensors: list[torch.Tensor]) -> str:
        bad = [self.cfg.models[i].label for i, x in zip(job.inputs, tensors, strict=True)
               if not bool(torch.isfinite(x).all())]
        return f" (input(s) {', '.join(bad)} hold NaN/inf in this tensor)" if bad else ""

