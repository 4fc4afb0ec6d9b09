"""Backends of the fastmerge ops and the capability-based dispatcher.

Every backend is a ``Backend`` declared in its own module here, which registers its kernels (one function per
op it implements, the signature of the op's torch.library schema, filling preallocated outputs): ``cpp`` and
``cuda`` bind the compiled extension fastmerge._C, ``triton`` the modules of fastmerge._kernels, and
``reference`` runs the oracles (registered by the op files, fastmerge/ops/). Nothing here imports triton, loads
the extension or touches CUDA at import time.
"""

from . import cpp, cuda, triton, reference  # noqa: F401, I001 - each declares its backend (this order: BACKENDS)
from .registry import BACKENDS, PRIORITY, NoBackendError, get_backend, select

__all__ = ["BACKENDS", "PRIORITY", "NoBackendError", "get_backend", "select"]
