"""The one place where fastmerge reads its environment variables (FASTMERGE_*)."""

from __future__ import annotations

import os

BACKENDS = ("reference", "cpp", "cuda", "triton")


def forced_backend() -> str | None:
    """FASTMERGE_BACKEND=reference|cpp|cuda|triton forces one backend (debugging, benchmarks); unset/auto: pick."""
    v = os.environ.get("FASTMERGE_BACKEND", "auto").strip().lower()
    if v in ("", "auto"):
        return None
    if v not in BACKENDS:
        raise ValueError(f"FASTMERGE_BACKEND must be one of auto, {', '.join(BACKENDS)}; got {v!r}")
    return v


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (tests only; slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
