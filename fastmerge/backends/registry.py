"""Backend capability classes and the dispatcher (first backend with no reason against the call wins)."""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass

import torch

from .. import context, env

OPS = (
    "abs_histogram",
    "row_kth_largest_abs",
    "prune",
    "della_prune",
    "ties_merge",
    "tall_masks",
    "consensus_merge",
    "emr_elect",
    "orth_project",
    "doge_grad",
    "adam_step",
    "tv_combine",
    "tv_coef_grad",
)
_HALF = frozenset({torch.float32, torch.float16, torch.bfloat16})
REBUILD = "pip install --no-build-isolation -e ."


class NoBackendError(RuntimeError):
    """No backend can run this call; the message lists every backend's reason."""


@dataclass(frozen=True)
class Backend:
    """A backend: where it runs, which dtypes and ops it declares, and where its functions live."""

    name: str
    module: str
    devices: tuple[str, ...]
    dtypes: frozenset
    ops: frozenset
    max_experts: int | None = None

    def unavailable(self) -> str | None:
        """Why this backend cannot run at all on this machine (None when it can)."""
        return _load(self.module)[1]

    def reasons(self, op: str, device: torch.device, dtypes: tuple[torch.dtype, ...], n_experts: int = 0) -> list[str]:
        """Sentences saying why this backend cannot run ``op`` on these inputs (empty: it can)."""
        if op not in self.ops:
            return [f"{self.name} has no {op} kernel"]
        out = []
        if device.type not in self.devices:
            out.append(f"{self.name} runs on {'/'.join(self.devices)}, inputs are on {device.type}")
        bad = sorted({str(d).replace("torch.", "") for d in dtypes if d not in self.dtypes})
        if bad:
            out.append(f"{self.name} does not support dtype {', '.join(bad)}")
        if self.max_experts is not None and n_experts > self.max_experts:
            out.append(f"{self.name} takes at most {self.max_experts} experts, got {n_experts}")
        if not out:
            why = self.unavailable()
            if why:
                out.append(why)
        return out

    def fn(self, op: str):
        mod, why = _load(self.module)
        if mod is None:
            raise NoBackendError(f"backend {self.name} is unavailable: {why}")
        return getattr(mod, op)


_LOADED: dict[str, tuple[object | None, str | None]] = {}


def _load(module: str):
    """Import a backend adapter once; remember the reason when it fails (never raise at import)."""
    if module not in _LOADED:
        try:
            mod = importlib.import_module(module)
            why = getattr(mod, "UNAVAILABLE", None)
            _LOADED[module] = (None if why else mod, why)
        except Exception as e:  # noqa: BLE001 - any failure is reported as a reason, with the fix
            _LOADED[module] = (None, f"{module} failed to import: {e}")
    return _LOADED[module]


_ALL = frozenset(OPS)
BACKENDS: dict[str, Backend] = {
    "cpp": Backend("cpp", "fastmerge.backends.cpp", ("cpu",), _HALF, _ALL),
    # orth_project: on the CPU the two GEMMs of MKL/OpenBLAS (through ATen) are the kernel, on CUDA the fused
    # Triton kernel is (a hand-written CUDA GEMM would not beat either)
    # (the same for the DOGE step: its Triton kernels are the GPU path)
    "cuda": Backend("cuda", "fastmerge.backends.cuda", ("cuda",), _HALF,
                    _ALL - {"della_prune", "orth_project", "doge_grad", "adam_step", "tv_combine", "tv_coef_grad"},
                    max_experts=64),
    "triton": Backend(
        "triton",
        "fastmerge.backends.triton",
        ("cuda", "cpu"),
        _HALF,
        frozenset({"abs_histogram", "prune", "ties_merge", "tall_masks", "consensus_merge", "emr_elect",
                   "orth_project", "doge_grad", "adam_step", "tv_combine", "tv_coef_grad"}),
    ),
    "reference": Backend(
        "reference", "fastmerge.backends.reference", ("cpu", "cuda", "mps", "xpu"), _HALF | {torch.float64}, _ALL
    ),
}

PRIORITY = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
_warned: set[tuple[str, str]] = set()


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def select(op: str, device: torch.device, dtypes: tuple[torch.dtype, ...], n_experts: int = 0):
    """The function of the first backend that can run ``op`` on these inputs.

    FASTMERGE_BACKEND forces one backend (an error with its reasons when it cannot run the call). Otherwise
    the device's priority list is walked; falling back to the reference on a device that has a native
    backend warns once per (op, device).
    """
    forced = context.forced_backend()
    if forced == "triton" and device.type == "cpu" and not env.triton_interpret():
        raise NoBackendError(f"{op}: FASTMERGE_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
    names = (forced,) if forced else PRIORITY.get(device.type, ("reference",))
    reasons = {}
    for name in names:
        b = BACKENDS[name]
        why = b.reasons(op, device, dtypes, n_experts)
        if not why:
            if name == "reference" and not forced and len(names) > 1 and (op, device.type) not in _warned:
                _warned.add((op, device.type))
                warnings.warn(
                    f"fastmerge.{op}: falling back to the slow reference on {device.type} ("
                    + "; ".join(f"{k}: {', '.join(v)}" for k, v in reasons.items())
                    + ")",
                    stacklevel=4,
                )
            return b.fn(op)
        reasons[name] = why
    lines = "\n".join(f"  {k}: {'; '.join(v)}" for k, v in reasons.items())
    dt = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    raise NoBackendError(f"no fastmerge backend can run {op} on {device.type} ({dt}):\n{lines}")
