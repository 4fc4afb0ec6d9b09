"""CPU C++ backend (OpenMP): thin adapter over fastmerge._C.*_cpu."""

from __future__ import annotations

from . import _native
from .registry import OPS

UNAVAILABLE = _native.ERROR
globals().update(_native.bind("cpu", OPS))
