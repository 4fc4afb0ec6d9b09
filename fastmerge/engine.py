"""The streaming merge engine: plan -> schedule -> execute, in bounded memory.

* **Plan**: open every model's safetensors headers (nothing else is read), check that each model has the
  base's tensor names, shapes and floating dtypes, and freeze one job per output tensor with its input
  locations and its resolved parameters. Every error is raised here, before anything is written.
* **Schedule**: jobs ordered by the base's (shard, offset), so each input shard is read front to back once.
* **Execute**: a reader thread reads the next jobs' tensors (positioned reads into fresh buffers; pinned
  buffers and non-blocking copies on a side stream on CUDA) while the main thread merges the current one, and
  a writer thread ``pwrite``s results into pre-laid-out output shards. A byte budget covers every tensor in
  flight (inputs being read or merged, outputs waiting to be written), so peak memory is about the budget
  plus one tensor's fp32 temporaries, whatever the model's size. Methods with whole-model statistics run
  extra streaming passes first (pass 1: histograms; pass 2: merge).

The output is written into a temporary directory beside OUT and renamed at the end: a failure or Ctrl-C
leaves neither OUT nor temp files.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import resource
import shutil
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import consensus, context, methods, ops
from .config import ConfigError, MergeConfig, layer_t
from .config import load as load_config
from .io import Checkpoint, CheckpointError, OutputDir, ShardedWriter, TensorInfo, _itemsize, check_mapped, parse_size
from .plan import Group, Job
from .signals import interruptible

SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
)
RECORD = "fastmerge_config.yml"


# bytes of fp32/fp64 working memory per element and task of a stacked subspace merge (task vectors, the fp64
# copy the Gram eigensolvers take, factors): a stack is capped so that this stays within the memory budget
_STACK_WORK = 32
_STACK_MAX = 64


@dataclass
class MergeSummary:
    """What a merge did: wall time, bytes moved, peak memory, per-stage times."""

    out_dir: str
    method: str
    tensors: int
    seconds: float
    bytes_read: int
    bytes_written: int
    peak_rss_bytes: int
    peak_gpu_bytes: int
    passes: int
    budget_bytes: int
    stages: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def __str__(self) -> str:
        gb = 1e9
        st = ", ".join(f"{k} {v:.2f}s" for k, v in self.stages.items())
        fb = ""
        if "svd_matrices" in self.extra:
            fb = (f"; {self.extra['svd_exact_fallback']} of {self.extra['svd_matrices']} matrices fell back to the "
                  "exact fp64 path")
        return (f"merged {self.tensors} tensors with {self.method} in {self.seconds:.2f}s "
                f"({self.bytes_read / gb:.2f} GB read in {self.passes} pass(es), {self.bytes_written / gb:.2f} GB "
                f"written, {self.bytes_read / gb / max(self.seconds, 1e-9):.2f} GB/s); peak RSS "
                f"{self.peak_rss_bytes / 2**20:.0f} MiB, budget {self.budget_bytes / 2**20:.0f} MiB; {st}{fb}"
                f" -> {self.out_dir}")


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


class _MallocPolicy:
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

    def resolve(name: str, t: float) -> tuple:
        key = (t, *(f in name for f in flt))
        hit = cache.get(key)
        if hit is None:  # shared between jobs: nothing downstream writes into them
            hit = cache[key] = methods.resolve(cfg, name, t)
        return hit

    return resolve


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


class Engine:
    def __init__(self, cfg: MergeConfig, *, device: str = "auto", seed: int = 0,
                 memory_budget: int | str | None = None, out_shard_size: int | str = "5B", quiet: bool = False):
        methods.validate(cfg)  # the method's own checks (config.load knows no method)
        self.cfg = cfg
        self.method = methods.get(cfg.method)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch has no CUDA device here (use --device cpu or auto)")
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"--device {device}: expected cpu, cuda or auto")
        self.seed = int(seed)
        self.quiet = quiet
        self.out_shard_bytes = parse_size(out_shard_size)
        self.user_budget = None if memory_budget is None else parse_size(memory_budget)
        self.stages: dict[str, float] = {"plan": 0.0, "stats": 0.0, "read": 0.0, "merge": 0.0, "write": 0.0}
        self.bytes_read = 0
        self.passes = 0
        self.ckpts: list[Checkpoint] = []
        self.jobs: list[Job] = []
        self.stats: dict[str, Any] = {}
        self.notes: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------- plan
    def plan(self) -> list[Job]:
        t0 = time.perf_counter()
        cfg = self.cfg
        self.ckpts = [Checkpoint(m.path, name=m.label) for m in cfg.models]
        bi = cfg.models.index(cfg.base) if cfg.base is not None else 0
        ref = self.ckpts[bi]
        policy = cfg.options.get("extra_tensors", "error")
        for ck in self.ckpts:
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
                warnings.warn(msg + "; they are not merged (fastmerge.extra_tensors: ignore)", stacklevel=2)
        L = _num_layers(ref.path)
        if L is None:
            from .config import layer_index

            idx = [layer_index(n) for n in ref.tensors]
            L = max((i for i in idx if i is not None), default=-1) + 1
        order = sorted(ref.tensors.values(), key=lambda ti: (ti.file, ti.start))
        resolve = _resolver(cfg)
        self._check_side_files()
        jobs = []
        for ti in order:
            name = ti.name
            infos = tuple(ck.tensors[name] for ck in self.ckpts)
            floating = ti.dtype.is_floating_point
            for ck, inf in zip(self.ckpts, infos, strict=True):
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
            shared, per_input = resolve(name, layer_t(name, L))
            out_dtype = cfg.out_dtype or cfg.dtype or ti.dtype
            jobs.append(Job(name, ti.shape, infos, True, out_dtype, shared, tuple(per_input)))
        if self.method.fn is None and not self.method.store:
            raise ConfigError(f"merge_method {self.method.name} cannot run through the engine")
        self.jobs = jobs
        self.stages["plan"] += time.perf_counter() - t0
        return jobs

    def _check_side_files(self) -> None:
        """The base's JSON side files (config.json, tokenizer files...) are read and checked here, at plan time:
        a corrupt one fails before anything is merged, naming the file, instead of after the whole merge."""
        src = self.side_source()
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
                raise CheckpointError(f"{self._ref().name}: {p} is not valid JSON ({str(e)[:200]})") from None
            if f == "config.json" and not isinstance(doc, dict):
                raise CheckpointError(f"{self._ref().name}: {p} must hold a JSON object")

    def budget_bytes(self, write: bool) -> int:
        biggest = max((j.in_bytes + (j.out_bytes if write else 0) for j in self.jobs), default=1)
        if self.user_budget is not None:
            if self.user_budget < biggest:
                warnings.warn(f"memory budget {self.user_budget} B is below the largest tensor's inputs+output "
                              f"({biggest} B); that tensor is processed alone, without prefetch", stacklevel=2)
            return self.user_budget
        return 2 * biggest

    # ------------------------------------------------------------------------------------------- stream
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
        return list(zip(self.ckpts if len(job.sources) > 1 else [self._ref()], job.sources, strict=True))

    def _ref(self) -> Checkpoint:
        return self.ckpts[self.cfg.models.index(self.cfg.base)] if self.cfg.base is not None else self.ckpts[0]

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

    # ------------------------------------------------------------------------------------------- merge
    def tensor_call(self, job: Job, tensors: list[torch.Tensor]) -> methods.TensorCall:
        """What a method's ``fn``/``batch`` (or a store sink) gets for one job and its input tensors."""
        bi = self.cfg.models.index(self.cfg.base) if self.cfg.base is not None else None
        return methods.TensorCall(job.name, tensors, bi, job.shared, list(job.per_input), self.seed, job.out_dtype,
                                  self.cfg.options, self.stats, self.notes)

    def _merge_one(self, job: Job, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not job.floating:
            return tensors[0]
        try:
            out = self.method.fn(self.tensor_call(job, tensors))
        except (ValueError, RuntimeError) as e:
            raise type(e)(f"merging tensor {job.name!r} with {self.cfg.method}: {e}{self._nonfinite(tensors)}") from e
        return out

    def _check_finite(self, job: Job, out: torch.Tensor) -> None:
        """On the writer thread: NaN/inf in a merged tensor is an error naming the tensor and the input(s) at
        fault (re-read from disk only then). One min/max pass over the output (NaN propagates through both, inf
        shows up in one), off the merge thread: about 18 GB/s per core, a quarter of a histogram pass."""
        if not out.dtype.is_floating_point or not out.numel():
            return
        lo, hi = torch.aminmax(out)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            inputs = [ck.read(src.name).to(out.device) for ck, src in zip(self.ckpts, job.sources, strict=False)]
            why = self._nonfinite(inputs) or "; check the method's parameters"
            raise ValueError(f"merging tensor {job.name!r} with {self.cfg.method} produced NaN/inf{why}")

    def _nonfinite(self, tensors: list[torch.Tensor]) -> str:
        bad = [m.label for m, x in zip(self.cfg.models, tensors, strict=True) if not bool(torch.isfinite(x).all())]
        return f" (input(s) {', '.join(bad)} hold NaN/inf in this tensor)" if bad else ""

    def magnitude_thresholds(self, jobs: list[Job], densities: list[float], rule: str) -> list[float]:
        """Per expert, the magnitude threshold keeping its top ``densities[t]`` task-vector entries over all
        ``jobs`` together (consensus.keep_rank's ``rule``; 0.0 keeps everything): exact, from streamed
        histograms, one pass for bf16 inputs and two otherwise."""
        cfg = self.cfg
        experts = [i for i, m in enumerate(cfg.models) if m is not cfg.base]
        bi = cfg.models.index(cfg.base)
        n = sum(j.numel for j in jobs)
        ks = [consensus.keep_rank(n, d, rule) for d in densities]
        sels = [ops.MagnitudeThreshold(self.device) for _ in experts]
        active = [t for t, k in enumerate(ks) if k is not None]

        def feed(job: Job, tensors: list[torch.Tensor]) -> None:
            buf = ops.empty(job.shape, torch.float32, self.device)
            for t in active:
                sels[t].add(consensus._delta(tensors[experts[t]], tensors[bi], buf),
                            f"{cfg.models[experts[t]].label}: {job.name}")

        if active:
            self.stream(jobs, feed, "stats: magnitudes")
            again = [t for t in active if sels[t].select(ks[t])]
            if again:
                active = again
                self.stream(jobs, feed, "stats: refine")
        return [sels[t].threshold() if ks[t] is not None else 0.0 for t in range(len(experts))]

    def global_stats(self) -> None:
        """Whole-model magnitude thresholds per task (and the official zero-sign rule) by streaming passes."""
        cfg = self.cfg
        if cfg.options.get("trim") != "global":
            return
        t0 = time.perf_counter()
        compat = cfg.options.get("compat", "mergekit")
        rule = "mergekit" if compat == "mergekit" and self.method.mergekit_trim else "official"
        experts = [i for i, m in enumerate(cfg.models) if m is not cfg.base]
        bi = cfg.models.index(cfg.base)
        jobs = [j for j in self.jobs if j.floating]
        dens = [float(jobs[0].per_input[i]["density"]) if jobs else 1.0 for i in experts]
        lo = self.stats["lo"] = self.magnitude_thresholds(jobs, dens, rule)
        if rule == "official":
            counts = torch.zeros(2, dtype=torch.int64)
            params = ops.ties_params(len(experts), lo=lo)

            def count(job: Job, tensors: list[torch.Tensor]) -> None:
                ex = [tensors[i] for i in experts]
                counts.add_(ops.ties_merge(tensors[bi], ex, params, elect="sum", merge="sum", write=False)[1].cpu())

            self.stream(jobs, count, "stats: signs")
            self.stats["zero_sign"] = float(torch.sign(counts[0] - counts[1]))
        self.stages["stats"] += time.perf_counter() - t0

    def run(self, out_dir: str) -> MergeSummary:
        t_start = time.perf_counter()
        with interruptible(), _MallocPolicy(keep_freed=self.method.batch is not None and self.device.type == "cpu"):
            return self._run(out_dir, t_start)

    def _run(self, out_dir: str, t_start: float) -> MergeSummary:
        forced = self.cfg.options.get("backend")
        with context.use(backend=None if forced in (None, "auto") else forced):
            return self._run_in_context(out_dir, t_start)

    def _run_in_context(self, out_dir: str, t_start: float) -> MergeSummary:
        try:
            if not self.jobs:
                self.plan()
            with OutputDir(out_dir) as od:
                self.global_stats()
                if self.method.prepare is not None:
                    t0 = time.perf_counter()
                    self.method.prepare(self)
                    self.stages["stats"] += time.perf_counter() - t0
                if self.method.store:
                    extra = self.method.sink(self, od)
                    written = extra.pop("bytes_written")
                else:
                    written = self._write_model(od.tmp)
                    extra = {}
                self._copy_side_files(od.tmp)
                self._record(od.tmp)
                check_mapped()
                od.commit()
        finally:
            for ck in self.ckpts:
                ck.close()
        gpu = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        return MergeSummary(os.path.abspath(out_dir), self.cfg.method, len(self.jobs), time.perf_counter() - t_start,
                            self.bytes_read, written, peak_rss(), gpu, self.passes,
                            self.budget_bytes(True), dict(self.stages), {**self.notes, **extra})

    def units(self) -> list[Job | Group]:
        """The jobs as the merge pass takes them: one by one, or, for methods that merge stacks, floating jobs
        grouped by (shape, dtypes) in schedule order, each group capped so that its inputs stay within half the
        memory budget and its fp32/fp64 working set within the budget (at most 64 tensors)."""
        if self.method.batch is None:
            return list(self.jobs)
        limit = self.budget_bytes(True)
        T = max(1, len(self.cfg.experts))
        open_: dict[tuple, list[Job]] = {}
        units: list[Job | Group] = []

        def close(key):
            units.append(Group(tuple(open_.pop(key))))

        for j in self.jobs:
            if not j.floating:
                units.append(j)
                continue
            key = (j.shape, j.out_dtype, tuple(s.dtype for s in j.sources))
            cur = open_.get(key)
            if cur is not None:
                nb = sum(x.in_bytes for x in cur) + j.in_bytes
                work = (sum(x.numel for x in cur) + j.numel) * T * _STACK_WORK
                if len(cur) >= _STACK_MAX or nb > limit // 2 or work > limit:
                    close(key)
                    cur = None
            if cur is None:
                open_[key] = cur = []
            cur.append(j)
        for key in list(open_):
            close(key)
        return units

    def _merge_group(self, g: Group, tensors: list[list[torch.Tensor]]) -> tuple[Group, list[torch.Tensor]]:
        calls = [self.tensor_call(j, ts) for j, ts in zip(g.jobs, tensors, strict=True)]
        try:
            outs = self.method.batch(calls)
        except (ValueError, RuntimeError) as e:
            bad = "".join(self._nonfinite(ts) for ts in tensors)
            raise type(e)(f"merging tensor(s) {g.name!r} with {self.cfg.method}: {e}{bad}") from e
        return g, outs

    def _write_model(self, directory: str) -> int:
        layout = [(j.name, j.out_dtype, j.shape) for j in self.jobs]
        w = ShardedWriter(directory, layout, self.out_shard_bytes, metadata={"merged_by": "fastmerge"})
        try:
            def write(r) -> None:
                if isinstance(r[0], Group):
                    for j, t in zip(r[0].jobs, r[1], strict=True):
                        self._check_finite(j, t)
                        w.write(j.name, t)
                    return
                self._check_finite(r[0], r[1])
                w.write(r[0].name, r[1])

            def merge(j, ts):
                return self._merge_group(j, ts) if isinstance(j, Group) else (j, self._merge_one(j, ts))

            self.stream(self.units(), merge, f"{self.cfg.method}", write=write)
            w.finish()
        finally:
            w.close()
        return w.bytes_written

    def side_source(self) -> str | None:
        ref = self._ref()
        return ref.path if os.path.isdir(ref.path) else None

    def _copy_side_files(self, directory: str) -> None:
        src = self.side_source()
        if src is None:
            return
        for f in SIDE_FILES:
            p = os.path.join(src, f)
            if not os.path.isfile(p):
                continue
            if f == "config.json" and not self.method.store:
                self._write_config(p, os.path.join(directory, f))
            else:
                shutil.copy2(p, os.path.join(directory, f))

    def _write_config(self, src: str, dst: str) -> None:
        """config.json from the base, with its dtype set to the output's floating dtype."""
        with open(src) as f:
            c = json.load(f)
        fl = [j.out_dtype for j in self.jobs if j.floating]
        if fl and isinstance(c, dict):
            name = str(fl[0]).replace("torch.", "")
            for k in ("torch_dtype", "dtype"):
                if k in c:
                    c[k] = name
        with open(dst, "w") as f:
            json.dump(c, f, indent=2)

    def _record(self, directory: str) -> None:
        import yaml

        from ._version import __version__

        raw = dict(self.cfg.raw)
        rec = {"fastmerge_version": __version__, "seed": self.seed, "device": str(self.device),
               "config": raw, "resolved": {"models": [m.path for m in self.cfg.models],
                                           "base_model": self.cfg.base.path if self.cfg.base else None,
                                           "dtype": str(self.cfg.dtype), "out_dtype": str(self.cfg.out_dtype),
                                           "options": self.cfg.options, "stats": self.stats}}
        with open(os.path.join(directory, RECORD), "w") as f:
            yaml.safe_dump(json.loads(json.dumps(rec, default=str)), f, sort_keys=False)


def merge(config, out_dir: str, *, device: str = "auto", out_shard_size: int | str = "5B", seed: int = 0,
          memory_budget: int | str | None = None, quiet: bool = False) -> MergeSummary:
    """Merge the models a mergekit-style config names into ``out_dir`` (an HF safetensors directory).

    config: a YAML path, YAML text or a dict. Returns a :class:`MergeSummary`. Everything is validated before
    anything is written; the output appears atomically.
    """
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    eng = Engine(cfg, device=device, seed=seed, memory_budget=memory_budget, out_shard_size=out_shard_size,
                 quiet=quiet)
    eng.plan()
    return eng.run(out_dir)
