"""The merge engine: config -> plan -> schedule -> execute -> sink, in bounded memory.

* **Plan** (fastmerge.plan.plan): every model's safetensors headers, checked against the base's names,
  shapes and dtypes; one frozen job per output tensor. Every error is raised here, before anything is written.
* **Schedule** (fastmerge.plan.schedule): jobs in the base's (shard, offset) order; stacks of same-shape
  tensors for methods that merge stacks; the memory budget.
* **Statistics** (fastmerge.plan.stats, ``Method.prepare``): streamed passes before the merge pass.
* **Execute** (fastmerge.execute.executor): a reader -> compute -> writer pipeline under the budget.
* **Sink** (fastmerge.execute.sinks): one model, or the method's multi-task store.

The output is written into a temporary directory beside OUT and renamed at the end: a failure or Ctrl-C
leaves neither OUT nor temp files.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import context, methods
from .config import ConfigError, MergeConfig
from .config import load as load_config
from .execute import sinks
from .execute.executor import Executor, MallocPolicy, peak_rss
from .io import Checkpoint, OutputDir, check_mapped, parse_size
from .lora import LoraCheckpoint
from .plan import Group, Job
from .plan import plan as planner
from .plan.stats import global_trim
from .signals import interruptible


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


class Engine:
    """One merge: checks the config against its method, plans from the headers, runs the passes, writes."""

    def __init__(self, cfg: MergeConfig, *, device: str = "auto", seed: int = 0,
                 memory_budget: int | str | None = None, out_shard_size: int | str = "5B", quiet: bool = False,
                 overwrite: bool = False, copy_tokenizer: bool = True, model_card: bool = True,
                 config_source: str | None = None):
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
        self.executor: Executor | None = None
        self.overwrite, self.copy_tokenizer, self.model_card = overwrite, copy_tokenizer, model_card
        self.config_source = config_source

    @property
    def jobs(self) -> list[Job]:
        return self.executor.jobs if self.executor is not None else []

    def plan(self) -> list[Job]:
        t0 = time.perf_counter()
        ckpts: list[Checkpoint] = []
        try:
            for m in self.cfg.models:
                ckpts.append(Checkpoint(m.path, name=m.label) if m.lora is None else
                             LoraCheckpoint(m.path, m.lora, name=m.label))
            vocab = None
            if self.cfg.tokenizer is not None:  # transformers is imported only for this
                from . import tokenizer

                vocab = tokenizer.build(self.cfg, self.cfg.tokenizer)
            jobs = planner.build(self.cfg, self.method, ckpts, vocab)
        except BaseException:
            for ck in ckpts:
                ck.close()
            raise
        self.executor = Executor(self.cfg, self.method, ckpts, jobs, device=self.device, seed=self.seed, vocab=vocab,
                             user_budget=self.user_budget, out_shard_bytes=self.out_shard_bytes, quiet=self.quiet)
        self.executor.stages["plan"] += time.perf_counter() - t0
        return jobs

    def units(self) -> list[Job | Group]:
        return self.executor.units()

    def run(self, out_dir: str) -> MergeSummary:
        t_start = time.perf_counter()
        forced = self.cfg.options.get("backend")
        keep = self.method.batch is not None and self.device.type == "cpu"
        with interruptible(), MallocPolicy(keep_freed=keep), context.use(
                backend=None if forced in (None, "auto") else forced):
            return self._run(out_dir, t_start)

    def _run(self, out_dir: str, t_start: float) -> MergeSummary:
        try:
            if self.executor is None:
                self.plan()
            run = self.executor
            with OutputDir(out_dir, overwrite=self.overwrite) as od:
                global_trim(run)
                if self.method.prepare is not None:
                    t0 = time.perf_counter()
                    self.method.prepare(run)
                    run.stages["stats"] += time.perf_counter() - t0
                extra = (self.method.sink or sinks.write_model)(run, od)
                written = extra.pop("bytes_written")
                sinks.copy_side_files(run, od.tmp, tokenizer=self.copy_tokenizer)
                sinks.write_record(run, od.tmp)
                if not self.method.store:
                    sinks.write_mergekit_files(run, od.tmp, self.config_source, card=self.model_card,
                                               name=os.path.basename(os.path.abspath(out_dir)))
                check_mapped()
                od.commit()
        finally:
            for ck in self.executor.ckpts if self.executor is not None else ():
                ck.close()
        gpu = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        return MergeSummary(os.path.abspath(out_dir), self.cfg.method, len(run.jobs), time.perf_counter() - t_start,
                            run.bytes_read, written, peak_rss(), gpu, run.passes,
                            run.budget_bytes(True), dict(run.stages), {**run.notes, **extra})


def merge(config, out_dir: str, *, device: str = "auto", out_shard_size: int | str = "5B", seed: int = 0,
          memory_budget: int | str | None = None, quiet: bool = False, overwrite: bool = False,
          copy_tokenizer: bool = True, model_card: bool = True) -> MergeSummary:
    """Merge the models a mergekit-style config names into ``out_dir`` (an HF safetensors directory).

    config: a YAML path, YAML text, a dict, or a mergekit ``MergeConfiguration`` (or its ``model_dump()``).
    Returns a :class:`MergeSummary`. Everything is validated before anything is written; the output appears
    atomically. Beside the weights, as mergekit writes them: ``mergekit_config.yml`` (the config as given), a
    README.md model card (``model_card``), the base's tokenizer files (``copy_tokenizer``); and fastmerge's
    own record, ``fastmerge_config.yml``. ``overwrite``: replace an existing output (a folder holding only
    what a merge writes) in one atomic exchange; otherwise an existing ``out_dir`` is an error.
    """
    if hasattr(config, "model_dump") and not isinstance(config, MergeConfig):  # a mergekit MergeConfiguration
        config = config.model_dump(mode="json", exclude_none=True)
    source = _source_text(config)
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    eng = Engine(cfg, device=device, seed=seed, memory_budget=memory_budget, out_shard_size=out_shard_size,
                 quiet=quiet, overwrite=overwrite, copy_tokenizer=copy_tokenizer, model_card=model_card,
                 config_source=source)
    eng.plan()
    return eng.run(out_dir)


def _source_text(config) -> str | None:
    """The config's own text, for mergekit_config.yml: a file's or a YAML string's as written; None for a dict
    (written as YAML from the parsed config)."""
    if isinstance(config, (str, os.PathLike)):
        text = str(config)
        if "\n" not in text and os.path.isfile(text):
            try:
                with open(text, encoding="utf-8") as f:
                    return f.read()
            except (OSError, UnicodeDecodeError):
                return None  # config.load reports it
        return text
    return None
