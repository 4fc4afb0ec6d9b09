"""ties_merge: fused trim / drop / elect / disjoint merge in one pass (TIES, DARE-TIES, Breadcrumbs-TIES, task
arithmetic, linear)."""

from __future__ import annotations

import math

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check, check_buffer, check_experts, check_float, check_same, expert_list
from ._lib import contig, deltas, empty, host_floats, into, register
from .philox import philox_uniform, to_i64

# Election and merge modes, shared by every backend (the kernels receive the integer codes).
ELECT = {"none": 0, "sum": 1, "count": 2}
MERGE = {"sum": 0, "mean": 1, "wmean": 2, "max": 3}

SCHEMA = ("ties_merge(Tensor? base, Tensor[] experts, Tensor params, Tensor(a!)? out, Tensor(b!) counts, int seed, "
          "int key, int offset, int elect, int merge, bool weighted_elect, float zero_sign, float lam) -> ()")


def _check(base, experts, params, out, counts, seed, key, offset, elect, merge, weighted_elect, zero_sign,
           lam) -> None:
    check_experts(base, experts, params, "params", 5)
    if out is not None:
        check_float("out", out)
        check_same("out", out, experts[0])
    check_buffer("counts", counts, torch.int64, (2,), experts[0].device)
    check(elect in (0, 1, 2), lambda: f"elect code must be 0, 1 or 2, got {elect}")
    check(merge in (0, 1, 2, 3), lambda: f"merge code must be 0..3, got {merge}")
    check(offset >= 0, lambda: f"offset must be >= 0, got {offset}")


def _run(base, experts, params, out, counts, *rest) -> None:
    base, experts = contig(base), [contig(e) for e in experts]
    dtypes = (experts[0].dtype,) if out is None else (experts[0].dtype, out.dtype)
    fn = select("ties_merge", experts[0].device, dtypes, len(experts))
    into(out, lambda out_: fn(base, experts, host_floats(params), out_, counts, *rest))


register(SCHEMA, _check, _run)


def ties_params(n: int, *, weights=None, lo=None, hi=None, p=None, scale=None) -> torch.Tensor:
    """The (T, 5) fp32 table of ties_merge: per task (weight, lo, hi, drop p, scale), broadcasting scalars."""
    cols = []
    for name, v, default in (("weights", weights, 1.0), ("lo", lo, 0.0), ("hi", hi, math.inf), ("p", p, 0.0),
                             ("scale", scale, 1.0)):
        v = default if v is None else v
        t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} values for {n} experts")
        cols.append(t)
    return torch.stack(cols, dim=1).contiguous()


def ties_merge(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    params: torch.Tensor | None = None,
    *,
    elect: str = "sum",
    merge: str = "mean",
    weighted_elect: bool = False,
    zero_sign: float = 1.0,
    lam: float = 1.0,
    seed: int = 0,
    key: int = 0,
    offset: int = 0,
    out_dtype: torch.dtype | None = None,
    write: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Fused trim/drop/elect/disjoint-merge in one pass (semantics: ties_merge_ref).

    Returns (merged tensor, written into ``out`` when given, or None when ``write`` is False,
    int64 [#s>0, #s<0]).
    """
    experts = expert_list(experts)
    if elect not in ELECT:
        raise ValueError(f"elect must be one of {list(ELECT)}, got {elect!r}")
    if merge not in MERGE:
        raise ValueError(f"merge must be one of {list(MERGE)}, got {merge!r}")
    if params is None:
        params = ties_params(len(experts))
    e0 = experts[0]
    if write and out is None:
        out = empty(e0.shape, out_dtype or e0.dtype, e0.device)
    elif not write:
        out = None
    counts = torch.zeros(2, dtype=torch.int64, device=e0.device)
    torch.ops.fastmerge.ties_merge(
        base, experts, params, out, counts, to_i64(seed), to_i64(key), int(offset), ELECT[elect], MERGE[merge],
        bool(weighted_elect), float(zero_sign), float(lam),
    )
    return out, counts


def ties_merge_ref(
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
    d = deltas(base, experts)
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


_ELECT_NAME = {v: k for k, v in ELECT.items()}
_MERGE_NAME = {v: k for k, v in MERGE.items()}


@REFERENCE.kernel("ties_merge")
def _reference(base, experts, params, out, counts, seed, key, offset, elect, merge, weighted_elect, zero_sign, lam):
    res, c = ties_merge_ref(
        base,
        experts,
        params,
        seed=seed,
        key=key,
        offset=offset,
        elect=_ELECT_NAME[elect],
        merge=_MERGE_NAME[merge],
        weighted_elect=weighted_elect,
        zero_sign=zero_sign,
        lam=lam,
        out_dtype=None if out is None else out.dtype,
    )
    if out is not None:
        out.copy_(res)
    counts += c.to(counts.device)


def weighted_sum(inputs: list[torch.Tensor], weights=None, *, mean: bool = False,
                 out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i x_i in fp32, rounded once into ``out_dtype`` (default: the first input's dtype); ``mean``
    divides by sum_i w_i. One pass over the inputs on ties_merge's kernel with nothing trimmed or elected (the
    linear / slerp / task-vector maths, where a chain of torch ops would round after every step)."""
    inputs = expert_list(inputs)
    params = ties_params(len(inputs), weights=weights)
    return ties_merge(None, inputs, params, elect="none", merge="wmean" if mean else "sum", out_dtype=out_dtype,
                      out=out)[0]
