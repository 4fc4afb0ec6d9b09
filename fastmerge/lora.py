"""LoRA inputs (mergekit's ``model: BASE+ADAPTER``): a PEFT adapter folder applied to its model's tensors as
they are read, so no merged copy of the model is ever written (mergekit merges the adapter through PEFT into a
full copy on disk first).

A targeted weight comes out as PEFT's ``merge_and_unload`` leaves it for a model loaded in its own dtype (what
transformers' ``from_pretrained`` does by default, and so mergekit): the adapter's factors in fp32 (PEFT upcasts
16-bit adapters on load), ``delta = (B @ A) * scaling`` (transposed for ``fan_in_fan_out`` and for embedding
LoRA), then ``W + delta`` rounded once to W's dtype. The product is torch's matmul, so the bytes are PEFT's.
``scaling`` is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per module from ``rank_pattern`` and
``alpha_pattern`` where they match. Full weights the adapter saves (``modules_to_save``) replace the model's.
DoRA, LoRA biases and other tuners are refused by name.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from .io import Checkpoint, CheckpointError, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$|"
                     r"^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class _Target:
    a: str                  # adapter tensor names
    b: str
    scaling: float
    transpose: bool


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the module name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """One PEFT LoRA adapter folder: which of its model's tensors it changes, and how."""

    def __init__(self, path: str, label: str):
        self.path, self.label = path, label
        cfg_path = os.path.join(path, ADAPTER_CONFIG)
        weights = os.path.join(path, ADAPTER_WEIGHTS)
        if not os.path.isdir(path):
            raise CheckpointError(f"{label}: LoRA adapter {path} does not exist")
        if not os.path.isfile(cfg_path) or not os.path.isfile(weights):
            raise CheckpointError(f"{label}: {path} is not a PEFT LoRA adapter folder (needs {ADAPTER_CONFIG} and "
                                  f"{ADAPTER_WEIGHTS}; pickled adapter_model.bin files are never loaded)")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{label}: {cfg_path} is not valid JSON ({str(e)[:200]})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{label}: {cfg_path} must hold a JSON object")
        where = f"{label}: {cfg_path}"
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (LoRA only)")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{where}: DoRA adapters (use_dora) are not supported")
        if cfg.get("lora_bias"):
            raise CheckpointError(f"{where}: adapters with LoRA biases (lora_bias) are not supported")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        for key, v in (("r", r), ("lora_alpha", alpha)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise CheckpointError(f"{where}: {key} must be a positive number, got {v!r}")
        self.header = read_header(weights, label)
        self.file = weights
        self.targets: dict[str, _Target] = {}
        self.replaced: dict[str, str] = {}
        factors: dict[str, dict[str, str]] = {}
        for name in self.header:
            if not name.startswith(_PREFIX):
                raise CheckpointError(f"{label}: {weights}: tensor {name!r} does not start with {_PREFIX!r} "
                                      "(not a PEFT LoRA adapter of a whole model)")
            m = _FACTOR.match(name)
            if m is None:
                if "lora_" in name:
                    raise CheckpointError(f"{label}: {weights}: tensor {name!r} is not a LoRA factor fastmerge "
                                          "can apply")
                self.replaced[name[len(_PREFIX):]] = name  # a full weight (modules_to_save)
                continue
            module = m.group("module") or m.group("emodule")
            kind = (m.group("kind") or m.group("ekind"))[-1]
            factors.setdefault(module, {})[kind] = name
        for module, ab in factors.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{label}: {weights}: module {module[len(_PREFIX):]!r} has lora_"
                                      f"{next(iter(ab))} but not its other factor")
            short = module[len(_PREFIX):]
            rank = _pattern_value(cfg.get("rank_pattern"), short, r)
            a = _pattern_value(cfg.get("alpha_pattern"), short, alpha)
            scaling = a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank
            embedding = ab["A"].endswith("lora_embedding_A")  # (B @ A).T: A is r x vocab, B dim x r
            self.targets[short + ".weight"] = _Target(ab["A"], ab["B"], scaling,
                                                      embedding or bool(cfg.get("fan_in_fan_out")))


class LoraCheckpoint(Checkpoint):
    """A model with a LoRA adapter applied to the tensors it targets as they are read (headers unchanged)."""

    def __init__(self, path: str, adapter: str, name: str | None = None):
        super().__init__(path, name)
        self.adapter = LoraAdapter(adapter, self.name)
        self._adapter = Checkpoint(self.adapter.file, name=self.name)
        for tname, t in self.adapter.targets.items():
            self._check_target(tname, t)
        for tname, src in self.adapter.replaced.items():
            if tname not in self.tensors:
                raise CheckpointError(f"{self.name}: adapter tensor {src!r} replaces {tname!r}, which the model lacks")
            have, want = self._adapter.tensors[src], self.tensors[tname]
            if have.shape != want.shape:
                raise CheckpointError(f"{self.name}: adapter tensor {src!r} has shape {list(have.shape)}, the "
                                      f"model's {tname!r} has {list(want.shape)}")

    def _check_target(self, tname: str, t: _Target) -> None:
        if tname not in self.tensors:
            raise CheckpointError(f"{self.name}: adapter factor {t.a!r} targets {tname!r}, which the model lacks")
        w = self.tensors[tname]
        a, b = self._adapter.tensors[t.a], self._adapter.tensors[t.b]
        ok = len(w.shape) == 2 and len(a.shape) == 2 and len(b.shape) == 2 and a.shape[0] == b.shape[1]
        if ok:
            out = (b.shape[0], a.shape[1])
            ok = (out[::-1] if t.transpose else out) == tuple(w.shape)
        if not ok or not (w.dtype.is_floating_point and a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise CheckpointError(f"{self.name}: adapter factors {list(b.shape)} @ {list(a.shape)} do not fit "
                                  f"{tname!r} {list(w.shape)} ({w.dtype})")

    def _applied(self, name: str, w: torch.Tensor) -> torch.Tensor:
        src = self.adapter.replaced.get(name)
        if src is not None:
            return self._adapter.read(src).to(w.dtype)
        t = self.adapter.targets.get(name)
        if t is None:
            return w
        return lora_apply(w, self._adapter.read(t.b), self._adapter.read(t.a), t.scaling, t.transpose)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        w = super().read(name, out)
        return self._applied(name, w)

    def map(self, name: str) -> torch.Tensor:
        changed = name in self.adapter.targets or name in self.adapter.replaced
        return self._applied(name, super().read(name)) if changed else super().map(name)

    def close(self) -> None:
        self._adapter.close()
        super().close()


def lora_apply(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float, transpose: bool) -> torch.Tensor:
    """``w + (b @ a) * scaling`` (``(b @ a).T`` with ``transpose``) as PEFT merges it: factors in fp32, one
    rounding to w's dtype at the end. A new tensor; w is not written."""
    delta = torch.mm(b.float(), a.float())
    if transpose:
        delta = delta.T
    delta = delta * scaling
    return delta.add_(w) if w.dtype == torch.float32 else (w.float() + delta).to(w.dtype)
