"""ties_merge on every backend that registers it, against its oracle (fastmerge/ops/ties_merge.py); its
torch.library contract (opcheck, fake tensors, torch.compile) and its errors."""

import itertools
import math
import os

import cpp_cases as cpp
import pytest
import torch
import triton_cases as tri
from _backends import backends_for, device_or_skip, dtypes_for, kernel
from _cases import INF, SHAPES, experts_for, opcheck_args
from torch._subclasses.fake_tensor import FakeTensorMode

import fastmerge
from fastmerge import ops
from fastmerge.ops.philox import to_i64
from fastmerge.ops.ties_merge import ELECT, MERGE, ties_merge_ref, ties_params

ELECTS = ["none", "sum", "count"]
MERGES = ["sum", "mean", "wmean", "max"]


@pytest.mark.parametrize("backend", backends_for("ties_merge"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_ties_merge(backend, shape, T):
    """Every (dtype, base, elect, merge, weighting) combination against the oracle. Under Triton's interpreter
    (~0.3 s a launch) each case runs a third of them, rotating with the case, so every combination still runs
    at every T on two of the shapes."""
    dev = device_or_skip(backend)
    combos = list(itertools.product(dtypes_for(backend, dev), (True, False), ELECTS, MERGES, (False, True)))
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        combos = combos[SHAPES.index(shape) % 3::3]
    for dtype, with_base in dict.fromkeys(c[:2] for c in combos):
        base, ex = experts_for(shape, dtype, dev, T, with_base)
        w = [1.0, -0.5, 2.0, 0.25, 1.0][:T]
        params = ties_params(T, weights=w, lo=[0.25, 0.0, 0.5, 0.0, 0.25][:T],
                             hi=[math.inf, 1.0, math.inf, math.inf, 0.75][:T],
                             p=[0.0, 0.25, 0.0, 0.5, 0.0][:T], scale=[1.0, 2.0, 1.0, 0.5, 1.0][:T])
        for _, _, elect, merge, weighted in (c for c in combos if c[:2] == (dtype, with_base)):
            kw = dict(seed=7, key=to_i64(2**63 + 5), offset=3, elect=ELECT[elect],
                      merge=MERGE[merge], weighted_elect=weighted, zero_sign=-1.0, lam=0.5)
            out = torch.empty(shape, dtype=torch.float32, device=dev)
            counts = torch.ones(2, dtype=torch.int64, device=dev)
            kernel(backend, "ties_merge")(base, ex, params, out, counts, **{**kw})
            want, wc = ties_merge_ref(base, ex, params, **{**kw, "elect": elect, "merge": merge},
                                      out_dtype=torch.float32)
            tag = (dtype, with_base, elect, merge, weighted)
            if merge in ("mean", "wmean"):  # one rounded division: equal up to fp32 rounding
                torch.testing.assert_close(out.cpu(), want.cpu(), rtol=2e-7, atol=0, msg=str(tag))
            else:
                assert torch.equal(out.cpu(), want.cpu()), tag
            assert torch.equal(counts.cpu(), wc.cpu() + 1), tag


@pytest.mark.parametrize("backend", backends_for("ties_merge"))
def test_ties_merge_counts_only_and_out_dtype(backend):
    dev = device_or_skip(backend)
    base, ex = experts_for((13, 11), torch.float16, dev, 3)
    params = ties_params(3)
    counts = torch.zeros(2, dtype=torch.int64, device=dev)
    kernel(backend, "ties_merge")(base, ex, params, None, counts, 0, 0, 0, 1, 1, False, 1.0, 1.0)
    assert torch.equal(counts.cpu(), ties_merge_ref(base, ex, params)[1].cpu())
    for od in dtypes_for(backend, dev):
        out = torch.empty((13, 11), dtype=od, device=dev)
        kernel(backend, "ties_merge")(base, ex, params, out, counts, 0, 0, 0, 1, 0, False, 1.0, 1.0)
        assert torch.equal(out.cpu(), ties_merge_ref(base, ex, params, merge="sum", out_dtype=od)[0].cpu())


# ---- the op's contract -------------------------------------------------------------------------------------


def test_opcheck():
    b, e = opcheck_args()
    args = (b, e, ops.ties_params(3), torch.empty(9, 5), torch.zeros(2, dtype=torch.int64), 1, 2, 0, 1, 1, False, 1.0,
            0.5)
    torch.library.opcheck(torch.ops.fastmerge.ties_merge.default, args)


def test_fake_tensors_check_shapes():
    with FakeTensorMode():
        base, ex = torch.empty(64, 32), [torch.empty(64, 32) for _ in range(2)]
        out, counts = ops.ties_merge(base, ex, lam=0.5)
        assert out.shape == (64, 32) and counts.shape == (2,)
        with pytest.raises(Exception, match=r"experts\[1\] has shape"):
            ops.ties_merge(base, [ex[0], torch.empty(64, 31)])


def test_torch_compile_fullgraph():
    base, ex = opcheck_args()

    def f(b, e0, e1):
        out, _ = ops.ties_merge(b, [e0, e1], merge="sum", lam=0.5)
        return out * 2

    got = torch.compile(f, fullgraph=True, backend="eager")(base, ex[0], ex[1])
    torch.testing.assert_close(got, f(base, ex[0], ex[1]))


def test_errors_name_the_argument():
    base, ex = opcheck_args()
    with pytest.raises(Exception, match=r"experts\[2\] is torch.float16"):
        ops.ties_merge(base, [ex[0], ex[1], ex[2].half()])
    with pytest.raises(Exception, match="base has shape"):
        ops.ties_merge(torch.randn(3), ex)
    with pytest.raises(ValueError, match="experts must hold at least one"):
        ops.ties_merge(base, [])
    with pytest.raises(ValueError, match="density must be a fraction"):
        fastmerge.ties(base, ex, 1.5)
    with pytest.raises(ValueError, match="density has 2 values for 3 experts"):
        fastmerge.ties(base, ex, [0.5, 0.5])
    with pytest.raises(ValueError, match="compat must be one of"):
        fastmerge.ties(base, ex, 0.5, compat="nope")
    with pytest.raises(Exception, match="params must be float32 of shape"):
        ops.ties_merge(base, ex, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="weights has 2 values for 3 experts"):
        ops.ties_params(3, weights=[1.0, 2.0])


# ---- the C++ kernel ----------------------------------------------------------------------------------------


def cpp_ties_params(T, kind, p, g, negative=True):
    w = torch.rand(T, generator=g) * 1.5 + 0.25
    if negative and T > 1:
        w[1] = -w[1]
    if kind == "int":
        w = torch.tensor([[1.0, -2.0, 0.5, 3.0, 1.0][t] if negative else 1.0 for t in range(T)])
        lo = torch.tensor([[0.0, 1.0, 0.0, 2.0, 1.0][t] for t in range(T)])
        hi = torch.tensor([[INF, 3.0, INF, INF, 2.0][t] for t in range(T)])
        s = torch.tensor([[1.0, 2.0, 0.5, 1.0, 4.0][t] for t in range(T)])
    else:
        lo = torch.rand(T, generator=g) * 0.5
        hi = torch.where(torch.arange(T) % 2 == 0, torch.full((T,), INF), 1.0 + torch.rand(T, generator=g))
        s = 1.0 + torch.rand(T, generator=g)
    pp = torch.tensor([p if t % 3 != 1 else 0.0 for t in range(T)])
    return torch.stack([w, lo, hi, pp, s], dim=1).float().contiguous()


def run_ties(C, base, ex, params, out_dtype, *, seed=0, key=0, offset=0, elect="sum", merge="mean",
             weighted_elect=False, zero_sign=1.0, lam=1.0, counts=None):
    out = None if out_dtype is None else torch.empty(ex[0].shape, dtype=out_dtype)
    counts = torch.zeros(2, dtype=torch.int64) if counts is None else counts
    C.ties_merge_cpu(base, ex, params, out, counts, cpp.s64(seed), cpp.s64(key), offset, ELECT[elect], MERGE[merge],
                     weighted_elect, zero_sign, lam)
    return out, counts


@pytest.mark.parametrize("dtype", cpp.DTYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["int", "float"])
def test_cpp_ties_merge_modes(C, dtype, T, kind, isa):
    g = torch.Generator().manual_seed(T)
    for shape, with_base in itertools.product([(1,), (7,), (37, 129)], [True, False]):
        base, ex = cpp.experts(shape, dtype, kind, T, with_base, seed=11 * T + len(shape))
        for p in (0.0, 0.3):
            params = cpp_ties_params(T, kind, p, g)
            for elect, merge, weighted in itertools.product(ELECT, MERGE, [False, True]):
                kw = dict(
                    seed=7,
                    key=3,
                    offset=5,
                    elect=elect,
                    merge=merge,
                    weighted_elect=weighted,
                    zero_sign=-1.0 if weighted else 1.0,
                    lam=0.7 if kind == "float" else 1.0,
                )
                ref, ref_counts = ties_merge_ref(base, ex, params, **kw)
                out, counts = run_ties(C, base, ex, params, dtype, **kw)
                cpp.same(out, ref)
                assert torch.equal(counts, ref_counts), (elect, merge, weighted, counts, ref_counts)


@pytest.mark.parametrize("shape", cpp.SHAPES)
def test_cpp_ties_merge_shapes_out_dtypes_counts_only(C, shape):
    g = torch.Generator().manual_seed(1)
    base, ex = cpp.experts(shape, torch.bfloat16, "float", 3, True, seed=2)
    params = cpp_ties_params(3, "float", 0.2, g)
    for out_dtype in cpp.DTYPES:
        ref, ref_counts = ties_merge_ref(base, ex, params, seed=1, elect="sum", merge="wmean", out_dtype=out_dtype)
        out, counts = run_ties(C, base, ex, params, out_dtype, seed=1, elect="sum", merge="wmean")
        cpp.same(out, ref)
        assert torch.equal(counts, ref_counts)
    # out=None: counts only, and counts accumulate
    acc = torch.tensor([5, 7], dtype=torch.int64)
    out, counts = run_ties(C, base, ex, params, None, seed=1, elect="count", counts=acc)
    _, ref_counts = ties_merge_ref(base, ex, params, seed=1, elect="count")
    assert out is None
    assert torch.equal(counts, ref_counts + torch.tensor([5, 7]))
    # elect "none" without out: nothing to do, counts untouched
    _, counts = run_ties(C, base, ex, params, None, elect="none", counts=acc.clone())
    assert torch.equal(counts, acc)


def test_cpp_ties_merge_zero_sign_and_exact_ties(C, isa):
    # integer deltas with many exact-zero election sums; zero_sign 0 / -1 / +1
    base, ex = cpp.experts((37, 129), torch.float32, "int", 2, True, seed=5)
    params = cpp_ties_params(2, "int", 0.0, torch.Generator().manual_seed(0), negative=False)
    for zs, elect, merge in itertools.product([0.0, -1.0, 1.0], ["sum", "count"], list(MERGE)):
        ref, rc = ties_merge_ref(base, ex, params, elect=elect, merge=merge, zero_sign=zs)
        out, c = run_ties(C, base, ex, params, torch.float32, elect=elect, merge=merge, zero_sign=zs)
        cpp.same(out, ref)
        assert torch.equal(c, rc)
    _, rc = ties_merge_ref(base, ex, params, elect="sum")
    assert int(rc.sum()) < base.numel()  # there really were zero sums


def test_cpp_ties_merge_special_values(C, isa):
    vals = torch.tensor([0.0, -0.0, 1.0, -1.0, INF, -INF, float("nan"), 1e-40, -1e-40, 3e38, -3e38, 1e-8])
    ex = [vals[torch.randperm(len(vals), generator=torch.Generator().manual_seed(t))].repeat(3) for t in range(3)]
    base = vals.repeat(3).flip(0).contiguous()
    params = torch.tensor([[1.0, 0.0, INF, 0.0, 1.0], [-1.0, 0.0, INF, 0.0, 2.0], [1e-8, 0.0, INF, 0.0, 1.0]])
    for b, elect, merge, weighted in itertools.product([None, base], ELECT, MERGE, [False, True]):
        kw = dict(elect=elect, merge=merge, weighted_elect=weighted)
        ref, rc = ties_merge_ref(b, ex, params, **kw)
        out, c = run_ties(C, b, ex, params, torch.float32, **kw)
        cpp.same(out, ref)
        assert torch.equal(c, rc)


def test_cpp_ties_merge_dare_offsets_chunks_threads(C, isa3):
    g = torch.Generator().manual_seed(3)
    n = 150_001  # large enough for several threads and blocks
    base = torch.randn(n, generator=g)
    ex = [torch.randn(n, generator=g) for _ in range(2)]
    params = torch.tensor([[1.0, 0.0, INF, 0.5, 2.0], [0.5, 0.0, INF, 0.9, 10.0]])
    kw = dict(seed=123, key=2**63 + 5, offset=10, elect="sum", merge="sum")
    ref, rc = ties_merge_ref(base, ex, params, **kw)
    whole, c = run_ties(C, base, ex, params, torch.float32, **kw)
    cpp.same(whole, ref)
    assert torch.equal(c, rc)
    # chunks with offsets give the whole tensor's draws
    cut = 70_003
    kw1 = dict(kw, offset=10 + cut)
    a, _ = run_ties(C, base[:cut], [e[:cut] for e in ex], params, torch.float32, **kw)
    b, _ = run_ties(C, base[cut:].contiguous(), [e[cut:].contiguous() for e in ex], params, torch.float32, **kw1)
    cpp.same(torch.cat([a, b]), whole)
    # thread count does not change anything
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, c1 = run_ties(C, base, ex, params, torch.float32, **kw)
    finally:
        torch.set_num_threads(old)
    cpp.same(one, whole)
    assert torch.equal(c1, c)


def test_cpp_bad_arguments_are_named(C):
    x = torch.ones(4)
    with pytest.raises(RuntimeError, match="params"):
        C.ties_merge_cpu(
            None, [x], torch.zeros(4), None, torch.zeros(2, dtype=torch.int64), 0, 0, 0, 1, 0, False, 1.0, 1.0
        )


# ---- the Triton kernel -------------------------------------------------------------------------------------


def _params(T, drop=True):
    """fp32 (T, 5) CPU params with dyadic values (exact products), negative weights and bands."""
    rows = [
        [1.0, 0.0, INF, 0.3 if drop else 0.0, 2.0],
        [-0.5, 1.0, 3.0, 0.0, 1.0],
        [2.0, 0.0, 2.5, 0.5 if drop else 0.0, 0.5],
    ]
    return torch.tensor(rows[:T], dtype=torch.float32)


def _run_ties(base, experts, params, *, elect, merge, welect, zero_sign=1.0, lam=0.5, seed=9, key=2**32 - 2, offset=5,
              out_dtype=None, with_out=True, exact=True):
    shape = experts[0].shape
    out = torch.full(shape, 3.0, dtype=out_dtype or experts[0].dtype, device=tri.DEV) if with_out else None
    counts = torch.tensor([4, 6], dtype=torch.int64, device=tri.DEV)
    kernel("triton", "ties_merge")(base, experts, params, out, counts, seed, key, offset, ELECT[elect], MERGE[merge],
                                   welect, zero_sign, lam)
    r_out, r_counts = ties_merge_ref(base, experts, params, seed=seed, key=key, offset=offset, elect=elect, merge=merge,
                                     weighted_elect=welect, zero_sign=zero_sign, lam=lam, out_dtype=out_dtype)
    tri.same(counts, r_counts + torch.tensor([4, 6], device=tri.DEV))
    if with_out:
        if exact:
            tri.same(out, r_out)
        else:
            torch.testing.assert_close(out, r_out, rtol=1e-6, atol=1e-6)


_MODES = [(e, m, w) for e in ELECT for m in MERGE for w in (False, True)]


# every mode with T = 3 (fp32, base); a third of them with T = 1 (fp32, base) and T = 2 (fp16, no base)
@tri.test
@pytest.mark.parametrize(
    "elect,merge,welect,T", [(*mode, 3) for mode in _MODES] + [(*mode, T) for T in (1, 2) for mode in _MODES[T::3]]
)
def test_triton_ties_merge_modes(elect, merge, welect, T):
    dtype = torch.float16 if T == 2 else torch.float32
    base, experts = tri.int_experts((257,), T, dtype, T != 1, seed=4 + T)
    zero_sign = {"sum": -1.0, "mean": 1.0, "wmean": 0.0, "max": -1.0}[merge]
    _run_ties(base, experts, _params(T), elect=elect, merge=merge, welect=welect, zero_sign=zero_sign)


@tri.test
def test_triton_ties_merge_weighted_election_is_not_contracted():
    """e_t = w * x_t must be rounded before it is summed: with w = 0.1 and x = (3, -3) the reference sum is
    exactly 0 (zero_sign decides), while a fused multiply-add would leave a rounding residue."""
    n = 515
    experts = [torch.full((n,), 3.0, device=tri.DEV), torch.full((n,), -3.0, device=tri.DEV)]
    params = torch.tensor([[0.1, 0.0, INF, 0.0, 1.0], [0.1, 0.0, INF, 0.0, 1.0]])
    for merge in MERGE:
        _run_ties(None, experts, params, elect="sum", merge=merge, welect=True, zero_sign=-1.0, lam=1.0)


@tri.test
@pytest.mark.parametrize("dtype", tri.DTYPES)
@pytest.mark.parametrize("shape", tri.SHAPES)
@pytest.mark.parametrize("T", [1, 2, 3])
def test_triton_ties_merge_shapes(shape, dtype, T):
    with_base = T != 2
    base, experts = tri.int_experts(shape, T, dtype, with_base, seed=5 + T)
    modes = [("sum", "mean", False), ("count", "wmean", True), ("sum", "max", True), ("none", "sum", False)]
    elect, merge, welect = modes[(T + len(shape)) % len(modes)]
    _run_ties(base, experts, _params(T), elect=elect, merge=merge, welect=welect, key=-1, offset=T,
              out_dtype=torch.float32 if T == 3 else None)


@tri.test
@pytest.mark.parametrize("elect", ["sum", "count"])
def test_triton_ties_merge_counts_only(elect):
    base, experts = tri.int_experts((31, 37), 3, torch.float16, False, seed=8)
    _run_ties(base, experts, _params(3, drop=False), elect=elect, merge="mean", welect=True, with_out=False)


@tri.test
def test_triton_ties_merge_none_without_out_is_noop():
    base, experts = tri.int_experts((7,), 2, torch.float32, True)
    counts = torch.tensor([1, 2], device=tri.DEV)
    kernel("triton", "ties_merge")(base, experts, _params(2), None, counts, 0, 0, 0, 0, 1, False, 1.0, 1.0)
    tri.same(counts, torch.tensor([1, 2], device=tri.DEV))


@tri.test
def test_triton_ties_merge_random_float_unaligned():
    """Random fp32 data, experts at unaligned addresses: exact counts, values within rounding."""
    g = tri.gen(6)
    n = 1031
    storage = torch.randn(4, n + 1, generator=g).to(tri.DEV)
    experts = [storage[t, 1:] for t in range(3)]  # contiguous views, 4-byte offset
    base = storage[3, 1:]
    params = torch.tensor([[0.7, 0.1, 3.0, 0.2, 1.3], [-0.4, 0.0, INF, 0.0, 1.0], [1.1, 0.05, 2.0, 0.6, 2.5]])
    for elect, merge in [("sum", "wmean"), ("count", "max"), ("none", "mean"), ("sum", "sum")]:
        _run_ties(base, experts, params, elect=elect, merge=merge, welect=True, lam=0.8, seed=-3, key=2**64 - 2,
                  offset=2**31 + 2, exact=False)


@tri.test
@pytest.mark.parametrize("merge", list(MERGE))
@pytest.mark.parametrize("elect", list(ELECT))
def test_triton_ties_merge_special_values(elect, merge):
    sv = tri.special_values(torch.float32)
    g = tri.gen(7)
    experts = [sv[torch.randperm(sv.numel(), generator=g).to(tri.DEV)].repeat(5) for _ in range(3)]
    params = torch.tensor([[1.0, 0.0, INF, 0.0, 1.0], [-2.0, 0.0, INF, 0.3, 1.0], [0.5, 0.5, INF, 0.0, 2.0]])
    _run_ties(None, experts, params, elect=elect, merge=merge, welect=elect == "count", lam=1.0)


@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weighted_sum_is_one_fp32_pass_rounded_once(dtype, mean):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(37, 53, generator=g).to(dtype) for _ in range(3)]
    w = [0.3, -1.25, 0.7]
    acc = sum(wi * x.float() for wi, x in zip(w, xs, strict=True))
    want = acc / sum(w) if mean else acc
    assert torch.equal(ops.weighted_sum(xs, w, mean=mean), want.to(dtype))
    assert torch.equal(ops.weighted_sum(xs, w, mean=mean, out_dtype=torch.float32), want)
    out = torch.empty(53, 37, dtype=dtype).mT  # a strided output buffer is filled in place
    assert ops.weighted_sum(xs, w, mean=mean, out=out) is out
    assert torch.equal(out, want.to(dtype))
    assert torch.equal(ops.weighted_sum(xs[:1]), xs[0])  # weights default to 1
