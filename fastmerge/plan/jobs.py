"""The frozen plan: one Job per output tensor (where its inputs are, how it is merged) and Groups of
same-shape jobs that a stacking method merges as one. Built by the engine from the headers alone; read by
every stage after it (scheduler, executor, sinks) and changed by none."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..io import TensorInfo, _itemsize


@dataclass(frozen=True)
class Job:
    """One output tensor: where its inputs are, how it is merged."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[TensorInfo, ...]         # one per input (config order); only the reference's when copied
    floating: bool
    out_dtype: torch.dtype
    shared: dict[str, Any]
    per_input: tuple[dict[str, Any], ...]
    inputs: tuple[int, ...]                 # the checkpoint (index into cfg.models) of each source
    base_index: int | None                  # which source is the base
    vocab: bool = False                     # token-indexed rows, re-indexed to the output tokenizer before merging

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def in_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources)

    @property
    def out_bytes(self) -> int:
        return self.numel * _itemsize(self.out_dtype)


@dataclass(frozen=True)
class Group:
    """Same-shape jobs merged as one stack (methods with a ``batch`` function): read, merged and written
    together, budgeted as one."""

    jobs: tuple[Job, ...]

    @property
    def name(self) -> str:
        return self.jobs[0].name + (f" (+{len(self.jobs) - 1} same-shape)" if len(self.jobs) > 1 else "")

    @property
    def in_bytes(self) -> int:
        return sum(j.in_bytes for j in self.jobs)

    @property
    def out_bytes(self) -> int:
        return sum(j.out_bytes for j in self.jobs)
