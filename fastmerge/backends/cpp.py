"""CPU C++ backend (OpenMP): the kernels of fastmerge._C (csrc/cpu/<op>.cpp), and orth_project on ATen's BLAS."""

from __future__ import annotations

import torch

from . import _native
from .registry import HALF, Backend

CPP = Backend("cpp", ("cpu",), HALF, unavailable=lambda: _native.ERROR)
_native.bind(CPP, "cpu", ("abs_histogram", "row_kth_largest_abs", "order_window", "prune", "della_prune", "ties_merge",
                          "tall_masks", "consensus_merge", "emr_elect", "doge_grad", "adam_step", "tv_combine",
                          "tv_coef_grad", "gta_merge"))


@CPP.kernel("orth_project")
def orth_project(x, u, out):
    """X - U (U^T X) as two GEMMs of the BLAS torch links (MKL/OpenBLAS): on a CPU they are the best kernel
    for this op (compute-bound for k >= ~16, and no fusion saves a pass that a cache-blocked GEMM does not)."""
    dt = torch.float64 if torch.float64 in (x.dtype, u.dtype) else torch.float32
    xf, uf = x.to(dt), u.to(dt)
    res = torch.baddbmm(xf, uf, uf.mT @ xf, alpha=-1.0)
    out.copy_(res)

