"""Backends of the fastmerge ops and the capability-based dispatcher.

Every backend module exposes the same functions (one per op, the signature of the op's torch.library
schema, filling preallocated outputs). ``reference`` wraps fastmerge.reference and runs anywhere; ``cpp``
and ``cuda`` call the compiled extension fastmerge._C; ``triton`` calls fastmerge._kernels. Nothing here
imports triton or touches CUDA at import time.
"""

from .registry import BACKENDS, OPS, NoBackendError, get_backend, select

__all__ = ["BACKENDS", "OPS", "NoBackendError", "get_backend", "select"]
