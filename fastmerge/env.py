"""Every environment variable fastmerge reads, in one table; the package reads them here and nowhere else.

    variable               values                          read by / effect
    FASTMERGE_BACKEND      auto|reference|cpp|cuda|triton  backend(): one kernel backend for every op
                                                           (debugging, benchmarks; a config's fastmerge.backend
                                                           does it for one merge)
    FASTMERGE_THREADS      integer >= 1                    threads(): the subspace methods' LAPACK workers
                                                           (default: the cores this process may use)
    FASTMERGE_DIRECT_IO    1 (default) | 0                 direct_io(): 0 writes outputs through the page cache
    FASTMERGE_CPU_ISA      base | avx2                     the C++ kernels (csrc/cpu/common.h): cap the
                                                           instruction set picked at run time
    FASTMERGE_BUILD_CUDA   auto (default) | 0 | 1          setup.py: build the CUDA kernels (auto: when torch
                                                           has CUDA and nvcc is found)
    FASTMERGE_SKIP_EXT     0 (default) | 1                 setup.py: no extension (reference + Triton only)
    FASTMERGE_DEBUG        0 (default) | 1                 setup.py: build the extension with -O0 -g
    TRITON_INTERPRET       0 | 1                           triton_interpret() (Triton's own): Triton kernels on
                                                           CPU tensors, interpreted (tests)

The build-time variables are read by setup.py (which runs before the package exists) and FASTMERGE_CPU_ISA by
the compiled kernels; they are listed here so that this table is the whole story (the README links it).
"""

from __future__ import annotations

import os

BACKENDS = ("reference", "cpp", "cuda", "triton")

# (name, values) of every variable in the table above; tests check the code mentions no other FASTMERGE_*
VARIABLES = {
    "FASTMERGE_BACKEND": ("auto", *BACKENDS),
    "FASTMERGE_THREADS": None,
    "FASTMERGE_DIRECT_IO": ("0", "1"),
    "FASTMERGE_CPU_ISA": ("base", "avx2"),
    "FASTMERGE_BUILD_CUDA": ("auto", "0", "1"),
    "FASTMERGE_SKIP_EXT": ("0", "1"),
    "FASTMERGE_DEBUG": ("0", "1"),
    "TRITON_INTERPRET": ("0", "1"),
}


def backend() -> str | None:
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


def threads() -> int | None:
    """FASTMERGE_THREADS: the subspace methods' CPU worker count, or None (use the cores this process may use)."""
    v = os.environ.get("FASTMERGE_THREADS", "").strip()
    if not v:
        return None
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"FASTMERGE_THREADS must be an integer >= 1, got {v!r}")
    return int(v)


def direct_io() -> bool:
    """FASTMERGE_DIRECT_IO=0 turns off O_DIRECT output writes (default on where the filesystem allows it)."""
    v = os.environ.get("FASTMERGE_DIRECT_IO", "1").strip()
    if v not in ("0", "1"):
        raise ValueError(f"FASTMERGE_DIRECT_IO must be 0 or 1, got {v!r}")
    return v == "1"
