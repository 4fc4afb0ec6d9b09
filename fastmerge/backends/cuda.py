"""CUDA C++ backend: the kernels of fastmerge._C built with CUDA (csrc/cuda/<op>.cu).

It has no kernel of orth_project (on CUDA the fused Triton kernel is the path; a hand-written GEMM would not beat
it), of DOGE's step (doge_grad, adam_step) or of the TTA ops (tv_combine, tv_coef_grad): Triton runs those, and
none of della_prune. A launch takes at most 64 experts (kMaxTasks in csrc/cuda/kernels/common.cuh).
"""

from __future__ import annotations

from . import _native
from .registry import HALF, REBUILD, Backend


def _unavailable() -> str | None:
    if _native.ERROR is not None:
        return _native.ERROR
    if not getattr(_native._C, "with_cuda", False):
        return ("the extension was built without CUDA (CPU-only torch or no nvcc); on a CUDA machine rebuild with "
                f"`FASTMERGE_BUILD_CUDA=1 {REBUILD}`")
    return None


CUDA = Backend("cuda", ("cuda",), HALF, max_experts=64, unavailable=_unavailable)
_native.bind(CUDA, "cuda", ("abs_histogram", "row_kth_largest_abs", "prune", "ties_merge", "tall_masks",
                            "consensus_merge", "emr_elect"))
