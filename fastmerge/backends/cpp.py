"""CPU C++ backend (OpenMP): thin adapter over fastmerge._C.*_cpu."""

from __future__ import annotations

import torch

from . import _native
from .registry import OPS

UNAVAILABLE = _native.ERROR
globals().update(_native.bind("cpu", OPS))


def orth_project(x, u, out):
    """X - U (U^T X) as two GEMMs of the BLAS torch links (MKL/OpenBLAS): on a CPU they are the best kernel
    for this op (compute-bound for k >= ~16, and no fusion saves a pass that a cache-blocked GEMM does not)."""
    dt = torch.float64 if torch.float64 in (x.dtype, u.dtype) else torch.float32
    xf, uf = x.to(dt), u.to(dt)
    res = torch.baddbmm(xf, uf, uf.mT @ xf, alpha=-1.0)
    out.copy_(res)
