"""CUDA C++ backend: thin adapter over fastmerge._C.*_cuda (present when the extension was built with CUDA)."""

from __future__ import annotations

from . import _native
from .registry import OPS, REBUILD

UNAVAILABLE = _native.ERROR
if UNAVAILABLE is None and not getattr(_native._C, "with_cuda", False):
    UNAVAILABLE = (
        "the extension was built without CUDA (CPU-only torch or no nvcc); on a CUDA machine rebuild with "
        f"`FASTMERGE_BUILD_CUDA=1 {REBUILD}`"
    )
globals().update(_native.bind("cuda", OPS))
