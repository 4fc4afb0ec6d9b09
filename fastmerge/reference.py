"""Plain-PyTorch oracles of every fastmerge op.

These functions are the contract: every backend (CPU C++, CUDA, Triton) must reproduce them, bit for bit
where the result is a mask, a sign, a count or a threshold, and within fp32 rounding where it is a sum.
They are short and readable on purpose, run on any device, and double as the fallback backend.

Conventions shared by all ops
-----------------------------
* ``experts`` is a list of T tensors of one shape and one floating dtype. When ``base`` is given (same
  shape and dtype) the task vectors are ``delta_t = experts[t] - base``; when it is ``None`` the experts
  *are* the task vectors.
* fp16/bf16 inputs are upcast and every accumulation is done in fp32, task by task in the order
  t = 0 .. T-1 (stats that are summed over a whole tensor are accumulated in fp64).
* Element indices are linear indices in the tensor's logical row-major order plus ``offset`` (so a tensor
  processed in chunks draws the same random numbers as the whole tensor), never memory addresses.
* Magnitude keys: ``key(x) = bits(fp32(|x|))`` as an unsigned 32-bit integer. For non-negative floats the
  integer order is the numeric order, so selections work on keys; NaN keys sort above +inf.
"""

from __future__ import annotations

import torch

__all__ = [
    "HIST_BINS",
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "abs_histogram",
    "abs_keys",
    "consensus_merge",
    "della_prune",
    "emr_elect",
    "philox_uniform",
    "prune",
    "row_kth_largest_abs",
    "tall_masks",
    "ties_merge",
    "ELECT",
    "MERGE",
]

HIST_BINS = 1 << 16

# Election and merge modes of ties_merge, shared by every backend (C++ receives the integer codes).
ELECT = {"none": 0, "sum": 1, "count": 2}
MERGE = {"sum": 0, "mean": 1, "wmean": 2, "max": 3}

_U32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


# ----------------------------------------------------------------------------------------------------------
# magnitude keys and thresholds


def abs_keys(x: torch.Tensor) -> torch.Tensor:
    """x: any shape, floating -> int64 tensor of the same shape holding bits(fp32(|x|)) in [0, 2^31)."""
    return x.detach().float().contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def abs_histogram(x: torch.Tensor, level: int, prefix: int = 0) -> torch.Tensor:
    """Histogram of magnitude keys, the building block of the streaming exact top-k threshold.

    x: any shape and strides, floating. Returns int64 (65536,).
    level 0: counts of ``key >> 16`` over all elements.
    level 1: counts of ``key & 0xFFFF`` over the elements whose ``key >> 16 == prefix``.
    Adding the histograms of several tensors (chunks, shards, a whole model) gives the histogram of their
    union, so the k-th largest magnitude of a set is found with one or two passes and no sort.
    """
    k = abs_keys(x).reshape(-1)
    if level == 0:
        return torch.bincount(k >> 16, minlength=HIST_BINS)
    if level == 1:
        return torch.bincount(k[(k >> 16) == prefix] & 0xFFFF, minlength=HIST_BINS)
    raise ValueError(f"level must be 0 or 1, got {level}")


def row_kth_largest_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest |x| of every row (1-based k) as fp32.

    x: (rows, cols), floating. Returns fp32 (rows,). k = 0 gives +inf (keep nothing); k > cols is an error.
    """
    rows, cols = x.shape
    if not 0 <= k <= cols:
        raise ValueError(f"k must be in [0, {cols}], got {k}")
    if k == 0:
        return torch.full((rows,), float("inf"), dtype=torch.float32, device=x.device)
    return x.float().abs().topk(k, dim=1).values[:, -1].contiguous()


# ----------------------------------------------------------------------------------------------------------
# counter-based random numbers


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a*b, a < 2^32 constant, b uint32 held in int64.

    b is split in 16-bit halves so no intermediate exceeds 2^49 (int64 never overflows).
    """
    x = a * (b >> 16)
    z = ((x & 0xFFFF) << 16) + a * (b & 0xFFFF)
    return (x >> 16) + (z >> 32), z & _U32


def philox_uniform(n: int, seed: int, key: int, offset: int = 0, device=None) -> torch.Tensor:
    """Uniform fp32 numbers in [0, 1) for element indices offset .. offset+n-1. Returns fp32 (n,).

    Philox4x32-10 (Salmon et al., SC'11): key = (seed lo, seed hi), counter = (g lo, g hi, key lo, key hi)
    with g = index >> 2; the output word is (index & 3) and u = (word >> 8) * 2^-24, exact in fp32.
    ``seed`` and ``key`` are taken modulo 2^64 (negative Python ints are fine).
    """
    seed &= (1 << 64) - 1
    key &= (1 << 64) - 1
    idx = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    g = idx >> 2
    c0, c1 = g & _U32, (g >> 32) & _U32
    c2 = torch.full_like(g, key & _U32)
    c3 = torch.full_like(g, key >> 32)
    k0, k1 = seed & _U32, seed >> 32
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    words = torch.stack([c0, c1, c2, c3], dim=1)
    w = words.gather(1, (idx & 3).unsqueeze(1)).squeeze(1)
    return (w >> 8).to(torch.float32) * (2.0**-24)


# ----------------------------------------------------------------------------------------------------------
# elementwise sparsifiers


def prune(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    p: float = 0.0,
    seed: int = 0,
    key: int = 0,
    offset: int = 0,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude band + random drop, then rescale: magnitude prune, Breadcrumbs and DARE in one op.

    x: any shape, viewed as (R, numel/R) where R = lo.numel() = hi.numel() (R = 1: per tensor, R = rows:
    per row of the last dimension). lo, hi: fp32 (R,).
    keep = (lo <= |x| < hi) and (u >= p), with u = philox_uniform(seed, key) at the element's index.
    Returns (x * keep * scale in ``out_dtype`` (default x.dtype), fp64 (2,) = [sum |x|, sum |x * keep|]).
    The second output is what mergekit's L1-norm rescaling needs. p = 0 never drops (u >= 0).
    """
    rows = lo.numel()
    xf = x.float().reshape(rows, -1)
    a = xf.abs()
    keep = (a >= lo.float().reshape(rows, 1)) & (a < hi.float().reshape(rows, 1))
    if p > 0:
        keep &= (philox_uniform(x.numel(), seed, key, offset, x.device) >= p).reshape(rows, -1)
    kept = xf * keep
    stats = torch.stack([a.double().sum(), kept.abs().double().sum()])
    return (kept * scale).reshape(x.shape).to(out_dtype or x.dtype), stats


def della_prune(
    x: torch.Tensor,
    density: float,
    epsilon: float,
    seed: int = 0,
    key: int = 0,
    rescale: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DELLA's MagPrune, per row of the last dimension (a 1-D tensor is one row).

    x: (..., n). rank = 1 + position of |x| in the row sorted ascending, ties broken by column index;
    rn = (rank - 1) / (n - 1) (0 when n = 1); keep probability p = (density - epsilon) + 2*epsilon*rn;
    keep when u < p (u = philox_uniform at the element's index); kept entries are divided by their own p
    when ``rescale``. Returns a tensor of x's shape in ``out_dtype`` (default x.dtype).
    """
    n = x.shape[-1] if x.dim() else 1
    xf = x.float().reshape(-1, n)
    order = torch.sort(abs_keys(xf), dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=x.device).expand_as(order))
    rn = rank.float() / (n - 1) if n > 1 else torch.zeros_like(xf)
    prob = (density - epsilon) + rn * (2 * epsilon)
    u = philox_uniform(x.numel(), seed, key, 0, x.device).reshape(xf.shape)
    res = xf * (u < prob)
    if rescale:
        res = res / prob
    return res.reshape(x.shape).to(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------------------
# sign consensus


def _deltas(base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
    """(T, N) fp32 task vectors."""
    d = torch.stack([e.float().reshape(-1) for e in experts])
    if base is not None:
        d = d - base.float().reshape(1, -1)
    return d


def ties_merge(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    params: torch.Tensor,
    *,
    seed: int = 0,
    key: int = 0,
    offset: int = 0,
    elect: str = "sum",
    merge: str = "mean",
    weighted_elect: bool = False,
    zero_sign: float = 1.0,
    lam: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused trim / drop / elect / disjoint merge (TIES, DARE-TIES, Breadcrumbs-TIES, TA, linear).

    params: fp32 (T, 5), row t = (weight w_t, lo_t, hi_t, drop p_t, scale s_t).
    Per element, for each task t (fp32, t in order):
      x_t = delta_t * [lo_t <= |delta_t| < hi_t] * [u_t >= p_t] * s_t     (u_t: philox with key + t)
      e_t = w_t * x_t if weighted_elect else x_t
    Election (``elect``): "sum": s = sum_t e_t; "count": s = sum_t sign(e_t); "none": no consensus.
      gamma = sign(s), or ``zero_sign`` where s == 0.
      agree_t = (e_t > 0) if gamma > 0 else (e_t < 0); with "none", agree_t = 1 for every t.
    Merge (``merge``), with v_t = w_t * x_t:
      "sum":   sum_t v_t agree_t
      "mean":  sum_t v_t agree_t / max(sum_t agree_t, 1)
      "wmean": sum_t v_t agree_t / D, D = sum_t w_t agree_t, D replaced by 1 where |D| < 1e-8
      "max":   gamma * max_t |v_t| agree_t
    Output: base + lam * merged (lam * merged without base), computed in fp32, cast to ``out_dtype``
    (default: the experts' dtype).
    Also returns int64 (2,) = [#elements with s > 0, #elements with s < 0] (zeros with "none"), which
    the official TIES needs for its whole-model zero-sign rule (zero_sign = sign(n_pos - n_neg)).
    """
    d = _deltas(base, experts)
    T = d.shape[0]
    prm = params.float().to(d.device)
    w, lo, hi, p, s = (prm[:, i : i + 1] for i in range(5))
    a = d.abs()
    x = d * ((a >= lo) & (a < hi))
    for t in range(T):
        if float(p[t]) > 0:
            u = philox_uniform(d.shape[1], seed, key + t, offset, d.device)
            x[t] = x[t] * (u >= p[t])
    x = x * s
    e = w * x if weighted_elect else x
    v = w * x
    counts = torch.zeros(2, dtype=torch.int64, device=d.device)
    if elect == "none":
        agree = torch.ones_like(x, dtype=torch.bool)
        gamma = torch.ones(d.shape[1], device=d.device)
    else:
        if elect == "sum":
            ssum = torch.zeros(d.shape[1], device=d.device)
            for t in range(T):  # sequential fp32 accumulation, as every backend does it
                ssum = ssum + e[t]
        elif elect == "count":
            ssum = torch.sign(e).sum(0)
        else:
            raise ValueError(f"elect must be one of {list(ELECT)}, got {elect!r}")
        counts = torch.stack([(ssum > 0).sum(), (ssum < 0).sum()])
        gamma = torch.where(ssum == 0, torch.full_like(ssum, zero_sign), torch.sign(ssum))
        agree = torch.where(gamma > 0, e > 0, e < 0)
    va = v * agree
    if merge in ("sum", "mean", "wmean"):
        acc = torch.zeros(d.shape[1], device=d.device)
        for t in range(T):
            acc = acc + va[t]
        if merge == "mean":
            acc = acc / agree.sum(0).clamp(min=1).float()
        elif merge == "wmean":
            den = torch.zeros(d.shape[1], device=d.device)
            for t in range(T):
                den = den + w[t] * agree[t]
            acc = acc / torch.where(den.abs() < 1e-8, torch.ones_like(den), den)
    elif merge == "max":
        acc = gamma * va.abs().amax(0)
    else:
        raise ValueError(f"merge must be one of {list(MERGE)}, got {merge!r}")
    res = lam * acc
    if base is not None:
        res = base.float().reshape(-1) + res
    dtype = out_dtype or experts[0].dtype
    return res.reshape(experts[0].shape).to(dtype), counts


def tall_masks(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    lambdas: torch.Tensor,
    mtl: torch.Tensor | None = None,
) -> torch.Tensor:
    """TALL masks: m_t = |delta_t| > lambda_t * |mtl - delta_t|, mtl = sum_t delta_t unless given.

    lambdas: fp32 (T,). mtl: optional multi-task vector of the experts' shape (e.g. a TIES merge).
    Returns bool (T, *shape).
    """
    d = _deltas(base, experts)
    m = _mtl(d) if mtl is None else mtl.float().reshape(1, -1)
    lam = lambdas.float().to(d.device).reshape(-1, 1)
    return (d.abs() > lam * (m - d).abs()).reshape(len(experts), *experts[0].shape)


def _mtl(d: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(d.shape[1], device=d.device)
    for t in range(d.shape[0]):
        acc = acc + d[t]
    return acc.reshape(1, -1)


def consensus_merge(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    lambdas: torch.Tensor,
    mtl: torch.Tensor | None = None,
    *,
    min_count: int = 2,
    lam: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Consensus merging (TALL paper): keep mtl where at least ``min_count`` TALL masks are set.

    out = base + lam * [sum_t m_t >= min_count] * mtl, m_t as in :func:`tall_masks`.
    """
    d = _deltas(base, experts)
    m = _mtl(d) if mtl is None else mtl.float().reshape(1, -1)
    masks = tall_masks(base, experts, lambdas, mtl).reshape(len(experts), -1)
    keep = masks.sum(0) >= min_count
    res = lam * (m.reshape(-1) * keep)
    if base is not None:
        res = base.float().reshape(-1) + res
    return res.reshape(experts[0].shape).to(out_dtype or experts[0].dtype)


def emr_elect(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EMR-Merging's elect / mask / rescale statistics for one tensor.

    flag = +1 where sum_t delta_t > 0 else -1 (a zero sum gives -1, as the official code);
    agree_t = delta_t * flag > 0; tau_uni = flag * max_t |delta_t| agree_t.
    Returns (tau_uni in ``out_dtype``, bool masks (T, *shape) = agree_t,
    fp64 (T, 2) = [sum |delta_t|, sum |tau_uni| * agree_t]). The rescaler of task t is
    sum over tensors of mean|delta_t| / sum over tensors of mean|tau_uni * mask_t|.
    """
    d = _deltas(base, experts)
    flag = torch.where(_mtl(d).reshape(-1) > 0, 1.0, -1.0)
    agree = d * flag > 0
    uni = flag * (d.abs() * agree).amax(0)
    stats = torch.stack([d.abs().double().sum(1), (uni.abs() * agree).double().sum(1)], dim=1)
    shape = experts[0].shape
    return uni.reshape(shape).to(out_dtype), agree.reshape(len(experts), *shape), stats


def orth_project(x: torch.Tensor, u: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """X - U (U^T X) per matrix of a stack: x (B, m, n), u (B, m, k); fp32 maths (fp64 for fp64 inputs)."""
    dt = torch.float64 if torch.float64 in (x.dtype, u.dtype) else torch.float32
    xf, uf = x.to(dt), u.to(dt)
    return (xf - uf @ (uf.mT @ xf)).to(out_dtype or x.dtype)


def doge_grad(taus: torch.Tensor, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """DOGE's closed-form gradient core, per stack member b and row r:
    -2 * sum_j (a[b, j, r] - <taus[b, j, r, :], d[b, r, :]>) * taus[b, j, r, :]; fp32 (B, m, n)."""
    t = taus.float()
    e = torch.einsum("btmn,bmn->btm", t.double(), d.double()).float()
    return -2.0 * torch.einsum("btm,btmn->bmn", a.float() - e, t)


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              scale: torch.Tensor, repeat: int, lr: float, beta1: float, beta2: float, eps: float,
              step: int) -> None:
    """In place: torch.optim.Adam's single-tensor update (no weight decay, no amsgrad) of the S slices of
    ``param`` (S, ...), slice s with gradient scale[s] * grad[s // repeat]."""
    S = scale.numel()
    g = grad.repeat_interleave(repeat, 0) * scale.reshape(S, *([1] * (param.dim() - 1))).to(grad)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


def _segments(offsets: torch.Tensor, device) -> torch.Tensor:
    off = offsets.tolist()
    return torch.repeat_interleave(torch.arange(len(off) - 1, device=device),
                                   torch.tensor([b - a for a, b in zip(off, off[1:], strict=False)], device=device))


def tv_combine(base: torch.Tensor, taus: torch.Tensor, coef: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """theta = base + sum_t coef[t, seg(p)] * taus[t, p] over flat parameters (segment s = offsets[s]..[s+1])."""
    seg = _segments(offsets, taus.device)
    return base.float() + (coef.float()[:, seg] * taus.float()).sum(0)


def tv_coef_grad(grad: torch.Tensor, taus: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(T, S): sum over segment s of grad[p] * taus[t, p], fp64 sums rounded to fp32."""
    seg = _segments(offsets, taus.device)
    prod = taus.double() * grad.double()
    out = torch.zeros(taus.shape[0], offsets.numel() - 1, dtype=torch.float64, device=taus.device)
    return out.index_add_(1, seg, prod).float()
