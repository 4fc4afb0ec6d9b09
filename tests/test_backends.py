"""Every native backend against the oracles (fastmerge.ops.<op>.<op>_ref), called directly and through the dispatcher.

Inputs are small integers times 1/4 so that every sum is exact in any order and in fp16/bf16: merged
values, masks, signs, counts, histograms and thresholds must then be *equal*, not close.
"""

import itertools
import math
import os

import pytest
import torch
from _backends import NATIVE, backend_device, dtypes_for

from fastmerge.backends import get_backend
from fastmerge.ops import name_key, ties_params, to_i64
from fastmerge.ops.abs_histogram import abs_histogram_ref
from fastmerge.ops.consensus_merge import consensus_merge_ref
from fastmerge.ops.della_prune import della_prune_ref
from fastmerge.ops.emr_elect import emr_elect_ref
from fastmerge.ops.keys import abs_keys
from fastmerge.ops.philox import philox_uniform
from fastmerge.ops.prune import prune_ref
from fastmerge.ops.row_kth_largest_abs import row_kth_largest_abs_ref
from fastmerge.ops.tall_masks import tall_masks_ref
from fastmerge.ops.ties_merge import ELECT, MERGE, ties_merge_ref

SHAPES = [(0,), (1,), (7,), (1009,), (31, 37), (3, 5, 129)]
ELECTS = ["none", "sum", "count"]
MERGES = ["sum", "mean", "wmean", "max"]


def _dev(name):
    d = backend_device(name)
    if d is None:
        pytest.skip(f"backend {name} cannot run here")
    return d


def _fn(name, op):
    return get_backend(name).fn(op)


def qint(shape, dtype, device, lo=-4, hi=5, zero_frac=0.2):
    """Small integers / 4 (exact in fp16/bf16), with a share of exact zeros."""
    x = torch.randint(lo, hi, shape).float() / 4
    x[torch.rand(shape) < zero_frac] = 0
    return x.to(dtype=dtype, device=device)


def experts_for(shape, dtype, device, T, with_base=True):
    base = qint(shape, dtype, device) if with_base else None
    ex = [qint(shape, dtype, device) for _ in range(T)]
    if with_base and len(shape) and shape[-1] > 2:
        # all-zero columns and exact zero election sums
        for e in ex:
            e.view(-1, shape[-1])[:, 0] = base.view(-1, shape[-1])[:, 0]
        if T >= 2:
            d0 = ex[0].float() - base.float()
            ex[1].view(-1, shape[-1])[:, 1] = (base.float() - d0).to(dtype).view(-1, shape[-1])[:, 1]
    return base, ex


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_abs_histogram(backend, shape):
    dev = _dev(backend)
    for dtype in dtypes_for(backend, dev):
        x = torch.randn(shape).to(dtype=dtype, device=dev)
        if x.numel():
            x.view(-1)[0] = 0.0
            x.view(-1)[-1] = -0.0
        for level in (0, 1):
            prefix = int(abs_keys(x).reshape(-1)[0] >> 16) if x.numel() and level else 0
            hist = torch.full((65536,), 3, dtype=torch.int64, device=dev)  # accumulates
            _fn(backend, "abs_histogram")(x, hist, level, prefix)
            want = abs_histogram_ref(x, level, prefix) + 3
            assert torch.equal(hist.cpu(), want.cpu()), (dtype, level)


@pytest.mark.parametrize("backend", [p for p in NATIVE if "triton" not in p.id])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 1009), (17, 256), (0, 4)], ids=str)
def test_row_kth_largest_abs(backend, shape):
    dev = _dev(backend)
    for dtype in dtypes_for(backend, dev):
        x = (torch.randint(-6, 7, shape).float() / 4).to(dtype=dtype, device=dev)  # many ties
        for k in sorted({0, 1, shape[1] // 2, shape[1]}):
            out = torch.empty(shape[0], dtype=torch.float32, device=dev)
            _fn(backend, "row_kth_largest_abs")(x, k, out)
            assert torch.equal(out.cpu(), row_kth_largest_abs_ref(x, k).cpu()), (dtype, k)
        y = torch.randn(shape).to(dtype=dtype, device=dev)
        k = max(1, shape[1] // 3) if shape[1] else 0
        out = torch.empty(shape[0], dtype=torch.float32, device=dev)
        _fn(backend, "row_kth_largest_abs")(y, k, out)
        assert torch.equal(out.cpu(), row_kth_largest_abs_ref(y, k).cpu())


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_prune(backend, shape, p):
    dev = _dev(backend)
    seed, key, offset = -12345, name_key("layers.0.mlp.down_proj.weight"), 1 << 33
    for dtype in dtypes_for(backend, dev):
        x = qint(shape, dtype, dev)
        rows = x.shape[0] if x.dim() == 2 else 1
        lo = torch.full((rows,), 0.25)
        hi = torch.full((rows,), 0.75 if p else math.inf)
        if rows > 1:
            lo[1::2] = 0.5
            hi[::3] = math.inf
        for out_dtype in (dtype, torch.float32):
            out = torch.empty(shape, dtype=out_dtype, device=dev)
            stats = torch.ones(2, dtype=torch.float64, device=dev)
            _fn(backend, "prune")(x, lo.to(dev), hi.to(dev), out, stats, p, seed, key, offset, 2.0)
            want, wst = prune_ref(x, lo.to(dev), hi.to(dev), p, seed, key, offset, 2.0, out_dtype)
            assert torch.equal(out.cpu(), want.cpu()), (dtype, out_dtype)
            torch.testing.assert_close(stats.cpu(), wst.cpu() + 1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", NATIVE)
def test_dare_masks_bit_identical(backend):
    """The same (seed, key) draws the same mask as the oracle, also across chunk offsets."""
    dev = _dev(backend)
    n = 4099
    x = torch.ones(n, device=dev)
    lo, hi = torch.zeros(1, device=dev), torch.full((1,), math.inf, device=dev)
    for seed, key in [(0, 0), (1, -1), (2**40 + 3, name_key("embed_tokens.weight"))]:
        full = torch.empty(n, device=dev)
        _fn(backend, "prune")(x, lo, hi, full, torch.zeros(2, dtype=torch.float64, device=dev), 0.5, seed, key, 0, 1.0)
        want = (philox_uniform(n, seed, key, 0) >= 0.5).float()
        assert torch.equal(full.cpu(), want)
        part = torch.empty(n - 1000, device=dev)
        _fn(backend, "prune")(x[1000:], lo, hi, part, torch.zeros(2, dtype=torch.float64, device=dev), 0.5, seed,
                              key, 1000, 1.0)
        assert torch.equal(part.cpu(), want[1000:])


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_ties_merge(backend, shape, T):
    """Every (dtype, base, elect, merge, weighting) combination against the oracle. Under Triton's interpreter
    (~0.3 s a launch) each case runs a third of them, rotating with the case, so every combination still runs
    at every T on two of the shapes."""
    dev = _dev(backend)
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
            _fn(backend, "ties_merge")(base, ex, params, out, counts, **{**kw})
            want, wc = ties_merge_ref(base, ex, params, **{**kw, "elect": elect, "merge": merge},
                                      out_dtype=torch.float32)
            tag = (dtype, with_base, elect, merge, weighted)
            if merge in ("mean", "wmean"):  # one rounded division: equal up to fp32 rounding
                torch.testing.assert_close(out.cpu(), want.cpu(), rtol=2e-7, atol=0, msg=str(tag))
            else:
                assert torch.equal(out.cpu(), want.cpu()), tag
            assert torch.equal(counts.cpu(), wc.cpu() + 1), tag


@pytest.mark.parametrize("backend", NATIVE)
def test_ties_merge_counts_only_and_out_dtype(backend):
    dev = _dev(backend)
    base, ex = experts_for((13, 11), torch.float16, dev, 3)
    params = ties_params(3)
    counts = torch.zeros(2, dtype=torch.int64, device=dev)
    _fn(backend, "ties_merge")(base, ex, params, None, counts, 0, 0, 0, 1, 1, False, 1.0, 1.0)
    assert torch.equal(counts.cpu(), ties_merge_ref(base, ex, params)[1].cpu())
    for od in dtypes_for(backend, dev):
        out = torch.empty((13, 11), dtype=od, device=dev)
        _fn(backend, "ties_merge")(base, ex, params, out, counts, 0, 0, 0, 1, 0, False, 1.0, 1.0)
        assert torch.equal(out.cpu(), ties_merge_ref(base, ex, params, merge="sum", out_dtype=od)[0].cpu())


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("shape", [(1,), (7,), (31, 37)], ids=str)
@pytest.mark.parametrize("T", [1, 2, 4])
def test_tall_and_consensus(backend, shape, T):
    dev = _dev(backend)
    for dtype in dtypes_for(backend, dev):
        base, ex = experts_for(shape, dtype, dev, T)
        lambdas = torch.tensor([0.5, 1.0, 0.25, 2.0][:T])
        for mtl in (None, qint(shape, dtype, dev)):
            masks = torch.empty((T, *shape), dtype=torch.bool, device=dev)
            _fn(backend, "tall_masks")(base, ex, lambdas, mtl, masks)
            assert torch.equal(masks.cpu(), tall_masks_ref(base, ex, lambdas, mtl).cpu())
            for k in (1, 2):
                out = torch.empty(shape, dtype=dtype, device=dev)
                _fn(backend, "consensus_merge")(base, ex, lambdas, mtl, k, 0.5, out)
                want = consensus_merge_ref(base, ex, lambdas, mtl, min_count=k, lam=0.5)
                assert torch.equal(out.cpu(), want.cpu())


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("shape", [(1,), (7,), (31, 37)], ids=str)
@pytest.mark.parametrize("T", [1, 2, 3])
def test_emr_elect(backend, shape, T):
    dev = _dev(backend)
    for dtype in dtypes_for(backend, dev):
        for with_base in (True, False):
            base, ex = experts_for(shape, dtype, dev, T, with_base)
            uni = torch.empty(shape, dtype=torch.float32, device=dev)
            masks = torch.empty((T, *shape), dtype=torch.bool, device=dev)
            stats = torch.zeros(T, 2, dtype=torch.float64, device=dev)
            _fn(backend, "emr_elect")(base, ex, uni, masks, stats)
            wu, wm, ws = emr_elect_ref(base, ex)
            assert torch.equal(uni.cpu(), wu.cpu())
            assert torch.equal(masks.cpu(), wm.cpu())
            torch.testing.assert_close(stats.cpu(), ws.cpu(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("shape", [(1,), (2,), (9,), (4, 33), (2, 3, 17)], ids=str)
def test_della_prune_cpp(shape):
    dev = _dev("cpp")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = qint(shape, dtype, dev)
        for density, eps, rescale in [(0.5, 0.1, True), (0.3, 0.3, False), (0.9, 0.05, True)]:
            out = torch.empty(shape, dtype=dtype, device=dev)
            _fn("cpp", "della_prune")(x, out, density, eps, 11, 22, rescale)
            want = della_prune_ref(x, density, eps, 11, 22, rescale)
            assert torch.equal(out, want), (dtype, density, eps)


# ---- through the dispatcher, forced, with non-contiguous inputs -----------------------------------------


@pytest.mark.parametrize("backend", NATIVE)
def test_forced_backend_non_contiguous(backend, monkeypatch):
    from fastmerge import ops

    dev = _dev(backend)
    monkeypatch.setenv("FASTMERGE_BACKEND", backend)
    dtype = torch.float16
    big = [qint((40, 66), dtype, dev) for _ in range(4)]
    base, ex = big[0].t()[3:40:2], [b.t()[3:40:2] for b in big[1:]]  # (19, 40), strided
    assert not base.is_contiguous()
    params = ties_params(3, weights=[1.0, 0.5, 2.0], lo=0.25)
    got, counts = ops.ties_merge(base, ex, params, merge="wmean", weighted_elect=True, lam=0.5)
    want, wc = ties_merge_ref(base, ex, params, merge="wmean", weighted_elect=True, lam=0.5)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)
    assert torch.equal(counts.cpu(), wc.cpu())
    x = ex[0]
    got, st = ops.prune(x, 0.25, 1.0, p=0.5, seed=3, key=4)
    assert torch.equal(got.cpu(), prune_ref(x, torch.tensor([0.25]), torch.tensor([1.0]), 0.5, 3, 4)[0].cpu())
    h = ops.abs_histogram(x)
    assert torch.equal(h.cpu(), abs_histogram_ref(x, 0).cpu())
    out = torch.empty(base.t().shape, dtype=dtype, device=dev).t()  # non-contiguous output
    torch.ops.fastmerge.consensus_merge(base, ex, torch.ones(3), None, 2, 1.0, out)
    assert torch.equal(out.cpu(), consensus_merge_ref(base, ex, torch.ones(3)).cpu())
