"""The CPU C++ kernels (fastmerge._C.*_cpu) against the oracles (fastmerge.ops.<op>.<op>_ref).

Masks, signs, counts, histograms, thresholds and random draws must be bit-identical; since the kernels do
the reference's fp32 arithmetic in the same order, merged values are compared bit for bit too (NaN == NaN),
and only the fp64 whole-tensor stats are compared with a tolerance.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fastmerge.ops.abs_histogram import abs_histogram_ref
from fastmerge.ops.consensus_merge import consensus_merge_ref
from fastmerge.ops.della_prune import della_prune_ref
from fastmerge.ops.emr_elect import emr_elect_ref
from fastmerge.ops.keys import HIST_BINS, abs_keys
from fastmerge.ops.philox import philox_uniform
from fastmerge.ops.prune import prune_ref
from fastmerge.ops.row_kth_largest_abs import row_kth_largest_abs_ref
from fastmerge.ops.tall_masks import tall_masks_ref
from fastmerge.ops.ties_merge import ELECT, MERGE, ties_merge_ref

C = pytest.importorskip("fastmerge._C")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _set_isa(monkeypatch, value):
    if value == "auto":
        monkeypatch.delenv("FASTMERGE_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("FASTMERGE_CPU_ISA", value)
    return value


@pytest.fixture(params=["auto", "base"])
def isa(request, monkeypatch):
    """Runs a test with the best instruction-set variant of the kernels, then with the baseline one.

    FASTMERGE_CPU_ISA is read by the C++ side at every call; "base" forces the SSE2 build on x86-64 and
    "avx2" caps the choice at AVX2 (both no-ops where only one variant exists).
    """
    return _set_isa(monkeypatch, request.param)


@pytest.fixture(params=["auto", "avx2", "base"])
def isa3(request, monkeypatch):
    """As `isa`, plus the AVX2 variant where the best one is AVX-512 (the Philox generator has three)."""
    return _set_isa(monkeypatch, request.param)


SHAPES = [(0,), (1,), (7,), (1009,), (37, 129)]
INF = float("inf")


_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-for-bit equality (signed zeros included), any NaN payload matching any NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    na, nb = a.isnan(), b.isnan()
    assert torch.equal(na, nb), "NaN positions differ"
    ia, ib = a.masked_fill(na, 0).view(_BITS[a.dtype]), b.masked_fill(nb, 0).view(_BITS[b.dtype])
    if not torch.equal(ia, ib):
        bad = (ia != ib).nonzero()[:5].tolist()
        raise AssertionError(
            f"{int((ia != ib).sum())} elements differ, e.g. at {bad}: {a[ia != ib][:5]} vs {b[ia != ib][:5]}"
        )


def close_stats(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def make(shape, dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "int":  # small integers: exact sums, many zeros and exact-zero elections
        return torch.randint(-3, 4, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def experts_for(shape, dtype, kind, T, with_base, seed):
    g = torch.Generator().manual_seed(seed)
    base = make(shape, dtype, kind, g) if with_base else None
    ex = [make(shape, dtype, kind, g) for _ in range(T)]
    if kind == "int" and len(shape) == 2 and shape[0] > 1:  # all-zero columns / rows of deltas
        for e in ex:
            e[:, 0] = base[:, 0] if base is not None else 0
            e[0] = base[0] if base is not None else 0
    return base, ex


def ties_params(T, kind, p, gen, negative=True):
    w = torch.rand(T, generator=gen) * 1.5 + 0.25
    if negative and T > 1:
        w[1] = -w[1]
    if kind == "int":
        w = torch.tensor([[1.0, -2.0, 0.5, 3.0, 1.0][t] if negative else 1.0 for t in range(T)])
        lo = torch.tensor([[0.0, 1.0, 0.0, 2.0, 1.0][t] for t in range(T)])
        hi = torch.tensor([[INF, 3.0, INF, INF, 2.0][t] for t in range(T)])
        s = torch.tensor([[1.0, 2.0, 0.5, 1.0, 4.0][t] for t in range(T)])
    else:
        lo = torch.rand(T, generator=gen) * 0.5
        hi = torch.where(torch.arange(T) % 2 == 0, torch.full((T,), INF), 1.0 + torch.rand(T, generator=gen))
        s = 1.0 + torch.rand(T, generator=gen)
    pp = torch.tensor([p if t % 3 != 1 else 0.0 for t in range(T)])
    return torch.stack([w, lo, hi, pp, s], dim=1).float().contiguous()


def s64(v: int) -> int:
    """The int64 that the bindings take for a seed / key modulo 2^64."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def run_ties(
    base,
    ex,
    params,
    out_dtype,
    *,
    seed=0,
    key=0,
    offset=0,
    elect="sum",
    merge="mean",
    weighted_elect=False,
    zero_sign=1.0,
    lam=1.0,
    counts=None,
):
    out = None if out_dtype is None else torch.empty(ex[0].shape, dtype=out_dtype)
    counts = torch.zeros(2, dtype=torch.int64) if counts is None else counts
    C.ties_merge_cpu(
        base,
        ex,
        params,
        out,
        counts,
        s64(seed),
        s64(key),
        offset,
        ELECT[elect],
        MERGE[merge],
        weighted_elect,
        zero_sign,
        lam,
    )
    return out, counts


# ---------------------------------------------------------------------------------------------------------
# ties_merge


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["int", "float"])
def test_ties_merge_modes(dtype, T, kind, isa):
    g = torch.Generator().manual_seed(T)
    for shape, with_base in itertools.product([(1,), (7,), (37, 129)], [True, False]):
        base, ex = experts_for(shape, dtype, kind, T, with_base, seed=11 * T + len(shape))
        for p in (0.0, 0.3):
            params = ties_params(T, kind, p, g)
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
                out, counts = run_ties(base, ex, params, dtype, **kw)
                same(out, ref)
                assert torch.equal(counts, ref_counts), (elect, merge, weighted, counts, ref_counts)


@pytest.mark.parametrize("shape", SHAPES)
def test_ties_merge_shapes_out_dtypes_counts_only(shape):
    g = torch.Generator().manual_seed(1)
    base, ex = experts_for(shape, torch.bfloat16, "float", 3, True, seed=2)
    params = ties_params(3, "float", 0.2, g)
    for out_dtype in DTYPES:
        ref, ref_counts = ties_merge_ref(base, ex, params, seed=1, elect="sum", merge="wmean", out_dtype=out_dtype)
        out, counts = run_ties(base, ex, params, out_dtype, seed=1, elect="sum", merge="wmean")
        same(out, ref)
        assert torch.equal(counts, ref_counts)
    # out=None: counts only, and counts accumulate
    acc = torch.tensor([5, 7], dtype=torch.int64)
    out, counts = run_ties(base, ex, params, None, seed=1, elect="count", counts=acc)
    _, ref_counts = ties_merge_ref(base, ex, params, seed=1, elect="count")
    assert out is None
    assert torch.equal(counts, ref_counts + torch.tensor([5, 7]))
    # elect "none" without out: nothing to do, counts untouched
    _, counts = run_ties(base, ex, params, None, elect="none", counts=acc.clone())
    assert torch.equal(counts, acc)


def test_ties_merge_zero_sign_and_exact_ties(isa):
    # integer deltas with many exact-zero election sums; zero_sign 0 / -1 / +1
    base, ex = experts_for((37, 129), torch.float32, "int", 2, True, seed=5)
    params = ties_params(2, "int", 0.0, torch.Generator().manual_seed(0), negative=False)
    for zs, elect, merge in itertools.product([0.0, -1.0, 1.0], ["sum", "count"], list(MERGE)):
        ref, rc = ties_merge_ref(base, ex, params, elect=elect, merge=merge, zero_sign=zs)
        out, c = run_ties(base, ex, params, torch.float32, elect=elect, merge=merge, zero_sign=zs)
        same(out, ref)
        assert torch.equal(c, rc)
    _, rc = ties_merge_ref(base, ex, params, elect="sum")
    assert int(rc.sum()) < base.numel()  # there really were zero sums


def test_ties_merge_special_values(isa):
    vals = torch.tensor([0.0, -0.0, 1.0, -1.0, INF, -INF, float("nan"), 1e-40, -1e-40, 3e38, -3e38, 1e-8])
    ex = [vals[torch.randperm(len(vals), generator=torch.Generator().manual_seed(t))].repeat(3) for t in range(3)]
    base = vals.repeat(3).flip(0).contiguous()
    params = torch.tensor([[1.0, 0.0, INF, 0.0, 1.0], [-1.0, 0.0, INF, 0.0, 2.0], [1e-8, 0.0, INF, 0.0, 1.0]])
    for b, elect, merge, weighted in itertools.product([None, base], ELECT, MERGE, [False, True]):
        kw = dict(elect=elect, merge=merge, weighted_elect=weighted)
        ref, rc = ties_merge_ref(b, ex, params, **kw)
        out, c = run_ties(b, ex, params, torch.float32, **kw)
        same(out, ref)
        assert torch.equal(c, rc)


def test_ties_merge_dare_offsets_chunks_threads(isa3):
    g = torch.Generator().manual_seed(3)
    n = 150_001  # large enough for several threads and blocks
    base = torch.randn(n, generator=g)
    ex = [torch.randn(n, generator=g) for _ in range(2)]
    params = torch.tensor([[1.0, 0.0, INF, 0.5, 2.0], [0.5, 0.0, INF, 0.9, 10.0]])
    kw = dict(seed=123, key=2**63 + 5, offset=10, elect="sum", merge="sum")
    ref, rc = ties_merge_ref(base, ex, params, **kw)
    whole, c = run_ties(base, ex, params, torch.float32, **kw)
    same(whole, ref)
    assert torch.equal(c, rc)
    # chunks with offsets give the whole tensor's draws
    cut = 70_003
    kw1 = dict(kw, offset=10 + cut)
    a, _ = run_ties(base[:cut], [e[:cut] for e in ex], params, torch.float32, **kw)
    b, _ = run_ties(base[cut:].contiguous(), [e[cut:].contiguous() for e in ex], params, torch.float32, **kw1)
    same(torch.cat([a, b]), whole)
    # thread count does not change anything
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, c1 = run_ties(base, ex, params, torch.float32, **kw)
    finally:
        torch.set_num_threads(old)
    same(one, whole)
    assert torch.equal(c1, c)


# ---------------------------------------------------------------------------------------------------------
# prune / della_prune


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_prune(dtype, shape, isa):
    g = torch.Generator().manual_seed(len(shape))
    x = make(shape, dtype, "float", g)
    rows_opts = [1] + ([shape[0]] if len(shape) == 2 else [])
    for rows, p, out_dtype in itertools.product(rows_opts, [0.0, 0.4], DTYPES):
        lo = (torch.rand(rows, generator=g) * 0.5).float()
        hi = torch.where(torch.rand(rows, generator=g) < 0.5, INF, 1.5).float()
        kw = dict(p=p, seed=9, key=4, offset=3, scale=1.7, out_dtype=out_dtype)
        ref, ref_stats = prune_ref(x, lo, hi, **kw)
        out = torch.empty(shape, dtype=out_dtype)
        stats = torch.tensor([1.0, 2.0], dtype=torch.float64)
        C.prune_cpu(x, lo, hi, out, stats, p, 9, 4, 3, 1.7)
        same(out, ref)
        close_stats(stats, ref_stats + torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_prune_dare_mask_bit_identical(isa3):
    n = 200_003
    x = torch.ones(n)
    lo, hi = torch.zeros(1), torch.full((1,), INF)
    for p, seed, key, offset in [(0.1, 0, 0, 0), (0.5, 2**40 + 3, -1, 77), (0.9, -5, 12, 2**33 + 1)]:
        ref, _ = prune_ref(x, lo, hi, p=p, seed=seed, key=key, offset=offset)
        out, stats = torch.empty(n), torch.zeros(2, dtype=torch.float64)
        C.prune_cpu(x, lo, hi, out, stats, p, s64(seed), s64(key), offset, 1.0)
        assert torch.equal(out, ref)
        # and against the draws themselves
        u = philox_uniform(n, seed, key, offset)
        assert torch.equal(out, (u >= p).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (1009,), (37, 129), (3, 4, 5), (4, 1)])
def test_della_prune(dtype, shape, isa):
    g = torch.Generator().manual_seed(2)
    for kind, (density, eps), rescale, out_dtype in itertools.product(
        ["int", "float"], [(0.5, 0.2), (0.3, 0.0), (0.9, 0.1), (0.2, 0.2)], [True, False], [dtype, torch.float32]
    ):
        x = make(shape, dtype, kind, g)
        ref = della_prune_ref(x, density, eps, seed=5, key=6, rescale=rescale, out_dtype=out_dtype)
        out = torch.empty(shape, dtype=out_dtype)
        C.della_prune_cpu(x, out, density, eps, 5, 6, rescale)
        same(out, ref)


def test_della_prune_many_rows_and_threads(isa):
    g = torch.Generator().manual_seed(9)
    x = torch.randint(-40, 41, (64, 2500), generator=g).to(torch.bfloat16) * 0.01  # ties, several blocks a row
    ref = della_prune_ref(x, 0.4, 0.15, seed=-3, key=2**40)
    out = torch.empty_like(x)
    C.della_prune_cpu(x, out, 0.4, 0.15, -3, 2**40, True)
    same(out, ref)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.empty_like(x)
        C.della_prune_cpu(x, one, 0.4, 0.15, -3, 2**40, True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, out)


def test_della_prune_empty():
    x = torch.empty(3, 0)
    out = torch.empty(3, 0)
    C.della_prune_cpu(x, out, 0.5, 0.1, 0, 0, True)


# ---------------------------------------------------------------------------------------------------------
# thresholds


@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_histogram(dtype):
    g = torch.Generator().manual_seed(4)
    specials = torch.tensor([0.0, -0.0, INF, -INF, float("nan"), 1e-40, -2.5e-39, 65504.0, -1e-7])
    xs = [
        torch.empty(0, dtype=dtype),
        specials.to(dtype),
        make((37, 129), dtype, "int", g),
        (torch.randn(1009, generator=g) * 0.02).to(dtype),
        (torch.randn(2_500_003, generator=g) * 0.02).to(dtype),  # interleaved and per-thread histograms
    ]
    old = torch.get_num_threads()
    for x in xs:
        ref0 = abs_histogram_ref(x, 0)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                h0 = torch.arange(HIST_BINS, dtype=torch.int64)
                C.abs_histogram_cpu(x, h0, 0, 0)
            finally:
                torch.set_num_threads(old)
            assert torch.equal(h0 - torch.arange(HIST_BINS), ref0), threads
        if x.numel():
            prefixes = [int(ref0.argmax()), int(abs_keys(x).reshape(-1)[0] >> 16), 0x7FFF, 70000, -1]
        else:
            prefixes = [0]
        for prefix in prefixes:
            h1 = torch.zeros(HIST_BINS, dtype=torch.int64)
            C.abs_histogram_cpu(x, h1, 1, prefix)
            ref1 = abs_histogram_ref(x, 1, prefix) if 0 <= prefix < HIST_BINS else torch.zeros_like(h1)
            assert torch.equal(h1, ref1), prefix


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_kth_largest_abs(dtype):
    g = torch.Generator().manual_seed(6)
    cases = [
        make((37, 129), dtype, "int", g),  # many ties
        make((37, 129), dtype, "float", g),
        make((1, 1), dtype, "float", g),
        make((3, 1009), dtype, "float", g),
        torch.zeros(5, 17, dtype=dtype),
        torch.tensor([[0.0, -0.0, INF, -INF, 1e-40, -3.0, 2.0]]).to(dtype),
        torch.empty(0, 9, dtype=dtype),
        torch.empty(4, 0, dtype=dtype),
    ]
    for x in cases:
        cols = x.shape[1]
        for k in sorted({0, 1, cols // 3, cols // 2, cols - 1, cols} & set(range(cols + 1))):
            out = torch.empty(x.shape[0], dtype=torch.float32)
            C.row_kth_largest_abs_cpu(x, k, out)
            same(out, row_kth_largest_abs_ref(x, k))


def test_row_kth_largest_abs_many_rows():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(96, 1031, generator=g).bfloat16()  # enough rows for several threads
    for k in (1, 500, 1031):
        out = torch.empty(96)
        C.row_kth_largest_abs_cpu(x, k, out)
        same(out, row_kth_largest_abs_ref(x, k))


def test_row_kth_largest_abs_bad_k():
    with pytest.raises(RuntimeError, match="k"):
        C.row_kth_largest_abs_cpu(torch.ones(2, 3), 4, torch.empty(2))


# ---------------------------------------------------------------------------------------------------------
# TALL masks, consensus merging, EMR election


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_tall_and_consensus(dtype, T, isa):
    g = torch.Generator().manual_seed(T)
    for shape, kind, with_base, with_mtl in itertools.product(
        [(0,), (7,), (37, 129)], ["int", "float"], [True, False], [False, True]
    ):
        base, ex = experts_for(shape, dtype, kind, T, with_base, seed=T)
        lambdas = (torch.rand(T, generator=g) * 0.8 + 0.2).float()
        mtl = make(shape, torch.float16 if dtype != torch.float16 else torch.bfloat16, kind, g) if with_mtl else None
        ref_masks = tall_masks_ref(base, ex, lambdas, mtl)
        masks = torch.empty((T, *shape), dtype=torch.bool)
        C.tall_masks_cpu(base, ex, lambdas, mtl, masks)
        assert torch.equal(masks, ref_masks)
        for min_count, out_dtype in itertools.product([0, 1, 2, T + 1], [dtype, torch.float32]):
            ref = consensus_merge_ref(base, ex, lambdas, mtl, min_count=min_count, lam=0.6, out_dtype=out_dtype)
            out = torch.empty(shape, dtype=out_dtype)
            C.consensus_merge_cpu(base, ex, lambdas, mtl, min_count, 0.6, out)
            same(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_emr_elect(dtype, T, isa):
    for shape, kind, with_base, out_dtype in itertools.product(
        [(0,), (1,), (7,), (37, 129)], ["int", "float"], [True, False], [torch.float32, torch.bfloat16]
    ):
        base, ex = experts_for(shape, dtype, kind, T, with_base, seed=3 * T)
        ref_uni, ref_masks, ref_stats = emr_elect_ref(base, ex, out_dtype)
        uni = torch.empty(shape, dtype=out_dtype)
        masks = torch.empty((T, *shape), dtype=torch.bool)
        stats = torch.ones(T, 2, dtype=torch.float64)
        C.emr_elect_cpu(base, ex, uni, masks, stats)
        same(uni, ref_uni)
        assert torch.equal(masks, ref_masks)
        close_stats(stats, ref_stats + 1)


def test_emr_elect_threads(isa):
    g = torch.Generator().manual_seed(0)
    ex = [torch.randn(100_003, generator=g).bfloat16() for _ in range(3)]
    ref_uni, ref_masks, ref_stats = emr_elect_ref(None, ex)
    uni, masks, stats = torch.empty(100_003), torch.empty(3, 100_003, dtype=torch.bool), torch.zeros(3, 2).double()
    C.emr_elect_cpu(None, ex, uni, masks, stats)
    same(uni, ref_uni)
    assert torch.equal(masks, ref_masks)
    close_stats(stats, ref_stats)


def test_bad_arguments_are_named():
    x = torch.ones(4)
    with pytest.raises(RuntimeError, match="hist"):
        C.abs_histogram_cpu(x, torch.zeros(10, dtype=torch.int64), 0, 0)
    with pytest.raises(RuntimeError, match="params"):
        C.ties_merge_cpu(
            None, [x], torch.zeros(4), None, torch.zeros(2, dtype=torch.int64), 0, 0, 0, 1, 0, False, 1.0, 1.0
        )
    with pytest.raises(RuntimeError, match="stats"):
        C.prune_cpu(x, torch.zeros(1), torch.ones(1), torch.empty(4), torch.zeros(2), 0.0, 0, 0, 0, 1.0)
