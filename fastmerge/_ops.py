"""The op contracts: torch.library schemas in the ``fastmerge`` namespace, their checks and fake kernels.

Each op mutates preallocated outputs and returns nothing (callers in fastmerge.ops allocate). The real
implementation of every op is one function: check the arguments, make the inputs contiguous (visible
copies), move the tiny parameter tables to the CPU, pick a backend (fastmerge.backends.select) and run it.
Fake kernels run the same checks, so the ops work under torch.compile and on fake/meta tensors.
"""

from __future__ import annotations

import torch

from . import context
from .backends import select

_LIB = torch.library.Library("fastmerge", "DEF")  # noqa: TOR901 - the namespace is owned by this module
_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

SCHEMAS = {
    "abs_histogram": "abs_histogram(Tensor x, Tensor(a!) hist, int level, int prefix) -> ()",
    "row_kth_largest_abs": "row_kth_largest_abs(Tensor x, int k, Tensor(a!) out) -> ()",
    "prune": "prune(Tensor x, Tensor lo, Tensor hi, Tensor(a!) out, Tensor(b!) stats, float p, int seed, "
    "int key, int offset, float scale) -> ()",
    "della_prune": "della_prune(Tensor x, Tensor(a!) out, float density, float epsilon, int seed, int key, "
    "bool rescale) -> ()",
    "ties_merge": "ties_merge(Tensor? base, Tensor[] experts, Tensor params, Tensor(a!)? out, Tensor(b!) counts, "
    "int seed, int key, int offset, int elect, int merge, bool weighted_elect, float zero_sign, float lam) -> ()",
    "tall_masks": "tall_masks(Tensor? base, Tensor[] experts, Tensor lambdas, Tensor? mtl, Tensor(a!) masks) -> ()",
    "consensus_merge": "consensus_merge(Tensor? base, Tensor[] experts, Tensor lambdas, Tensor? mtl, int min_count, "
    "float lam, Tensor(a!) out) -> ()",
    "emr_elect": "emr_elect(Tensor? base, Tensor[] experts, Tensor(a!) tau_uni, Tensor(b!) masks, "
    "Tensor(c!) stats) -> ()",
    "orth_project": "orth_project(Tensor x, Tensor u, Tensor(a!) out) -> ()",
    "doge_grad": "doge_grad(Tensor taus, Tensor a, Tensor d, Tensor(a!) out) -> ()",
    "tv_combine": "tv_combine(Tensor base, Tensor taus, Tensor coef, Tensor offsets, Tensor(a!) out) -> ()",
    "tv_coef_grad": "tv_coef_grad(Tensor grad, Tensor taus, Tensor offsets, Tensor(a!) out) -> ()",
    "adam_step": "adam_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor scale, "
    "int repeat, float lr, float beta1, float beta2, float eps, int step) -> ()",
}


# ---------------------------------------------------------------------------------------------------------
# checks (shared by the real and the fake kernels); messages name the argument


def _check(cond, message) -> None:
    """torch._check for plain bools without its first-call import of the symbolic-shapes machinery (sympy,
    ~0.4 s); symbolic conditions (fake tensors under torch.compile) still go to torch._check."""
    if cond is True:
        return
    if cond is False:
        raise RuntimeError(message())
    torch._check(cond, message)


def _float(name: str, t: torch.Tensor) -> None:
    _check(t.dtype in _FLOAT, lambda: f"{name} must be a floating tensor, got {t.dtype}")


def _buffer(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple, device: torch.device) -> None:
    _check(
        t.dtype == dtype and tuple(t.shape) == tuple(shape),
        lambda: f"{name} must be {dtype} of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}",
    )
    _check(t.device == device, lambda: f"{name} is on {t.device}, inputs are on {device}")


def _same(name: str, t: torch.Tensor, like: torch.Tensor, what: str = "experts[0]") -> None:
    _check(
        tuple(t.shape) == tuple(like.shape),
        lambda: f"{name} has shape {tuple(t.shape)}, {what} has {tuple(like.shape)}",
    )
    _check(t.device == like.device, lambda: f"{name} is on {t.device}, {what} is on {like.device}")


def _experts(base, experts, table: torch.Tensor | None = None, table_name: str = "", cols: int = 0):
    _check(len(experts) > 0, lambda: "experts must hold at least one tensor, got an empty list")
    e0 = experts[0]
    for i, e in enumerate(experts):
        _float(f"experts[{i}]", e)
        _same(f"experts[{i}]", e, e0)
        _check(e.dtype == e0.dtype, lambda i=i, e=e: f"experts[{i}] is {e.dtype}, experts[0] is {e0.dtype}")
    if base is not None:
        _same("base", base, e0)
        _check(base.dtype == e0.dtype, lambda: f"base is {base.dtype}, experts are {e0.dtype}")
    if table is not None:
        shape = (len(experts), cols) if cols else (len(experts),)
        _check(
            tuple(table.shape) == shape and table.dtype == torch.float32,
            lambda: f"{table_name} must be float32 of shape {shape}, got {table.dtype} {tuple(table.shape)}",
        )


def check(op: str, *a) -> None:
    if op == "abs_histogram":
        x, hist, level, prefix = a
        _float("x", x)
        _buffer("hist", hist, torch.int64, (1 << 16,), x.device)
        _check(level in (0, 1), lambda: f"level must be 0 or 1, got {level}")
        _check(0 <= prefix < (1 << 15), lambda: f"prefix must be in [0, 32768), got {prefix}")
    elif op == "row_kth_largest_abs":
        x, k, out = a
        _float("x", x)
        _check(x.dim() == 2, lambda: f"x must be 2-D (rows, cols), got shape {tuple(x.shape)}")
        _check(0 <= k <= x.shape[1], lambda: f"k must be in [0, {x.shape[1]}], got {k}")
        _buffer("out", out, torch.float32, (x.shape[0],), x.device)
    elif op == "prune":
        x, lo, hi, out, stats, p, *_ = a
        _float("x", x)
        _float("out", out)
        _same("out", out, x, "x")
        for n, t in (("lo", lo), ("hi", hi)):
            _check(t.dtype == torch.float32 and t.dim() == 1, lambda n=n: f"{n} must be 1-D float32")
        _check(lo.numel() == hi.numel(), lambda: f"lo has {lo.numel()} entries, hi has {hi.numel()}")
        r = lo.numel()
        _check(r >= 1 and x.numel() % r == 0, lambda: f"lo/hi ({r} rows) must divide x.numel()={x.numel()}")
        _buffer("stats", stats, torch.float64, (2,), x.device)
        _check(0.0 <= p <= 1.0, lambda: f"p (drop probability) must be in [0, 1], got {p}")
        _check(a[-2] >= 0, lambda: f"offset must be >= 0, got {a[-2]}")
    elif op == "della_prune":
        x, out, density, epsilon, *_ = a
        _float("x", x)
        _same("out", out, x, "x")
        _check(0.0 <= epsilon < density and density + epsilon <= 1.0,
                     lambda: f"need 0 <= epsilon < density and density + epsilon <= 1 (keep probabilities in (0, 1]),"
                     f" got density={density} epsilon={epsilon}")
    elif op == "ties_merge":
        base, experts, params, out, counts, seed, key, offset, elect, merge, *_ = a
        _experts(base, experts, params, "params", 5)
        if out is not None:
            _float("out", out)
            _same("out", out, experts[0])
        _buffer("counts", counts, torch.int64, (2,), experts[0].device)
        _check(elect in (0, 1, 2), lambda: f"elect code must be 0, 1 or 2, got {elect}")
        _check(merge in (0, 1, 2, 3), lambda: f"merge code must be 0..3, got {merge}")
        _check(offset >= 0, lambda: f"offset must be >= 0, got {offset}")
    elif op in ("tall_masks", "consensus_merge"):
        base, experts, lambdas, mtl = a[:4]
        _experts(base, experts, lambdas, "lambdas")
        if mtl is not None:
            _float("mtl", mtl)
            _same("mtl", mtl, experts[0])
        if op == "tall_masks":
            _buffer("masks", a[4], torch.bool, (len(experts), *experts[0].shape), experts[0].device)
        else:
            _float("out", a[6])
            _same("out", a[6], experts[0])
    elif op == "emr_elect":
        base, experts, tau_uni, masks, stats = a
        _experts(base, experts)
        _float("tau_uni", tau_uni)
        _same("tau_uni", tau_uni, experts[0])
        _buffer("masks", masks, torch.bool, (len(experts), *experts[0].shape), experts[0].device)
        _buffer("stats", stats, torch.float64, (len(experts), 2), experts[0].device)
    elif op == "orth_project":
        x, u, out = a
        _float("x", x)
        _float("u", u)
        _float("out", out)
        _check(x.dim() == 3, lambda: f"x must be a stack of matrices (B, m, n), got shape {tuple(x.shape)}")
        _check(u.dim() == 3 and u.shape[0] == x.shape[0] and u.shape[1] == x.shape[1],
               lambda: f"u must be (B, m, k) = ({x.shape[0]}, {x.shape[1]}, k) like x, got {tuple(u.shape)}")
        _check(u.device == x.device, lambda: f"u is on {u.device}, x is on {x.device}")
        _same("out", out, x, "x")
    elif op == "doge_grad":
        taus, a, d, out = a
        for name, t, dim in (("taus", taus, 4), ("a", a, 3), ("d", d, 3), ("out", out, 3)):
            _check(t.dtype == torch.float32 and t.dim() == dim,
                   lambda name=name, t=t, dim=dim: f"{name} must be a {dim}-D float32 tensor, got {t.dtype} "
                   f"{tuple(t.shape)}")
        B, T, M, N = taus.shape
        _check(tuple(a.shape) == (B, T, M), lambda: f"a must have shape {(B, T, M)}, got {tuple(a.shape)}")
        _check(tuple(d.shape) == (B, M, N), lambda: f"d must have shape {(B, M, N)}, got {tuple(d.shape)}")
        _same("out", out, d, "d")
        _check(a.device == taus.device and d.device == taus.device, lambda: "taus, a and d must share a device")
    elif op in ("tv_combine", "tv_coef_grad"):
        if op == "tv_combine":
            vec, taus, coef, offsets, out = a
        else:
            vec, taus, offsets, out = a
        _float("taus", taus)
        _check(taus.dim() == 2, lambda: f"taus must be (T, P), got shape {tuple(taus.shape)}")
        T, P = taus.shape
        name = "base" if op == "tv_combine" else "grad"
        _check(vec.dtype == torch.float32 and tuple(vec.shape) == (P,),
               lambda: f"{name} must be float32 of shape ({P},), got {vec.dtype} {tuple(vec.shape)}")
        _check(vec.device == taus.device, lambda: f"{name} is on {vec.device}, taus on {taus.device}")
        _check(offsets.dtype == torch.int64 and offsets.dim() == 1 and offsets.numel() >= 1,
               lambda: f"offsets must be 1-D int64 (S + 1 segment bounds), got {offsets.dtype} {tuple(offsets.shape)}")
        S = offsets.numel() - 1
        if op == "tv_combine":
            _check(coef.dtype == torch.float32 and tuple(coef.shape) == (T, S),
                   lambda: f"coef must be float32 of shape ({T}, {S}), got {coef.dtype} {tuple(coef.shape)}")
            _buffer("out", out, torch.float32, (P,), taus.device)
        else:
            _buffer("out", out, torch.float32, (T, S), taus.device)
    elif op == "adam_step":
        param, grad, m1, m2, scale, repeat, lr, b1, b2, eps, step = a
        for name, t in (("param", param), ("grad", grad), ("exp_avg", m1), ("exp_avg_sq", m2), ("scale", scale)):
            _check(t.dtype == torch.float32, lambda name=name, t=t: f"{name} must be float32, got {t.dtype}")
            _check(t.device == param.device,
                   lambda name=name, t=t: f"{name} is on {t.device}, param is on {param.device}")
        _same("exp_avg", m1, param, "param")
        _same("exp_avg_sq", m2, param, "param")
        S = scale.numel()
        _check(scale.dim() == 1 and param.dim() >= 1 and param.shape[0] == S,
               lambda: f"scale must be 1-D with one entry per slice of param (dim 0), got {tuple(scale.shape)} "
               f"for param {tuple(param.shape)}")
        _check(repeat >= 1 and S % repeat == 0 and grad.dim() == param.dim() and grad.shape[0] * repeat == S
               and tuple(grad.shape[1:]) == tuple(param.shape[1:]),
               lambda: f"grad must have shape ({S} / repeat, *param.shape[1:]) with repeat={repeat}, got "
               f"{tuple(grad.shape)}")
        _check(step >= 1, lambda: f"step must be >= 1, got {step}")
        _check(0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0, lambda: f"betas must lie in [0, 1), got ({b1}, {b2})")


# ---------------------------------------------------------------------------------------------------------
# the real implementation: normalise, select, run


def _contig(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def _run(op: str, *a) -> None:
    check(op, *a)
    if op in ("tv_combine", "tv_coef_grad"):
        off = a[-2].detach().cpu().contiguous()
        o = off.tolist()
        _check(o[0] == 0 and o[-1] == a[1].shape[1] and all(x <= y for x, y in zip(o, o[1:], strict=False)),
               lambda: f"offsets must rise from 0 to P={a[1].shape[1]}, got {o[:3]}...{o[-2:]}")
        fn = select(op, a[1].device, (a[1].dtype,))
        if op == "tv_combine":
            fn(_contig(a[0]), _contig(a[1]), a[2].detach().float().contiguous(), off, a[4])
        else:
            _into(a[3], lambda out: fn(_contig(a[0]), _contig(a[1]), off, out))
        return
    if op == "doge_grad":
        taus, a_, d, out = a
        fn = select(op, taus.device, (taus.dtype,))
        _into(out, lambda o: fn(_contig(taus), _contig(a_), _contig(d), o))
        return
    if op == "adam_step":
        param, grad, m1, m2, scale, *rest = a
        _check(param.is_contiguous() and m1.is_contiguous() and m2.is_contiguous(),
               lambda: "adam_step updates param, exp_avg and exp_avg_sq in place: they must be contiguous")
        fn = select(op, param.device, (param.dtype,))
        fn(param, _contig(grad), m1, m2, _contig(scale), *rest)
        return
    if op == "orth_project":
        x, u, out = a
        if torch.float64 in (x.dtype, u.dtype, out.dtype) and not context.forced_backend():
            from .backends import get_backend  # fp64: two BLAS GEMMs in fp64, which is what the reference does

            fn = get_backend("reference").fn(op)
        else:
            fn = select(op, x.device, (x.dtype, u.dtype, out.dtype))
        _into(out, lambda o: fn(x, u, o))  # the kernels take any strides
        return
    if op in ("abs_histogram", "row_kth_largest_abs", "prune", "della_prune"):
        x = a[0]
        fn = select(op, x.device, (x.dtype,))
        if op == "prune":
            x, lo, hi, out, stats, *rest = a
            _into(out, lambda o: fn(_contig(x), _contig(lo), _contig(hi), o, stats, *rest))
        elif op == "della_prune":
            x, out, *rest = a
            _into(out, lambda o: fn(_contig(x), o, *rest))
        elif op == "row_kth_largest_abs":
            _into(a[2], lambda o: fn(_contig(x), a[1], o))
        else:
            fn(_contig(x), *a[1:])
        return
    base, experts = _contig(a[0]), [_contig(e) for e in a[1]]
    dtypes = (experts[0].dtype,)
    o = {"ties_merge": a[3], "consensus_merge": a[-1], "emr_elect": a[2]}.get(op)  # float outputs
    if o is not None:
        dtypes = (*dtypes, o.dtype)
    fn = select(op, experts[0].device, dtypes, len(experts))
    if op == "ties_merge":
        params, out, *rest = a[2:]
        _into(out, lambda out_: fn(base, experts, params.detach().float().cpu().contiguous(), out_, *rest))
    elif op in ("tall_masks", "consensus_merge"):
        lambdas, mtl = a[2].detach().float().cpu().contiguous(), _contig(a[3])
        if op == "tall_masks":
            _into(a[4], lambda m: fn(base, experts, lambdas, mtl, m))
        else:
            _into(a[6], lambda out_: fn(base, experts, lambdas, mtl, a[4], a[5], out_))
    else:
        tau_uni, masks, stats = a[2:]
        _into(tau_uni, lambda u: _into(masks, lambda m: fn(base, experts, u, m, stats)))


def _into(out, call) -> None:
    """Run ``call`` on ``out`` itself when contiguous, else on a contiguous scratch copied back (visible)."""
    if out is None or out.is_contiguous():
        call(out)
    else:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        call(tmp)
        out.copy_(tmp)


def _register(op: str) -> None:
    _LIB.define(SCHEMAS[op])

    def impl(*a):
        _run(op, *a)

    def fake(*a):
        check(op, *a)

    _LIB.impl(op, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastmerge::{op}", fake, lib=_LIB)


for _op in SCHEMAS:
    _register(_op)
