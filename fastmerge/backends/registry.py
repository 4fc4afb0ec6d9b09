"""Backends and the dispatcher (first backend with no reason against the call wins).

A backend is a :class:`Backend` created in its own module, which registers itself in ``BACKENDS`` and declares
what it cannot do (devices, dtypes, expert count, why it cannot run on this machine); its kernels register
themselves with :meth:`Backend.kernel`, so a backend's op set is what it registered, not a list kept here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .. import context, env

HALF = frozenset({torch.float32, torch.float16, torch.bfloat16})
REBUILD = "pip install --no-build-isolation -e ."
_UNASKED = object()


class NoBackendError(RuntimeError):
    """No backend can run this call; the message lists every backend's reason."""


class Backend:
    """A backend: where it runs, which dtypes it takes, the most experts a kernel takes, why it cannot run here
    (``unavailable()``: asked on first use, so that declaring a backend loads nothing), and its kernels."""

    def __init__(self, name: str, devices: tuple[str, ...], dtypes: frozenset, *, max_experts: int | None = None,
                 unavailable: Callable[[], str | None] | None = None):
        if name not in env.BACKENDS:
            raise ValueError(f"backend {name!r} is not in env.BACKENDS {env.BACKENDS} (FASTMERGE_BACKEND's values)")
        self.name = name
        self.devices = tuple(devices)
        self.dtypes = frozenset(dtypes)
        self.max_experts = max_experts
        self.ops: frozenset[str] = frozenset()
        self._ask = unavailable or (lambda: None)
        self._why: str | None | object = _UNASKED
        self._loaders: dict[str, Callable[[], Callable]] = {}
        self._kernels: dict[str, Callable] = {}  # loaded, once the backend is known to be available
        BACKENDS[name] = self

    def kernel(self, op: str, load: Callable[[], Callable] | None = None):
        """Register this backend's kernel of ``op``: ``@backend.kernel(op)`` on the function, or ``load``, a function
        returning the kernel, called on first use (a compiled extension or a Triton module is imported only when an
        op needs it)."""
        if load is None:

            def register(fn: Callable) -> Callable:
                self.kernel(op, lambda: fn)
                return fn

            return register
        self._loaders[op] = load
        self.ops = self.ops | {op}
        return load

    def unavailable(self) -> str | None:
        """Why this backend cannot run at all on this machine (None when it can); asked once."""
        if self._why is _UNASKED:
            try:
                self._why = self._ask()
            except Exception as e:  # noqa: BLE001 - any failure is reported as a reason, never raised at dispatch
                self._why = f"backend {self.name} failed to load: {e}"
        return self._why

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
        fn = self._kernels.get(op)
        if fn is None:
            why = self.unavailable()
            if why:
                raise NoBackendError(f"backend {self.name} is unavailable: {why}")
            fn = self._kernels[op] = self._loaders[op]()
        return fn


BACKENDS: dict[str, Backend] = {}  # filled by the backend modules (imported by fastmerge.backends)
PRIORITY = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
_warned: set[tuple[str, str]] = set()


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def select(op: str, device: torch.device, dtypes: tuple[torch.dtype, ...], n_experts: int = 0):
    """The function of the first backend that can run ``op`` on these inputs.

    The op context's backend (context.forced_backend()) is the only one tried (an error with its reasons when it
    cannot run the call). Otherwise the device's priority list is walked; falling back to the reference on a
    device that has a native backend warns once per (op, device).
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
