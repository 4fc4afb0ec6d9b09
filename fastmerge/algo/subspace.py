"""Subspace kernels: batched truncated SVD, polar factor, orthogonal projection.

Every function takes a stack of same-shape matrices (``(..., m, n)``; a single matrix is a stack of one) and
works in batch: one LAPACK/cuSOLVER or BLAS/cuBLAS call per step for the whole stack. On the CPU the stack is
split over worker threads, each running single-threaded LAPACK (two threads of one-threaded ``eigh`` beat one
two-threaded ``eigh`` by 1.2-1.7x on the 2-core CI VM, and MKL's LAPACK barely scales at these sizes). The
symmetric eigensolver (``eigh``) and the fp64 Gram matrices and GEMMs around it run on numpy's BLAS/LAPACK
where it can be held to one thread (``_prefer_numpy``).

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

The polar factor (the orthogonal matrix closest to X, U V^T of its thin SVD) is X W with W = (X^T X)^(-1/2) from
the fp64 Gram's eigendecomposition (``polar_right`` returns W itself, for callers that can multiply it into a
smaller neighbour first; for two orthonormal blocks, TSV-M's case at T = 2, it has a closed form from the
principal angles between the blocks); eigenvalues at round-off level (exactly dependent or zero columns) are
treated as zero, so the factor is a partial isometry there. Wherever the official code multiplies those directions by a
zero singular value (TSV-M's empty slots) the result is the same; an SVD fills them with an arbitrary
orthonormal completion instead.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import context, env, ops

MODES = ("exact", "fast", "randomized")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def workers() -> int:
    """CPU worker threads for batched LAPACK: FASTMERGE_THREADS, else the cores this process may use."""
    n = env.threads()
    if n is not None:
        return n
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


@functools.cache
def _numpy_blas():
    """threadpoolctl's handle on numpy's BLAS/LAPACK thread pool (OpenBLAS in numpy's wheels), or None without
    threadpoolctl: numpy's LAPACK then stays out of the worker threads, whose calls must run one-threaded."""
    import numpy.linalg  # noqa: F401  (its BLAS must be loaded to be found)

    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController().select(user_api="blas")


class _one_thread:
    """torch's intra-op threads and numpy's BLAS threads set to 1 while worker threads run LAPACK side by side
    (restored after)."""

    depth = 0
    lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            if _one_thread.depth == 0:
                _one_thread.saved = torch.get_num_threads()
                torch.set_num_threads(1)
                blas = _numpy_blas()
                _one_thread.blas = blas.limit(limits=1) if blas is not None and len(blas) else None
            _one_thread.depth += 1

    def __exit__(self, *exc):
        with self.lock:
            _one_thread.depth -= 1
            if _one_thread.depth == 0:
                torch.set_num_threads(_one_thread.saved)
                if _one_thread.blas is not None:
                    _one_thread.blas.restore_original_limits()


def batched(fn: Callable[..., tuple | torch.Tensor], *xs: torch.Tensor) -> tuple | torch.Tensor:
    """``fn`` over a stack (leading dim of every x), split across CPU worker threads; one call on a GPU."""
    n = xs[0].shape[0]
    w = min(workers(), n)
    if xs[0].device.type != "cpu" or w <= 1 or n <= 1:
        return fn(*xs)
    bounds = [round(i * n / w) for i in range(w + 1)]
    with _one_thread():
        run = context.worker(fn)
        futs = [_executor().submit(run, *(x[a:b] for x in xs)) for a, b in zip(bounds, bounds[1:], strict=False)]
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


NUMPY_MIN = 256  # below this size the two libraries are within ~10 % and torch's call is cheaper to reach


@functools.cache
def _prefer_numpy() -> bool:
    """Whether the CPU fp64 work of the fast path (symmetric eigendecompositions, Gram matrices, GEMMs) runs on
    numpy's BLAS/LAPACK (OpenBLAS in its wheels) rather than torch's (MKL in the x86 wheels): whenever numpy's
    pool can be held to one thread. On the CI VM (AMD EPYC) numpy's tridiagonal reduction is 1.46x torch's,
    whole eigendecompositions 1.17x at n = 512 and 1.26x at 1024, fp64 GEMMs 1.1-1.2x, and numpy computes
    X^T X by a symmetric rank-k update (half the flops): 1.3x the block-triangular torch Gram below. The choice
    is fixed, not timed: a timing taken under load could flip it, and the two libraries round differently, so
    the same merge would not give the same bytes twice."""
    blas = _numpy_blas()
    return blas is not None and bool(len(blas))


def _use_numpy(t: torch.Tensor) -> bool:
    """Whether a CPU fp64 operand of size >= NUMPY_MIN goes to numpy's BLAS/LAPACK (``_prefer_numpy``): only
    inside the one-threaded worker threads (numpy releases the GIL there, so they run side by side as with
    torch's). Elsewhere both libraries would run their own thread pools at once, and torch's OpenMP threads,
    spinning between parallel regions, slow OpenBLAS's down (1.3-1.6x slower on single-matrix stacks)."""
    if _one_thread.depth == 0 or t.device.type != "cpu" or t.dtype != torch.float64 or t.shape[-1] < NUMPY_MIN:
        return False
    return _prefer_numpy()


def eigh(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh of a stack of symmetric matrices (lower triangles read), eigenvalues ascending; on
    numpy's LAPACK where ``_use_numpy`` says."""
    if _use_numpy(g):
        import numpy as np

        w, v = np.linalg.eigh(g.numpy())
        return torch.from_numpy(w), torch.from_numpy(v)
    return torch.linalg.eigh(g)


def _mm64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp64 a @ b of stacks, on numpy's BLAS where ``_use_numpy`` says."""
    a, b = a.double(), b.double()
    if _use_numpy(a):
        return torch.from_numpy(a.numpy() @ b.numpy())
    return a @ b


W_FP32 = 10.0  # the largest condition number a polar factor is applied at in fp32 (see by_precision)


def by_precision(cond: torch.Tensor, dt: torch.dtype) -> list[tuple[object, bool]]:
    """How to apply polar factors to a stack: (selector, in fp64?) pairs. W's size is 1/sigma_min of X, and
    X W cancels by X's condition number ``cond``: an fp32 product loses cond x 6e-8, which reaches 1e-3 where
    tasks share a direction (cond 1e5 when two tasks' top singular vectors agree to 1e-11, as on real task
    vectors) or a summed task matrix has a near-null direction. Matrices up to W_FP32 (errors <= ~1e-5) go in
    fp32, the others in fp64 (the result, an isometry, loses nothing when rounded to fp32). One whole-stack
    slice where all agree, so the common case copies nothing."""
    big = (cond > W_FP32) | (dt == torch.float64)
    if bool(big.all()) or not bool(big.any()):
        return [(slice(None), bool(big.all()))]
    return [(big, True), (~big, False)]


def _apply_polar(x: torch.Tensor, w: torch.Tensor, cond: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """X W (the polar factor, ``polar_right``'s W) for a stack, in ``dt``, each matrix in the precision
    ``by_precision`` gives it."""
    def one(sel, fp64):
        wt = torch.float64 if fp64 else dt
        return (x[sel].to(wt) @ w[sel].to(wt)).to(dt)

    parts = by_precision(cond, dt)
    if len(parts) == 1:
        return one(*parts[0])
    out = torch.empty(*x.shape[:-1], w.shape[-1], dtype=dt, device=x.device)
    for sel, fp64 in parts:
        out[sel] = one(sel, fp64)
    return out


def _work(a: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs that apply eigenvectors run in: fp64 for fp64 inputs, else fp32 (only the Gram
    matrices and the eigensolvers need fp64; applying their result is an ordinary, well-conditioned GEMM)."""
    return torch.float64 if a.dtype == torch.float64 else torch.float32


GRAM_BLOCK = 384  # column block of the CPU Gram (measured best of 256/384/512 on the CI VM, n = 512..4096)


def _gram(a: torch.Tensor) -> torch.Tensor:
    """fp64 A^T A of a stack (B, m, n): a symmetric rank-k update on numpy's BLAS where that is faster
    (``_use_numpy``). Otherwise, on the CPU, only the lower block triangle is multiplied (GEMMs of the trailing
    columns against one block of GRAM_BLOCK columns) and mirrored: 1.3-1.6x a full GEMM on the CI VM, and
    exact (the same dot products). The data are squared in fp64 as they are: no reduction to a triangular
    factor first (an fp32 QR moved the small singular values by eps32 |A| and was slower than this)."""
    ad = a.double()
    n = ad.shape[-1]
    if _use_numpy(ad):
        x = ad.numpy()
        return torch.from_numpy(x.swapaxes(-1, -2) @ x)  # numpy sees X^T X and calls syrk
    if ad.device.type != "cpu" or n <= GRAM_BLOCK:
        return ad.mT @ ad
    g = ad.new_empty(*ad.shape[:-2], n, n)
    for j in range(0, n, GRAM_BLOCK):
        e = min(j + GRAM_BLOCK, n)
        col = ad[..., j:].mT @ ad[..., j:e]  # rows j.. of block column j:e
        g[..., j:, j:e] = col
        g[..., j:e, e:] = col[..., e - j:, :].mT
    return g


REFINE = 1e-8   # Gram eigenvalues below this fraction of the largest are recomputed (_eigh_resolved)
CUT_TOL = 1e-6  # fast mode's largest accepted estimate of its error at the cut k (relative to the kept triplets)


def _eigh_resolved(x: torch.Tensor, top: torch.Tensor | None = None, level: int = 0) -> tuple[torch.Tensor, ...]:
    """Eigendecomposition of X^T X for (B, M, N) X, ascending, fp64, with the small eigenvalues resolved, and
    per eigenvalue the size ``scale`` that its absolute error is about eps64 times.

    A Gram matrix's eigenvalues carry an absolute error of ~eps64 lambda_1, so below REFINE lambda_1 (singular
    values under 1e-4 of the largest: tasks sharing a direction, a sum of task vectors with a near-null
    direction, a rank-deficient task) they lose digits. The eigenvectors of those d small eigenvalues span a
    subspace Q_s that the Gram does resolve (a gap of ~lambda_1 separates it from the rest), so the small part
    is decomposed again from Y = X Q_s (M x d, formed in fp64 without squaring): Y^T Y's eigenvalues are
    accurate to eps64 sqrt(lambda_d lambda_1) (Y's own error is eps64 sigma_1), no longer eps64 lambda_1. Two
    levels of this reach singular values of 1e-8 of the largest to ~1e-8 relative, at the cost of a d x d
    eigendecomposition per level where d is the size of the ill-conditioned part (0 on well-conditioned
    stacks): far less than the SVD it replaces."""
    w, q = eigh(_gram(x))
    lmax = w[:, -1:].clamp_min(0)
    top = lmax if top is None else top
    scale = (lmax * top).sqrt().expand_as(w)  # lambda_1 at the first level, sqrt(lambda_d lambda_1) below
    ds = (w < lmax * REFINE).sum(-1)
    ds = torch.where(lmax[:, 0] <= top[:, 0] * torch.finfo(torch.float64).eps ** 2 * 1e4, 0, ds)  # round-off only
    if level == 2 or not bool(ds.any()):
        return w, q, scale
    scale = scale.clone()
    # members in buckets of similar d (rounded up to 64 directions): each bucket refines its own largest d
    bucket = (ds + 63) // 64
    for b in bucket.unique().tolist():
        if b == 0:
            continue
        sel = bucket == b
        d = int(ds[sel].max())
        qs = q[sel][..., :d]
        w2, q2, s2 = _eigh_resolved(_mm64(x[sel], qs), top[sel], level + 1)
        w[sel, :d], q[sel, :, :d], scale[sel, :d] = w2, _mm64(qs, q2), s2
    return w, q, scale


def _topk_gram(a: torch.Tensor, k: int, dt: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Top-k singular triplets of (B, m, n) from the fp64 Gram of the smaller side (``_eigh_resolved``), the
    other side's vectors by a GEMM in ``dt`` (default ``_work(a)``), and a per-member flag ``doubt`` where
    they can't be trusted to fast mode's tolerance (the caller recomputes those by an SVD):

    * a kept singular value at round-off level (a rank-deficient matrix: an SVD's vectors there are an
      arbitrary completion, which TSV-M's and Iso-CTS's orthogonalisation then mixes into the other tasks');
    * a kept vector from a refinement level whose subspace leaked: a level's Q_s is only orthogonal to the
      resolved directions up to eps64 lambda_1 / gap, and A v / sigma amplifies that leak by sigma_big /
      sigma. The residual r = A^T u - sigma v measures it (r = leak x sigma_big^2 / sigma): the error of u
      is at most |r| / sqrt(REFINE lambda_1), which mixes into the others through the orthogonalisation with
      a weight of ~1/sqrt(max(m, n)); above CUT_TOL is doubt;
    * a cut falling in a cluster too tight for the kept subspace to be resolved: the angle error at the cut,
      eps64 scale / gap (measured 20-40x above the actual error on task vectors with a strong shared
      component, kappa_k 400-13 000), times the share of the result it moves, above CUT_TOL. That share is
      sigma_k / |s| directly (TSV-M keeps the singular values), and ~1/sqrt(max(m, n)) through the
      orthogonalisation, which mixes a rotated vector into the others (Iso-CTS also flattens the values)."""
    m, n = a.shape[-2:]
    tall = m >= n
    at = a if tall else a.mT
    N = at.shape[-1]
    eps = torch.finfo(torch.float64).eps
    w, q, scale = _eigh_resolved(at)
    l1 = w[:, -1:].clamp_min(0)
    lam, v = w[:, N - k:].flip(-1), q[..., N - k:].flip(-1)
    s = lam.clamp_min(0).sqrt()
    dt = dt or _work(a)
    inv = torch.where(s > 0, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    u = (_mm64(at, v) if dt == torch.float64 else at.to(dt) @ v.to(dt)) * inv.to(dt).unsqueeze(1)
    doubt = (lam <= scale[:, N - k:].flip(-1) * (max(m, n) * eps)).any(-1)
    deep = (lam < REFINE * l1) & ~doubt.unsqueeze(-1)  # kept triplets from a refinement level
    sel = deep.any(-1)
    if bool(sel.any()):  # verified by their residual (see the docstring)
        ud = u[sel] if u.dtype == torch.float64 else _mm64(at[sel], v[sel]) * inv[sel].unsqueeze(1)
        r = torch.linalg.vector_norm(_mm64(at[sel].mT, ud) - v[sel] * s[sel].unsqueeze(1), dim=-2)
        leak = torch.where(deep[sel], r, torch.zeros_like(r)).amax(-1) / (REFINE * l1[sel, 0]).sqrt()
        doubt[sel] |= leak / math.sqrt(max(m, n)) > CUT_TOL
    if 0 < k < N:
        err = eps * torch.maximum(scale[:, N - k], scale[:, N - k - 1])
        angle = err / (w[:, N - k] - w[:, N - k - 1]).clamp_min(1e-300)
        share = torch.maximum(s[:, -1] / torch.linalg.vector_norm(s, dim=-1).clamp_min(1e-300),
                              torch.full_like(s[:, -1], 1 / math.sqrt(max(m, n))))
        doubt |= angle * share > CUT_TOL
    return ((u, s, v.mT) if tall else (v, s, u.mT)) + (doubt,)


VERIFY = 1e4       # condition number above which a fast polar factor is checked (_polar_gram)
POLAR_TOL = 1e-5   # the largest accepted |P^T P - I|_F / sqrt(r) of a checked polar factor P (r x r PTP)
COND_MAX = 1e12    # beyond this condition number a polar factor is left to an SVD unchecked


def _polar_gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, m, r) with m >= r: W with polar(X) = X W (W = (X^T X)^(-1/2), a pseudo-inverse on round-off singular
    values), X's nuclear norm, its condition number over the directions kept (fp64), and ``doubt`` (bool):
    where this W can't stand in for an SVD's polar factor, and the caller must compute one.

    W comes from ``_eigh_resolved``. Below a condition number of VERIFY the Gram's own accuracy (eps64 x
    cond^2 < 2e-8) is enough. Above it, tasks sharing directions can leave a continuum of small singular values
    that the refinement levels split imperfectly, so the factor is verified: P = X W is the polar factor
    exactly when P^T P = I (W is symmetric positive definite), and |P^T P - I|_F / 2 bounds its error (measured
    at ~0.7x that bound); more than POLAR_TOL |P|_F = POLAR_TOL sqrt(r) is doubt, 10x inside fast mode's 1e-4.
    Doubt also where X has round-off singular values (its polar factor is not unique: an
    SVD's holds an arbitrary completion there, which the methods weight by non-zero singular values) or a
    condition number above COND_MAX."""
    w, q, scale = _eigh_resolved(x)
    pos = w > scale * (max(x.shape[-2:]) * torch.finfo(torch.float64).eps)
    inv = torch.where(pos, w.clamp_min(1e-300).rsqrt(), torch.zeros_like(w))
    sv = torch.where(pos, w.clamp_min(0).sqrt(), torch.zeros_like(w))
    smin = torch.where(pos, sv, torch.full_like(sv, math.inf)).amin(-1)
    smax = sv.amax(-1)
    cond = torch.where(torch.isinf(smin), torch.ones_like(smin), smax / smin.clamp_min(1e-300))
    wmat = _mm64(q * inv.unsqueeze(1), q.mT)
    doubt = (~pos.all(-1) & (smax > 0)) | (cond > COND_MAX)
    check = (cond > VERIFY) & ~doubt
    if bool(check.any()):
        p = _mm64(x[check], wmat[check])
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        doubt[check] = torch.linalg.matrix_norm(_gram(p) - eye) > POLAR_TOL * math.sqrt(p.shape[-1])
    return wmat, sv.sum(-1), cond, doubt


PAIR_MIN = 1e4  # the closed-form pair polar needs 1 - cos(angle) >= PAIR_MIN * k * eps64 (see _polar_pair)


def _polar_pair(x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (B, 2k, 2k) fp64 with polar([X1 X2]) = [X1 X2] W, for blocks (B, m, k) with orthonormal columns each.

    The Gram is [[I, C], [C^T, I]] with C = X1^T X2. With C^T C = Q diag(s^2) Q^T (the cosines s of the
    principal angles between the blocks), G^(-1/2) = [[I + C Q diag(phi) Q^T C^T, C Q diag(psi) Q^T],
    [Q diag(psi) Q^T C^T, I + Q diag(s^2 phi) Q^T]] with a = (1+s)^(-1/2), b = (1-s)^(-1/2),
    phi = ((a+b)/2 - 1)/s^2 and psi = (a-b)/(2s): both smooth at s = 0, so C's left singular vectors are
    never formed. A zero column stays zero (and is flagged, as ``_polar_gram`` flags it). 1 - s comes from s^2,
    whose absolute error is ~k eps64, so b is accurate only while the blocks share no direction closely:
    members with 1 - s < PAIR_MIN k eps64 somewhere (1 - s known to worse than 1e-4 relative; at 2e-7 the closed
    form was measured 5e-12 from an SVD's polar factor), or whose blocks are not
    orthonormal to round-off (|X_i^T X_i - I| > 1e3 k eps64: vectors of tiny singular values), take the general path
    (``_polar_gram``, whose Gram eigensolver refines such directions). Also returns ``_polar_gram``'s doubt."""
    x1, x2 = x1.double(), x2.double()
    k = x1.shape[-1]
    c = _mm64(x1.mT, x2)
    lam, q = eigh(_mm64(c.mT, c))
    s = lam.clamp(0, 1).sqrt()
    one_minus = (1 - lam.clamp(max=1)) / (1 + s)  # 1 - s, without cancellation
    close = one_minus.amin(-1) < PAIR_MIN * k * torch.finfo(torch.float64).eps
    eye = torch.eye(k, dtype=c.dtype, device=c.device)
    for xb in (x1, x2):  # blocks orthonormal to fp64 round-off only (vectors of tiny singular values are not)
        nz = xb.square().sum(-2) > 0.25  # zero columns are flagged below
        g = torch.where(nz.unsqueeze(-1) & nz.unsqueeze(-2), _gram(xb) - eye, torch.zeros_like(c))
        close |= torch.linalg.matrix_norm(g) > 1e3 * k * torch.finfo(torch.float64).eps
    # (a - 1)/s and (b - 1)/s without cancellation
    am1 = -1 / ((1 + s).sqrt() * (1 + (1 + s).sqrt()))
    rb = one_minus.clamp_min(1e-300).sqrt()
    bm1 = 1 / (rb * (1 + rb))
    small = s < 1e-4
    ss = s.clamp_min(1e-4)
    phi = torch.where(small, 0.375 + 35 / 128 * s * s, (am1 + bm1) / (2 * ss))
    psi = torch.where(small, -0.5 - 5 / 16 * s * s, (am1 - bm1) / 2)
    cq = _mm64(c, q)
    top = torch.cat([eye + _mm64(cq * phi.unsqueeze(1), cq.mT), _mm64(cq * psi.unsqueeze(1), q.mT)], -1)
    b22 = eye + _mm64(q * (s * s * phi).unsqueeze(1), q.mT)
    w = torch.cat([top, torch.cat([top[..., k:].mT, b22], -1)], -2)
    # a zero column (a round-off singular value of a task): a partial isometry here, an SVD completes it
    doubt = torch.cat([x1, x2], -1).square().sum(-2).amin(-1) < 0.25
    if bool(close.any()):
        w[close], _, _, doubt[close] = _polar_gram(torch.cat([x1[close], x2[close]], -1))
    return w, doubt


def polar_right(x: torch.Tensor, *, pair: bool = False, checked: bool = False):
    """The r x r matrix W with polar(X) = X W for each tall matrix X (..., m, r) of a stack (m >= r), fp64:
    W = (X^T X)^(-1/2) from the fp64 Gram (see ``polar``). Applying W to X's neighbours in a product instead of
    forming polar(X) saves an m x r x r GEMM wherever r x r products come first (TSV-M's U W S W' V^T).

    ``pair=True``: X = [X1 X2] of two equal blocks, each with orthonormal columns (zero columns allowed; TSV-M's
    packed singular vectors at T = 2): W in closed form from the k x k principal-angle problem of X1^T X2, one
    eigendecomposition of half the size (an eighth of the work) and no m x r Gram.

    ``checked=True`` also returns a bool mask of the matrices whose W can't be trusted (``_polar_gram``'s doubt): their
    polar factor is not unique (dependent columns) or too ill-conditioned for fp64."""
    xs, single = _stack(x, "x")
    m, r = xs.shape[-2:]
    if m < r:
        raise ValueError(f"polar_right needs a tall matrix (m >= r), got {m} x {r}")
    if xs.shape[0] == 0 or r == 0:
        w, doubt = xs.new_zeros(xs.shape[0], r, r, dtype=torch.float64), torch.zeros(xs.shape[0], dtype=torch.bool)
    elif pair:
        if r % 2:
            raise ValueError(f"polar_right(pair=True) needs two equal blocks, got {r} columns")
        w, doubt = batched(lambda xb: _polar_pair(xb[..., : r // 2], xb[..., r // 2:]), xs)
    else:
        w, doubt = batched(lambda xb: _polar_gram(xb)[::3], xs)
    w = w[0] if single else w.reshape(*x.shape[:-2], r, r)
    return (w, doubt.reshape(x.shape[:-2])) if checked else w


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


def _topk_randomized(a: torch.Tensor, k: int, oversample: int, power_iters: int, seed: int,
                     dt: torch.dtype | None = None):
    b, m, n = a.shape
    r = min(m, n)
    ell = min(r, k + oversample)
    if 2 * ell >= r:  # nothing to gain (measured: 1.0x at TSV-M's T = 2, and 0.2 off): the full-accuracy path
        return _topk_gram(a, k, dt)
    af = a.float()
    g = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(b, n, ell, generator=g, device=a.device, dtype=af.dtype)
    y = _orthonormalize(af @ omega)
    for _ in range(power_iters):
        z = _orthonormalize(af.mT @ y)
        y = _orthonormalize(af @ z)
    proj = y.mT @ af  # (B, ell, n)
    u, s, vh, _ = _topk_gram(proj, k, dt)
    return y.double() @ u, s, vh


# ---------------------------------------------------------------------------------------------------------
# public kernels


def svd_topk(a: torch.Tensor, k: int, *, mode: str = "fast", oversample: int | None = None, power_iters: int = 2,
             seed: int = 0, dtype: torch.dtype | None = None, checked: bool = False) -> tuple[torch.Tensor, ...]:
    """The top-k singular triplets of each matrix in a stack: U (..., m, k), S (..., k), Vh (..., k, n).

    Returned in ``dtype``: default fp32 (fp64 for fp64 input); fp64 from fp32 input also forms the vectors
    that the fast path derives by a GEMM in fp64 (orthonormal to fp64 round-off, for callers whose next step
    is sensitive to it). ``mode``: exact | fast | randomized (see the module docstring);
    ``oversample`` (default max(10, k/2)) and ``power_iters`` apply to randomized only; ``seed`` makes its
    test matrix reproducible. In fast mode, the members whose triplets the Gram path can't vouch for
    (``_topk_gram``'s doubt: a rank-deficient matrix, a cut inside a tight cluster) are computed by an fp64 SVD
    instead; ``checked=True`` also returns that bool mask (the leading dims of ``a``)."""
    _check_mode(mode)
    x, _ = _stack(a, "a")
    r = min(x.shape[-2:])
    if not 0 <= k <= r:
        raise ValueError(f"k must lie in [0, min(m, n)] = [0, {r}], got {k}")
    out_dt = dtype or (torch.float64 if a.dtype == torch.float64 else torch.float32)
    work = torch.float64 if out_dt == torch.float64 else None
    fell = torch.zeros(x.shape[0], dtype=torch.bool)

    def exact(xb, dt=out_dt):
        u, s, vh = torch.linalg.svd(xb.to(dt), full_matrices=False)
        return u[..., :k], s[..., :k], vh[..., :k, :]

    if k == 0 or x.shape[0] == 0:
        u = x.new_zeros(*x.shape[:-1], k, dtype=out_dt)
        res = (u, x.new_zeros(x.shape[0], k, dtype=out_dt), x.new_zeros(x.shape[0], k, x.shape[-1], dtype=out_dt))
    elif mode == "exact":
        res = batched(exact, x)
    elif mode == "fast":
        *res, fell = batched(lambda xb: _topk_gram(xb, k, work), x)
        res = [t.to(out_dt) for t in res]
        fell = fell.cpu()
        if bool(fell.any()):
            for t, e in zip(res, batched(lambda xb: exact(xb, torch.float64), x[fell.to(x.device)]), strict=True):
                t[fell.to(t.device)] = e.to(out_dt)
    else:
        p = max(10, k // 2) if oversample is None else int(oversample)
        res = batched(lambda xb: _topk_randomized(xb, k, p, power_iters, seed, work)[:3], x)
    u, s, vh = (t.to(out_dt) for t in res)
    lead = a.shape[:-2]
    out = (u.reshape(*lead, *u.shape[-2:]), s.reshape(*lead, k), vh.reshape(*lead, *vh.shape[-2:]),
           fell.reshape(lead))
    return out if checked else out[:3]


def polar(x: torch.Tensor, *, mode: str = "fast", nuclear: bool = False, checked: bool = False):
    """The orthogonal polar factor of each matrix in a stack (U V^T of its thin SVD), fp32 (fp64 for fp64).

    ``nuclear=True`` also returns each matrix's sum of singular values (Iso-C's mean singular value is it
    divided by min(m, n)). ``mode``: exact (SVD) | fast (fp64 Gram + eigh); randomized is not a polar mode.
    In fast mode the matrices ``_polar_gram`` doubts (rank-deficient, or conditioned beyond COND_MAX) are computed
    by an fp64 SVD; ``checked=True`` also returns that bool mask."""
    if mode == "randomized":
        raise ValueError("polar has modes exact and fast (randomized applies to svd_topk only)")
    _check_mode(mode)
    xs, single = _stack(x, "x")
    out_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    m, n = xs.shape[-2:]
    fell = torch.zeros(xs.shape[0], dtype=torch.bool)

    def exact(xb, dt=out_dt):
        u, s, vh = torch.linalg.svd(xb.to(dt), full_matrices=False)
        return u @ vh, s.sum(-1)

    if xs.shape[0] == 0 or m == 0 or n == 0:
        p, nuc = xs.to(out_dt).clone(), xs.new_zeros(xs.shape[0], dtype=out_dt)
    elif mode == "exact":
        p, nuc = batched(exact, xs)
    else:
        tall = m >= n

        def fast(xb):
            xt = xb if tall else xb.mT
            w, nuc, cond, doubt = _polar_gram(xt)
            p = _apply_polar(xt, w, cond, out_dt)
            return (p if tall else p.mT), nuc, doubt
        p, nuc, fell = batched(fast, xs)
        fell = fell.cpu()
        if bool(fell.any()):
            sel = fell.to(xs.device)
            pe, ne = batched(lambda xb: exact(xb, torch.float64), xs[sel])
            p[sel], nuc[sel] = pe.to(p.dtype), ne.to(nuc.dtype)
    p, nuc = p.to(out_dt), nuc.to(out_dt)
    if single:
        p, nuc, fell = p[0], nuc[0], fell[0]
    else:
        p, nuc, fell = p.reshape(x.shape), nuc.reshape(x.shape[:-2]), fell.reshape(x.shape[:-2])
    out = (p, nuc) if nuclear else (p,)
    return out + (fell,) if checked else (out if nuclear else p)


def project_out(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """X - U (U^T X) for each matrix of a stack, U with orthonormal columns (..., m, k): the part of X outside
    span(U). On the fused ``orth_project`` op (one pass over X per column block on GPU)."""
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

