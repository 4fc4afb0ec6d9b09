"""The subspace merge methods: TSV-M, Iso-C, Iso-CTS (one merged model) and TSV-C (a multi-task store).

Each works per tensor: 2-D tensors that pass the key predicate go through the subspace maths, every other
tensor gets the mean of the task vectors (as the official code does), and the result is
``base + alpha * delta``. The engine hands these methods stacks of same-shape tensors (several layers at
once, within the memory budget), and every step runs on the whole stack at once (fastmerge.subspace).

Semantics follow the official code (../shared/spec/algorithms.md §1, §4.4-4.5):

* ``tsv_m``: k = int(r * (1/T)) top singular triplets per task (r = min(m, n)), packed task after task,
  U and V orthogonalised by their polar factors, the original singular values kept. The slots past T*k stay
  empty (they hold zero singular values, so they add nothing).
* ``iso_c``: mean singular value of the summed task matrix times its polar factor (the mean over all r
  singular values).
* ``iso_cts``: a common subspace of k_c = r - round((r - int(r f)) / T) * T directions of the sum (f =
  ``common_fraction``, Python's round), then s_t = (r - k_c) / T directions per task from the part of its task
  vector outside the common left subspace; task blocks first, the common block last; both sides
  orthogonalised; every singular value replaced by the mean of the packed ones.
* ``tsv_c``: each task vector compressed to its top int(r/T) triplets; tensors that are not matrices are
  stored as they are.

``fastmerge: {svd: exact | fast | randomized}`` picks the kernels (fastmerge.subspace): exact is the official
``torch.linalg.svd`` everywhere, fast (default) the fp64-Gram eigensolvers (closer to the fp64 result than the
official fp32 SVDs are, see ``_orthogonalise``),
randomized a range finder (``svd_oversample``, ``svd_power_iters``) for k << r, approximate.
``exclude_keys`` (substrings; default ``[text_projection]``, the official rule) sends matching 2-D tensors
to the mean instead; FusionBench excludes nothing by default (``exclude_keys: []``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..algo import subspace
from ..config import ConfigError
from ..execute import sinks
from ..io import ShardedWriter
from .base import NONBASE, SHARED, Method, Param
from .registry import register

DEFAULT_EXCLUDE = ("text_projection",)


def svd_mode(opts: dict[str, Any]) -> str:
    """``fastmerge.svd`` of a config's options, checked (default fast)."""
    mode = opts.get("svd", "fast")
    if mode not in subspace.MODES:
        raise ConfigError(f"fastmerge.svd: expected one of {', '.join(subspace.MODES)}, got {mode!r}")
    return mode


def options(opts: dict[str, Any], exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> dict[str, Any]:
    """The subspace settings of a config's ``fastmerge:`` section, checked, with defaults (``exclude``: the
    method's default ``exclude_keys``)."""
    exclude = tuple(opts.get("exclude_keys", exclude))
    out = {"mode": svd_mode(opts), "exclude": exclude}
    if not all(isinstance(s, str) for s in out["exclude"]) or isinstance(opts.get("exclude_keys"), str):
        raise ConfigError(f"fastmerge.exclude_keys: expected a list of substrings, got {opts.get('exclude_keys')!r}")
    for key, default in (("svd_oversample", None), ("svd_power_iters", 2)):
        v = opts.get(key, default)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ConfigError(f"fastmerge.{key}: expected an integer >= 0, got {v!r}")
        out[key.removeprefix("svd_")] = v
    return out


def is_matrix(name: str, shape: tuple[int, ...], opts: dict[str, Any]) -> bool:
    """The key predicate: 2-D, non-empty, and no excluded substring in the name."""
    return len(shape) == 2 and min(shape) > 0 and not any(s in name for s in opts["exclude"])


def _polar(mode: str) -> str:
    return "exact" if mode == "exact" else "fast"


def task_stack(calls) -> torch.Tensor:
    """(G, T, *shape) fp32 task vectors w_t * (x_t - base) of a stack of same-shape tensor calls, written in
    place into one buffer (no per-task temporaries)."""
    c0 = calls[0]
    out = torch.empty(len(calls), len(c0.experts), *c0.base.shape, dtype=torch.float32, device=c0.base.device)
    for g, c in enumerate(calls):
        b = c.base.float()
        for t, (x, p) in enumerate(zip(c.experts, c.expert_params, strict=True)):
            o = out[g, t]
            o.copy_(x).sub_(b)
            w = float(p.get("weight", 1.0))
            if w != 1.0:
                o.mul_(w)
    return out


def _finish(calls, delta: torch.Tensor) -> list[torch.Tensor]:
    """base + alpha * delta per call, in each call's output dtype (delta is consumed)."""
    return [d.mul_(float(c.shared["alpha"])).add_(c.base).to(c.out_dtype) for c, d in zip(calls, delta, strict=True)]


def _mean(calls) -> list[torch.Tensor]:
    """The non-matrix rule: the arithmetic mean of the task vectors (a running mean, as the official code)."""
    taus = task_stack(calls)
    m = torch.zeros_like(taus[:, 0])
    for i in range(taus.shape[1]):
        m += (taus[:, i] - m) / (i + 1)
    return _finish(calls, m)


def _dtype(taus: torch.Tensor) -> torch.dtype:
    """The result dtype of the *_delta functions: fp32, or fp64 for fp64 task vectors (exact mode on fp64
    input is then the mathematically exact result the benchmarks measure both modes against)."""
    return torch.float64 if taus.dtype == torch.float64 else torch.float32


def _compute(taus: torch.Tensor) -> torch.Tensor:
    return taus.to(_dtype(taus))


def _pack(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor):
    """(G, T, m, k), (G, T, k), (G, T, k, n) -> U (G, m, T k), s (G, T k), Vh (G, T k, n), task after task."""
    G, T, m, k = u.shape
    n = vh.shape[-1]
    return u.permute(0, 2, 1, 3).reshape(G, m, T * k), s.reshape(G, T * k), vh.reshape(G, T * k, n)


def _orthogonalise(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, mode: str, pair: bool = False,
                   dt: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """polar(U) diag(s) polar(Vh) for stacks U (G, m, p), s (G, p), Vh (G, p, n), and a bool (G,) mask of the
    members whose polar factors fast mode can't vouch for (``subspace.polar_right``'s check; the caller
    recomputes those exactly).

    exact: both polar factors by SVD, Vh in the official orientation (an SVD of its transpose rounds
    differently, and the polar factor amplifies round-off by the packed matrix's condition number).
    fast: polar(U) = U W_u and polar(Vh) = W_v Vh (``subspace.polar_right``). While both W are small enough
    for fp32 products (``subspace.by_precision``), the products run in fp32 and in the cheapest order: the polar
    factor of the smaller side is formed, the p x p neighbours are multiplied into it, and only then comes the
    one large GEMM, so the larger side's polar factor (an m x p x p GEMM) is never formed. Otherwise (tasks
    sharing directions) both polar factors are formed in fp64 and only the final GEMM runs in fp32, where an
    isometry, like exact mode's SVD-based factor, loses nothing. U and Vh come in fp64: W amplifies the
    rounding of its input by the packed matrix's condition number, which reaches 1e5-1e7 where tasks share a
    direction, so fp32 singular vectors alone (6e-8) would cost up to 1e-3 there. ``pair``: U and Vh^T are two
    orthonormal blocks each (TSV-M at T = 2), solved in closed form."""
    G = U.shape[0]
    if mode == "exact":
        out = (subspace.polar(U, mode=mode) * s.unsqueeze(1)) @ subspace.polar(Vh, mode=mode)
        return out, torch.zeros(G, dtype=torch.bool)
    if U.shape[-1] == 0:  # no triplet kept (r < T): the update is zero
        return U.new_zeros(G, U.shape[-2], Vh.shape[-1], dtype=dt), torch.zeros(G, dtype=torch.bool)
    wu, du = subspace.polar_right(U, pair=pair, checked=True)
    wv, dv = subspace.polar_right(Vh.mT, pair=pair, checked=True)
    # U's and V's columns are unit vectors, so W's largest entry is (within sqrt(T)) the condition number
    cond = torch.maximum(wu.abs().amax((-2, -1)), wv.abs().amax((-2, -1)))
    out = torch.empty(G, U.shape[-2], Vh.shape[-1], dtype=dt, device=U.device)
    for sel, fp64 in subspace.by_precision(cond, dt):
        u, w1, w2, sv, vh = U[sel], wu[sel], wv[sel], s[sel].to(dt), Vh[sel]
        if fp64:  # the polar factors themselves, in fp64
            pu, pv = (u.double() @ w1).to(dt), (w2 @ vh.double()).to(dt)
            out[sel] = (pu * sv.unsqueeze(1)) @ pv
            continue
        u, w1, w2, vh = u.to(dt), w1.to(dt), w2.to(dt), vh.to(dt)
        if u.shape[-2] >= vh.shape[-1]:  # tall: the row side is smaller
            out[sel] = u @ ((w1 * sv.unsqueeze(1)) @ (w2 @ vh))
        else:
            out[sel] = ((u @ w1) @ (sv.unsqueeze(-1) * w2)) @ vh
    return out, (du | dv).cpu()


RESIDUAL_MIN = 1e-5  # Iso-CTS: task parts below this share of the common part's top value are round-off


def _exact_where(fn, t: torch.Tensor, out: torch.Tensor, fell: torch.Tensor, **kw) -> torch.Tensor:
    """Recompute the members ``fell`` marks (G,) of a fast-mode result ``out`` by the exact algorithm in fp64
    (``fn(t[fell] in fp64, mode="exact")``): fast mode's fallback, equal to the fp64 algorithm there."""
    if bool(fell.any()):
        sel = fell.to(t.device)
        out[sel] = fn(t[sel].double(), mode="exact", **kw).to(out.dtype)
    return out


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    """(G,) members of a task stack (G, T, m, n) with any non-zero entry (the others merge to zero: no SVD)."""
    return t.reshape(t.shape[0], -1).ne(0).any(-1)


def tsv_m_delta(taus: torch.Tensor, *, mode: str = "fast", oversample: int | None = None,
                power_iters: int = 2, checked: bool = False):
    """TSV-M's merged update of stacks of task matrices: taus (..., T, m, n) -> (..., m, n) (alpha not
    applied). ``mode``: exact | fast | randomized (fastmerge.subspace). In fast mode a matrix whose singular
    triplets or polar factors the fast kernels can't vouch for is computed by the exact algorithm in fp64;
    ``checked=True`` also returns that bool mask (the leading dims)."""
    lead, (T, m, n) = taus.shape[:-3], taus.shape[-3:]
    t = _compute(taus.reshape(-1, T, m, n))
    G = t.shape[0]
    fell = torch.zeros(G, dtype=torch.bool)
    out = t.new_zeros(G, m, n)
    live = _nonzero(t)
    if bool(live.any()):
        tl = t[live] if not bool(live.all()) else t
        Gl = tl.shape[0]
        k = subspace.tsv_pack_sizes(min(m, n), T)
        pair = T == 2 and mode != "exact"
        u, s, vh, tf = subspace.svd_topk(tl.reshape(Gl * T, m, n), k, mode=mode, oversample=oversample,
                                        power_iters=power_iters, checked=True,
                                        dtype=torch.float64 if mode != "exact" else None)
        U, S, V = _pack(u.reshape(Gl, T, m, k), s.reshape(Gl, T, k), vh.reshape(Gl, T, k, n))
        pad = min(m, n) - T * k
        if mode == "exact" and pad:  # the official code's zero slots (they change only the rounding)
            U, V = torch.nn.functional.pad(U, (0, pad)), torch.nn.functional.pad(V, (0, 0, 0, pad))
            S = torch.nn.functional.pad(S, (0, pad))
        dl, fl = _orthogonalise(U, S, V, _polar(mode), pair, t.dtype)
        if mode == "fast":
            dl = _exact_where(tsv_m_delta, tl, dl, fl)
            fell[live.cpu()] = fl | tf.reshape(Gl, T).any(-1)
        out[live] = dl
    out = out.reshape(*lead, m, n)
    return (out, fell.reshape(lead)) if checked else out


def iso_c_delta(taus: torch.Tensor, *, mode: str = "fast", checked: bool = False):
    """Iso-C's update: mean singular value x polar factor of the sum; taus (..., T, m, n) -> (..., m, n). Fast
    mode sums in fp64 (an fp32 sum alone moves the polar factor by 6e-8 x its condition number, 1e-4 where
    tasks share a strong direction) and leaves rank-deficient or extremely ill-conditioned sums to an fp64 SVD
    (``subspace.polar``); ``checked=True`` also returns that bool mask."""
    total = (taus.double() if mode == "fast" else _compute(taus)).sum(-3)
    p, nuc, fell = subspace.polar(total, mode=_polar(mode), nuclear=True, checked=True)
    out = (p * (nuc / min(total.shape[-2:]))[..., None, None]).to(_dtype(taus))
    return (out, fell) if checked else out


def iso_cts_delta(taus: torch.Tensor, *, common_fraction: float = 0.8, mode: str = "fast",
                  oversample: int | None = None, power_iters: int = 2, checked: bool = False):
    """Iso-CTS's update; taus (..., T, m, n) -> (..., m, n). Fast mode works in fp64 throughout and recomputes
    the matrices its kernels can't vouch for exactly (as ``tsv_m_delta``); ``checked=True`` also returns that
    mask."""
    lead, (T, m, n) = taus.shape[:-3], taus.shape[-3:]
    t = _compute(taus.reshape(-1, T, m, n))
    G = t.shape[0]
    fast = mode != "exact"
    tw = t.double() if fast else t
    kc, st = subspace.iso_cts_sizes(min(m, n), T, common_fraction)
    kw = {"mode": mode, "oversample": oversample, "power_iters": power_iters, "checked": True,
          "dtype": torch.float64 if fast else None}
    uc, sc, vhc, fell = subspace.svd_topk(tw.sum(1), kc, **kw)
    if st:
        uc_t = uc.unsqueeze(1).expand(G, T, m, kc).reshape(G * T, m, kc)
        resid = subspace.project_out(tw.reshape(G * T, m, n), uc_t)
        ut, stv, vht, tf = subspace.svd_topk(resid, st, **kw)
        fell = fell | tf.reshape(G, T).any(-1)
        if fast:  # a task part that is only round-off of the projection (tasks inside the common subspace)
            fell = fell | (stv.reshape(G, T, st)[..., 0] <= RESIDUAL_MIN * sc[:, :1]).any(-1).cpu()
        U, S, V = _pack(ut.reshape(G, T, m, st), stv.reshape(G, T, st), vht.reshape(G, T, st, n))
        U, S, V = torch.cat([U, uc], 2), torch.cat([S, sc], 1), torch.cat([V, vhc], 1)
    else:
        U, S, V = uc, sc, vhc
    mean = S.mean(1, keepdim=True).expand_as(S)
    out, fo = _orthogonalise(U, mean, V, _polar(mode), dt=t.dtype)
    if mode == "fast":
        out = _exact_where(iso_cts_delta, t, out, fo, common_fraction=common_fraction)
    fell = fell | fo
    out = out.reshape(*lead, m, n)
    return (out, fell.reshape(lead)) if checked else out


def _kw(o: dict[str, Any]) -> dict[str, Any]:
    return {"mode": o["mode"], "oversample": o["oversample"], "power_iters": o["power_iters"]}


def _count(calls, fell: torch.Tensor) -> None:
    """Fast mode's fallbacks, for the merge summary: matrices merged, and how many went to the exact path."""
    notes = calls[0].notes
    notes["svd_matrices"] = notes.get("svd_matrices", 0) + len(calls)
    notes["svd_exact_fallback"] = notes.get("svd_exact_fallback", 0) + int(fell.sum())


def tsv_m(calls, o: dict[str, Any]) -> list[torch.Tensor]:
    if not is_matrix(calls[0].name, tuple(calls[0].base.shape), o):
        return _mean(calls)
    delta, fell = tsv_m_delta(task_stack(calls), **_kw(o), checked=True)
    _count(calls, fell)
    return _finish(calls, delta)


def iso_c(calls, o: dict[str, Any]) -> list[torch.Tensor]:
    if not is_matrix(calls[0].name, tuple(calls[0].base.shape), o):
        return _mean(calls)
    delta, fell = iso_c_delta(task_stack(calls), mode=o["mode"], checked=True)
    _count(calls, fell)
    return _finish(calls, delta)


def iso_cts(calls, o: dict[str, Any]) -> list[torch.Tensor]:
    if not is_matrix(calls[0].name, tuple(calls[0].base.shape), o):
        return _mean(calls)
    fr = float(calls[0].shared["common_fraction"])
    delta, fell = iso_cts_delta(task_stack(calls), common_fraction=fr, **_kw(o), checked=True)
    _count(calls, fell)
    return _finish(calls, delta)


def tsv_c_factors(calls, o: dict[str, Any]):
    """Per call: (U (T, m, k), S (T, k), Vh (T, k, n)) fp32 for matrices, or the raw task vectors (T, *shape).
    The official TSV-C compresses every 2-D tensor (its text_projection exclusion is commented out), so its
    options exclude nothing unless ``exclude_keys`` says so (``TSV_C_EXCLUDE``)."""
    taus = task_stack(calls)
    G, T = taus.shape[:2]
    shape = tuple(calls[0].base.shape)
    if not is_matrix(calls[0].name, shape, o):
        return [tuple([taus[g]]) for g in range(G)]
    m, n = shape
    k = tsv_c_rank(min(m, n), T)
    u, s, vh, fell = subspace.svd_topk(taus.reshape(G * T, m, n), k, **_kw(o), checked=True)
    _count(calls, fell.reshape(G, T).any(-1))
    u, s, vh = u.reshape(G, T, m, k), s.reshape(G, T, k), vh.reshape(G, T, k, n)
    return [(u[g], s[g], vh[g]) for g in range(G)]


def tsv_c_rank(r: int, tasks: int) -> int:
    """TSV-C keeps int(r / T) triplets (a true division; TSV-M's int(r * (1/T)) can be one less, e.g. 49, 49)."""
    return r // tasks


TSV_C_EXCLUDE: tuple[str, ...] = ()
OPTIONS = frozenset({"svd", "svd_oversample", "svd_power_iters", "exclude_keys"})


def _check(exclude: tuple[str, ...]):
    def check(cfg) -> None:
        options(cfg.options, exclude)

    return check


def _method(name: str, fn, doc: str, extra: tuple[Param, ...] = ()) -> Method:
    def batch(calls):
        return fn(calls, options(calls[0].options))

    return Method(name, (Param("alpha", SHARED, float, 1.0), Param("weight", NONBASE, float, 1.0), *extra),
                  lambda c: batch([c])[0], min_inputs=2, doc=doc, batch=batch, options=OPTIONS,
                  check=_check(DEFAULT_EXCLUDE))


def _tsv_c_batch(calls):
    return tsv_c_factors(calls, options(calls[0].options, TSV_C_EXCLUDE))


def _tsv_c_sink(run, od) -> dict:
    """TSV-C's store: stream stacks of same-shape tensors, compress each task vector to its top int(r/T)
    triplets (layout: fastmerge.store)."""
    cfg, jobs = run.cfg, run.jobs
    names = sinks.task_names(cfg)
    T = len(names)
    o = options(cfg.options, TSV_C_EXCLUDE)
    fac_layout, ranks = [], {}
    for j in jobs:
        if not j.floating:
            continue
        if is_matrix(j.name, j.shape, o):
            m, n = j.shape
            k = ranks[j.name] = tsv_c_rank(min(m, n), T)
            fac_layout += [(j.name + ".U", j.out_dtype, (T, m, k)), (j.name + ".S", torch.float32, (T, k)),
                           (j.name + ".Vh", j.out_dtype, (T, k, n))]
        else:
            fac_layout.append((j.name + ".tau", j.out_dtype, (T, *j.shape)))
    wb = ShardedWriter(od.sub("base"), sinks.base_layout(run), run.out_shard_bytes)
    wf = ShardedWriter(od.sub("factors"), fac_layout, run.out_shard_bytes)

    def factors(fl):
        items = []
        for (j, _), parts in zip(fl, tsv_c_factors([run.tensor_call(j, ts) for j, ts in fl], o),
                                 strict=True):
            if len(parts) == 1:
                items.append((wf, j.name + ".tau", parts[0].to(j.out_dtype)))
            else:
                u, s, vh = parts
                items += [(wf, j.name + ".U", u.to(j.out_dtype)), (wf, j.name + ".S", s.float()),
                          (wf, j.name + ".Vh", vh.to(j.out_dtype))]
        return items

    sinks.stream_stacks(run, [wb, wf], factors)
    return sinks.finish_store(run, od, names, [1.0] * T, wb.bytes_written + wf.bytes_written,
                        ranks_per_task=sorted(set(ranks.values())))


register(
    _method("tsv_m", tsv_m, "Task Singular Vectors merge: top r/T triplets per task, orthogonalised, original values"),
    _method("iso_c", iso_c, "Iso-C: mean singular value x polar factor of the summed task vectors"),
    _method("iso_cts", iso_cts, "Iso-CTS: common + task-specific subspaces, orthogonalised, flattened spectrum",
            (Param("common_fraction", SHARED, float, 0.8, 0.0, 1.0, lo_open=True),)),
    Method("tsv_c", (Param("weight", NONBASE, float, 1.0),), None, sink=_tsv_c_sink, min_inputs=2,
           batch=_tsv_c_batch, options=OPTIONS, check=_check(TSV_C_EXCLUDE),
           doc="TSV-C: a multi-task store of each task's top r/T singular triplets per matrix"),
)
