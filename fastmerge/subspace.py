"""Subspace kernels: batched truncated SVD, polar factor, orthogonal projection.

Every function takes a stack of same-shape matrices (``(..., m, n)``; a single matrix is a stack of one) and
works in batch: one LAPACK/cuSOLVER or BLAS/cuBLAS call per step for the whole stack. On the CPU the stack is
split over worker threads, each running single-threaded LAPACK (two threads of one-threaded ``eigh`` beat one
two-threaded ``eigh`` by 1.2-1.7x on the 2-core CI VM, and MKL's LAPACK barely scales at these sizes).

Modes (``mode=``):

* ``exact``: ``torch.linalg.svd``, as the official code does (the oracle).
* ``fast`` (default): the same singular triplets and polar factors from one symmetric eigendecomposition of an
  fp64 Gram matrix per step instead of an SVD. fp64 matters: the triplets TSV-M keeps often end inside a flat
  noise bulk whose consecutive singular values differ by ~1e-3 relative, and an fp32 Gram (eps x kappa^2)
  cannot order them; in fp64 the merged weights match an exact fp64 SVD to ~1e-5.
* ``randomized``: a randomized range finder (Halko et al.) with ``power_iters`` power iterations,
  ``oversample`` extra columns and CholeskyQR2 re-orthonormalisation on an fp64 Gram (Householder QR for the
  stack members whose Cholesky fails), then the fast path on the small projected matrix. GEMM-bound and much
  cheaper when k << min(m, n), but it only approximates the top-k subspace: where the cut falls inside a
  flat part of the spectrum it picks different (equally good) directions than an exact SVD, so merged
  weights can differ by 1e-2-1e-1 relative. Opt-in; the benchmarks print its error.

The polar factor (the orthogonal matrix closest to X, U V^T of its thin SVD) is X (X^T X)^(-1/2) from the fp64
Gram's eigendecomposition; eigenvalues at round-off level (exactly dependent or zero columns) are treated as
zero, so the factor is a partial isometry there. Wherever the official code multiplies those directions by a
zero singular value (TSV-M's empty slots) the result is the same; an SVD fills them with an arbitrary
orthonormal completion instead.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

MODES = ("exact", "fast", "randomized")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def workers() -> int:
    """CPU worker threads for batched LAPACK: FASTMERGE_THREADS, else the cores this process may use."""
    env = os.environ.get("FASTMERGE_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="fastmerge-linalg")
        return _pool


class _one_thread:
    """torch intra-op threads set to 1 while worker threads run LAPACK side by side (restored after)."""

    depth = 0
    lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            if _one_thread.depth == 0:
                _one_thread.saved = torch.get_num_threads()
                torch.set_num_threads(1)
            _one_thread.depth += 1

    def __exit__(self, *exc):
        with self.lock:
            _one_thread.depth -= 1
            if _one_thread.depth == 0:
                torch.set_num_threads(_one_thread.saved)


def batched(fn: Callable[..., tuple | torch.Tensor], *xs: torch.Tensor) -> tuple | torch.Tensor:
    """``fn`` over a stack (leading dim of every x), split across CPU worker threads; one call on a GPU."""
    n = xs[0].shape[0]
    w = min(workers(), n)
    if xs[0].device.type != "cpu" or w <= 1 or n <= 1:
        return fn(*xs)
    bounds = [round(i * n / w) for i in range(w + 1)]
    with _one_thread():
        futs = [_executor().submit(fn, *(x[a:b] for x in xs)) for a, b in zip(bounds, bounds[1:], strict=False)]
        parts = [f.result() for f in futs]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))


def _stack(a: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if a.dim() < 2:
        raise ValueError(f"{name} must be a matrix or a stack of matrices, got shape {tuple(a.shape)}")
    if not a.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {a.dtype}")
    single = a.dim() == 2
    return (a.unsqueeze(0) if single else a.reshape(math.prod(a.shape[:-2]), *a.shape[-2:])), single


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"svd mode must be one of {', '.join(MODES)}, got {mode!r}")


# ---------------------------------------------------------------------------------------------------------
# eigen-based building blocks (fp64)


def _eigh_desc(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of symmetric (B, n, n), largest first."""
    w, v = torch.linalg.eigh(g)
    return w[:, -k:].flip(-1), v[:, :, -k:].flip(-1)


def _work(a: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs that apply eigenvectors run in: fp64 for fp64 inputs, else fp32 (only the Gram
    matrices and the eigensolvers need fp64; applying their result is an ordinary, well-conditioned GEMM)."""
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def _gram(a: torch.Tensor) -> torch.Tensor:
    """fp64 A^T A of a tall stack (B, m, n), m >= n. Much taller than wide (m >= 2n), A is first reduced to its
    triangular factor by a Householder QR in A's precision (backward stable, so the singular values move by
    eps |A|, as in an SVD of A) and only the n x n factor is squared in fp64: half the flops, in fp32."""
    m, n = a.shape[-2:]
    if m >= 2 * n and a.dtype != torch.float64:
        r = torch.linalg.qr(a.float(), mode="r").R.double()
        return r.mT @ r
    ad = a.double()
    return ad.mT @ ad


def _topk_gram(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of (B, m, n) from the fp64 Gram of the smaller side. Singular values at
    round-off level get zero vectors (an SVD would return arbitrary orthonormal ones)."""
    m, n = a.shape[-2:]
    tall = m >= n
    at = a if tall else a.mT
    w, v = _eigh_desc(_gram(at), k)
    s = w.clamp_min(0).sqrt()
    tol = s[:, :1] * (max(m, n) * torch.finfo(torch.float64).eps * 8)
    inv = torch.where(s > tol, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    dt = _work(a)
    u = (at.to(dt) @ v.to(dt)) * inv.to(dt).unsqueeze(1)
    return (u, s, v.mT) if tall else (v, s, u.mT)


def _polar_gram(x: torch.Tensor, with_nuclear: bool = False):
    """(B, m, r) with m >= r: X (X^T X)^(-1/2) (pseudo-inverse on round-off eigenvalues): the Gram and its
    eigendecomposition in fp64, then one GEMM with the r x r factor; optionally also the sum of X's singular
    values (its nuclear norm)."""
    w, q = torch.linalg.eigh(_gram(x))
    tol = w[:, -1:].clamp_min(0) * (x.shape[-2] * torch.finfo(torch.float64).eps * 8)
    pos = w > tol
    inv = torch.where(pos, w.clamp_min(1e-300).rsqrt(), torch.zeros_like(w))
    dt = _work(x)
    p = x.to(dt) @ ((q * inv.unsqueeze(1)) @ q.mT).to(dt)
    if with_nuclear:
        return p, torch.where(pos, w.clamp_min(0).sqrt(), torch.zeros_like(w)).sum(-1)
    return p


# ---------------------------------------------------------------------------------------------------------
# randomized range finder


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """CholeskyQR2 with an fp64 Gram (two passes); Householder QR for stack members whose Cholesky fails
    (rank-deficient blocks, e.g. a zero task vector)."""
    for _ in range(2):
        yd = y.double()
        g = yd.mT @ yd
        r, info = torch.linalg.cholesky_ex(g, upper=True)
        bad = info != 0
        if bool(bad.any()):
            eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
            r = torch.where(bad[:, None, None], eye, r)
        y = torch.linalg.solve_triangular(r, yd, upper=True, left=False).to(y.dtype)
        if bool(bad.any()):
            y[bad] = torch.linalg.qr(yd[bad].to(y.dtype)).Q
    return y


def _topk_randomized(a: torch.Tensor, k: int, oversample: int, power_iters: int, seed: int):
    b, m, n = a.shape
    r = min(m, n)
    ell = min(r, k + oversample)
    if ell >= r:  # nothing to gain: the full-accuracy path
        return _topk_gram(a, k)
    af = a.float()
    g = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(b, n, ell, generator=g, device=a.device, dtype=af.dtype)
    y = _orthonormalize(af @ omega)
    for _ in range(power_iters):
        z = _orthonormalize(af.mT @ y)
        y = _orthonormalize(af @ z)
    proj = y.mT @ af  # (B, ell, n)
    u, s, vh = _topk_gram(proj, k)
    return y.double() @ u, s, vh


# ---------------------------------------------------------------------------------------------------------
# public kernels


def svd_topk(a: torch.Tensor, k: int, *, mode: str = "fast", oversample: int | None = None, power_iters: int = 2,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets of each matrix in a stack: U (..., m, k), S (..., k), Vh (..., k, n).

    Returned in fp32 (fp64 for fp64 input). ``mode``: exact | fast | randomized (see the module docstring);
    ``oversample`` (default max(10, k/2)) and ``power_iters`` apply to randomized only; ``seed`` makes its
    test matrix reproducible."""
    _check_mode(mode)
    x, single = _stack(a, "a")
    r = min(x.shape[-2:])
    if not 0 <= k <= r:
        raise ValueError(f"k must lie in [0, min(m, n)] = [0, {r}], got {k}")
    out_dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    if k == 0 or x.shape[0] == 0:
        u = x.new_zeros(*x.shape[:-1], k, dtype=out_dt)
        res = (u, x.new_zeros(x.shape[0], k, dtype=out_dt), x.new_zeros(x.shape[0], k, x.shape[-1], dtype=out_dt))
    elif mode == "exact":
        def exact(xb):
            u, s, vh = torch.linalg.svd(xb.to(out_dt), full_matrices=False)
            return u[..., :k], s[..., :k], vh[..., :k, :]
        res = batched(exact, x)
    elif mode == "fast":
        res = batched(lambda xb: _topk_gram(xb, k), x)
    else:
        p = max(10, k // 2) if oversample is None else int(oversample)
        res = batched(lambda xb: _topk_randomized(xb, k, p, power_iters, seed), x)
    res = tuple(t.to(out_dt) for t in res)
    if single:
        return res[0][0], res[1][0], res[2][0]
    lead = a.shape[:-2]
    u, s, vh = res
    return u.reshape(*lead, *u.shape[-2:]), s.reshape(*lead, k), vh.reshape(*lead, *vh.shape[-2:])


def polar(x: torch.Tensor, *, mode: str = "fast", nuclear: bool = False):
    """The orthogonal polar factor of each matrix in a stack (U V^T of its thin SVD), fp32 (fp64 for fp64).

    ``nuclear=True`` also returns each matrix's sum of singular values (Iso-C's mean singular value is it
    divided by min(m, n)). ``mode``: exact (SVD) | fast (fp64 Gram + eigh); randomized is not a polar mode."""
    if mode == "randomized":
        raise ValueError("polar has modes exact and fast (randomized applies to svd_topk only)")
    _check_mode(mode)
    xs, single = _stack(x, "x")
    out_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    m, n = xs.shape[-2:]
    if xs.shape[0] == 0 or m == 0 or n == 0:
        p, nuc = xs.to(out_dt).clone(), xs.new_zeros(xs.shape[0], dtype=out_dt)
    elif mode == "exact":
        def exact(xb):
            u, s, vh = torch.linalg.svd(xb.to(out_dt), full_matrices=False)
            return u @ vh, s.sum(-1)
        p, nuc = batched(exact, xs)
    else:
        tall = m >= n

        def fast(xb):
            p, nuc = _polar_gram(xb if tall else xb.mT, with_nuclear=True)
            return (p if tall else p.mT), nuc
        p, nuc = batched(fast, xs)
    p, nuc = p.to(out_dt), nuc.to(out_dt)
    if single:
        p, nuc = p[0], nuc[0]
    else:
        p, nuc = p.reshape(x.shape), nuc.reshape(x.shape[:-2])
    return (p, nuc) if nuclear else p


def project_out(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """X - U (U^T X) for each matrix of a stack, U with orthonormal columns (..., m, k): the part of X outside
    span(U). On the fused ``orth_project`` op (one pass over X per column block on GPU)."""
    from . import ops

    return ops.orth_project(x, u)


def tsv_pack_sizes(r: int, tasks: int) -> int:
    """TSV's per-task rank: int(r * (1/T)) (a float product, then floor, as the official code)."""
    return int(r * (1.0 / tasks))


def iso_cts_sizes(r: int, tasks: int, common_fraction: float = 0.8) -> tuple[int, int]:
    """Iso-CTS (k_common, k_per_task): k_c = int(r f), then the task part r - k_c is rounded to a multiple of
    T with Python's round (half to even), as the official code does."""
    kc = int(r * common_fraction)
    ts = round((r - kc) / tasks) * tasks
    kc = r - ts
    return kc, (r - kc) // tasks

