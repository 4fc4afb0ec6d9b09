"""Triton kernels (fastmerge._kernels) against the plain-PyTorch oracles (fastmerge.ops.<op>.<op>_ref).

Runs on a CUDA device, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1, fp32/fp16 only).
Integer-valued inputs make every sum exact, so merged values are compared for exact equality; masks, signs,
counts, histograms and random draws are always compared exactly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.triton,
    # the interpreter runs the kernels with numpy, which warns on inf * 0 (the reference makes NaN there too)
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

_ON_GPU = torch.cuda.is_available()
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (_ON_GPU or _INTERPRET):
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import_kernels():
    """fastmerge._kernels, or the kernels/ folder loaded under that name before `pip install -e .`."""
    try:
        importlib.import_module("fastmerge.ops")
    except ImportError:
        sys.path.insert(0, str(_ROOT))
    try:
        return importlib.import_module("fastmerge._kernels")
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "fastmerge._kernels", _ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(_ROOT / "kernels")]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fastmerge._kernels"] = mod
        spec.loader.exec_module(mod)
        return mod


_import_kernels()

from fastmerge._kernels import abs_histogram as k_hist  # noqa: E402
from fastmerge._kernels import consensus_merge as k_consensus  # noqa: E402
from fastmerge._kernels import emr_elect as k_emr  # noqa: E402
from fastmerge._kernels import prune as k_prune  # noqa: E402
from fastmerge._kernels import tall_masks as k_tall  # noqa: E402
from fastmerge._kernels import ties_merge as k_ties  # noqa: E402
from fastmerge._kernels._common import philox_u01, split_offset, u32_halves  # noqa: E402
from fastmerge.ops.abs_histogram import abs_histogram_ref  # noqa: E402
from fastmerge.ops.consensus_merge import consensus_merge_ref  # noqa: E402
from fastmerge.ops.emr_elect import emr_elect_ref  # noqa: E402
from fastmerge.ops.keys import HIST_BINS, abs_keys  # noqa: E402
from fastmerge.ops.philox import philox_uniform  # noqa: E402
from fastmerge.ops.prune import prune_ref  # noqa: E402
from fastmerge.ops.tall_masks import tall_masks_ref  # noqa: E402
from fastmerge.ops.ties_merge import ELECT, MERGE, ties_merge_ref  # noqa: E402

# the interpreter runs on CPU tensors (it would dereference the device addresses of the experts' pointer table)
DEV = "cuda" if _ON_GPU and not _INTERPRET else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
SHAPES = [(0,), (1,), (7,), (257,), (31, 37)]
INF = float("inf")


def _same(a, b):
    """Exact equality (NaN == NaN), same dtype and device."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _int_tensor(shape, lo, hi, g):
    return torch.randint(lo, hi, shape, generator=g).float()


def _int_experts(shape, T, dtype, with_base, seed=0):
    """Integer-valued base and experts on DEV: deltas in [-3, 3] with all-zero positions (every 5th element,
    and column 0 of a 2-D shape) and exact zero sums (positions 1 mod 5: the last delta cancels the others)."""
    g = _gen(seed)
    d = _int_tensor((T, *shape), -3, 4, g)
    flat = d.view(T, -1)
    flat[:, ::5] = 0
    if T >= 2:
        flat[-1, 1::5] = -flat[:-1, 1::5].sum(0)
    if len(shape) == 2:
        d[:, :, 0] = 0
    base = _int_tensor(shape, -4, 5, g) if with_base else None
    experts = [(d[t] + base if with_base else d[t]).to(dtype).to(DEV) for t in range(T)]
    return (base.to(dtype).to(DEV) if with_base else None), experts


# ----------------------------------------------------------------------------------------------------------
# Philox


@triton.jit(do_not_specialize=["off_al", "s_lo", "s_hi", "k_lo", "k_hi"])
def _u01_kernel(out_ptr, n, off_al, s_lo, s_hi, k_lo, k_hi, PHASE: tl.constexpr, BLOCK: tl.constexpr):
    G: tl.constexpr = BLOCK // 4
    start = tl.program_id(0).to(tl.int64) * BLOCK
    col = tl.arange(0, 4)[None, :]
    offs = start + tl.arange(0, G)[:, None] * 4 + col
    g_row = ((start + off_al.to(tl.int64)) >> 2) + tl.arange(0, G)[:, None].to(tl.int64)
    u = philox_u01(
        g_row,
        col,
        s_lo.to(tl.uint32, bitcast=True),
        s_hi.to(tl.uint32, bitcast=True),
        k_lo.to(tl.uint32, bitcast=True),
        k_hi.to(tl.uint32, bitcast=True),
        PHASE,
    )
    tl.store(out_ptr + offs, u, mask=offs < n)


@pytest.mark.parametrize(
    "seed,key,offset",
    [(0, 0, 0), (1, 2, 3), (-1, -1, 1), (2**32 + 5, 2**40 - 3, 2**33 + 2), (-(2**40), 7, 2**31 - 1), (12345, -7, 6)],
)
def test_philox_matches_reference(seed, key, offset):
    n = 1001
    out = torch.empty(n, dtype=torch.float32, device=DEV)
    off_al, phase = split_offset(offset)
    s_lo, s_hi = u32_halves(seed)
    k_lo, k_hi = u32_halves(key)
    _u01_kernel[(triton.cdiv(n, 512),)](out, n, off_al, s_lo, s_hi, k_lo, k_hi, PHASE=phase, BLOCK=512)
    _same(out, philox_uniform(n, seed, key, offset, DEV))


# ----------------------------------------------------------------------------------------------------------
# abs_histogram


def _special_values(dtype):
    vals = [0.0, -0.0, 1.0, -1.0, 0.5, 3.0, -2.5, INF, -INF, float("nan"), 1e-30, -6e-39, 65504.0]
    if dtype == torch.float16:
        vals = [v for v in vals if v != 1e-30 and v != -6e-39] + [6e-8, -3e-5]
    return torch.tensor(vals, dtype=torch.float32).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_abs_histogram(shape, dtype):
    g = _gen(1)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(DEV)
    if x.numel() >= 7:
        x.view(-1)[:3] = torch.tensor([0.0, -0.0, 0.75], dtype=dtype, device=DEV)
    prior = torch.randint(0, 5, (HIST_BINS,), generator=g).to(DEV)
    h0 = prior.clone()
    k_hist.abs_histogram(x, h0, 0, 0)
    _same(h0, prior + abs_histogram_ref(x, 0))
    keys = abs_keys(x).reshape(-1)
    prefixes = [int(keys[-1] >> 16), 12345] if keys.numel() else [0]
    for prefix in prefixes:
        h1 = prior.clone()
        k_hist.abs_histogram(x, h1, 1, prefix)
        _same(h1, prior + abs_histogram_ref(x, 1, prefix))


@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_histogram_special_values(dtype):
    x = _special_values(dtype).repeat(50)
    for level, prefix in [(0, 0), (1, int(abs_keys(torch.tensor([3.0]))[0] >> 16))]:
        h = torch.zeros(HIST_BINS, dtype=torch.int64, device=DEV)
        k_hist.abs_histogram(x, h, level, prefix)
        _same(h, abs_histogram_ref(x, level, prefix))
    with pytest.raises(ValueError):
        k_hist.abs_histogram(x, h, 2, 0)


# ----------------------------------------------------------------------------------------------------------
# prune


def _run_prune(x, lo, hi, p, seed, key, offset, scale, out_dtype=None, stats0=None):
    out = torch.full(x.shape, 7.0, dtype=out_dtype or x.dtype, device=DEV)
    stats = torch.zeros(2, dtype=torch.float64, device=DEV) if stats0 is None else stats0.clone()
    k_prune.prune(x, lo, hi, out, stats, p, seed, key, offset, scale)
    r_out, r_stats = prune_ref(x, lo, hi, p, seed, key, offset, scale, out_dtype)
    _same(out, r_out)
    expect = r_stats if stats0 is None else stats0 + r_stats
    torch.testing.assert_close(stats, expect, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_prune(shape, dtype):
    g = _gen(2)
    x = _int_tensor(shape, -6, 7, g).to(dtype).to(DEV)
    rows = shape[0] if len(shape) == 2 else 1
    # per-tensor magnitude band, no drop
    lo = torch.tensor([1.0], device=DEV)
    hi = torch.tensor([5.0], device=DEV)
    _run_prune(x, lo, hi, 0.0, 0, 0, 0, 1.0, stats0=torch.tensor([1.5, -2.0], dtype=torch.float64, device=DEV))
    # per-row bands + DARE with an unaligned offset, out in another dtype
    lo = torch.arange(rows, dtype=torch.float32, device=DEV) % 3
    hi = 3.0 + torch.arange(rows, dtype=torch.float32, device=DEV) % 4
    _run_prune(x, lo, hi, 0.3, 11, -5, 3, 2.0, out_dtype=torch.float32)
    # keep-everything band, DARE with a huge offset and rescale
    lo = torch.zeros(1, device=DEV)
    hi = torch.full((1,), INF, device=DEV)
    _run_prune(x, lo, hi, 0.5, -(2**63), 2**64 - 1, 2**35 + 1, 2.0)


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**32 + 7])
def test_prune_ones_dare_bit_exact(offset):
    x = torch.ones(1237, device=DEV)
    lo = torch.zeros(1, device=DEV)
    hi = torch.full((1,), INF, device=DEV)
    _run_prune(x, lo, hi, 0.9, 42, offset * 3 + 1, offset, 10.0)
    # u >= p compares in fp32 (torch rounds the Python scalar p to the tensor's dtype): with p a hair above
    # a drawn u, fp32(p) == u and the element is kept
    u = philox_uniform(x.numel(), 3, 4, offset, DEV)
    k = int(torch.nonzero(u >= 0.25)[0])
    p = float(u[k]) + 2**-30
    _run_prune(x, lo, hi, p, 3, 4, offset, 1.0)
    out = torch.empty_like(x)
    k_prune.prune(x, lo, hi, out, torch.zeros(2, dtype=torch.float64, device=DEV), p, 3, 4, offset, 1.0)
    assert out[k] == 1.0


@pytest.mark.parametrize("rows,cols", [(1, 2053), (3, 2053), (70, 37), (2, 4097)])
def test_prune_rows_random(rows, cols):
    """Per-row bands over several programs: rows longer than a tile (two rows per tile at most) and shorter
    (many rows per tile, tiles starting mid-row)."""
    g = _gen(3)
    x = torch.randn(rows, cols, generator=g).to(DEV)
    lo = (torch.rand(rows, generator=g) * 0.5).to(DEV)
    hi = (1.0 + torch.rand(rows, generator=g)).to(DEV)
    _run_prune(x, lo, hi, 0.25, 5, 6, 7, 1.5)
    _run_prune(x.to(torch.float16), lo, hi, 0.0, 0, 0, 0, 0.5)


def test_prune_special_values():
    x = _special_values(torch.float32).repeat(20)
    lo = torch.tensor([0.5], device=DEV)
    hi = torch.tensor([10.0], device=DEV)
    out = torch.empty_like(x)
    stats = torch.zeros(2, dtype=torch.float64, device=DEV)
    k_prune.prune(x, lo, hi, out, stats, 0.2, 1, 2, 0, 3.0)
    r_out, r_stats = prune_ref(x, lo, hi, 0.2, 1, 2, 0, 3.0)
    _same(out, r_out)
    _same(stats.isnan(), r_stats.isnan())


# ----------------------------------------------------------------------------------------------------------
# ties_merge


def _params(T, drop=True):
    """fp32 (T, 5) CPU params with dyadic values (exact products), negative weights and bands."""
    rows = [
        [1.0, 0.0, INF, 0.3 if drop else 0.0, 2.0],
        [-0.5, 1.0, 3.0, 0.0, 1.0],
        [2.0, 0.0, 2.5, 0.5 if drop else 0.0, 0.5],
    ]
    return torch.tensor(rows[:T], dtype=torch.float32)


def _run_ties(
    base,
    experts,
    params,
    *,
    elect,
    merge,
    welect,
    zero_sign=1.0,
    lam=0.5,
    seed=9,
    key=2**32 - 2,
    offset=5,
    out_dtype=None,
    with_out=True,
    exact=True,
):
    shape = experts[0].shape
    out = torch.full(shape, 3.0, dtype=out_dtype or experts[0].dtype, device=DEV) if with_out else None
    counts = torch.tensor([4, 6], dtype=torch.int64, device=DEV)
    k_ties.ties_merge(
        base,
        experts,
        params,
        out,
        counts,
        seed,
        key,
        offset,
        ELECT[elect],
        MERGE[merge],
        welect,
        zero_sign,
        lam,
    )
    r_out, r_counts = ties_merge_ref(
        base,
        experts,
        params,
        seed=seed,
        key=key,
        offset=offset,
        elect=elect,
        merge=merge,
        weighted_elect=welect,
        zero_sign=zero_sign,
        lam=lam,
        out_dtype=out_dtype,
    )
    _same(counts, r_counts + torch.tensor([4, 6], device=DEV))
    if with_out:
        if exact:
            _same(out, r_out)
        else:
            torch.testing.assert_close(out, r_out, rtol=1e-6, atol=1e-6)


_MODES = [(e, m, w) for e in ELECT for m in MERGE for w in (False, True)]


# every mode with T = 3 (fp32, base); a third of them with T = 1 (fp32, base) and T = 2 (fp16, no base)
@pytest.mark.parametrize(
    "elect,merge,welect,T", [(*mode, 3) for mode in _MODES] + [(*mode, T) for T in (1, 2) for mode in _MODES[T::3]]
)
def test_ties_merge_modes(elect, merge, welect, T):
    dtype = torch.float16 if T == 2 else torch.float32
    base, experts = _int_experts((257,), T, dtype, T != 1, seed=4 + T)
    zero_sign = {"sum": -1.0, "mean": 1.0, "wmean": 0.0, "max": -1.0}[merge]
    _run_ties(base, experts, _params(T), elect=elect, merge=merge, welect=welect, zero_sign=zero_sign)


def test_ties_merge_weighted_election_is_not_contracted():
    """e_t = w * x_t must be rounded before it is summed: with w = 0.1 and x = (3, -3) the reference sum is
    exactly 0 (zero_sign decides), while a fused multiply-add would leave a rounding residue."""
    n = 515
    experts = [torch.full((n,), 3.0, device=DEV), torch.full((n,), -3.0, device=DEV)]
    params = torch.tensor([[0.1, 0.0, INF, 0.0, 1.0], [0.1, 0.0, INF, 0.0, 1.0]])
    for merge in MERGE:
        _run_ties(None, experts, params, elect="sum", merge=merge, welect=True, zero_sign=-1.0, lam=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 3])
def test_ties_merge_shapes(shape, dtype, T):
    with_base = T != 2
    base, experts = _int_experts(shape, T, dtype, with_base, seed=5 + T)
    modes = [("sum", "mean", False), ("count", "wmean", True), ("sum", "max", True), ("none", "sum", False)]
    elect, merge, welect = modes[(T + len(shape)) % len(modes)]
    _run_ties(
        base,
        experts,
        _params(T),
        elect=elect,
        merge=merge,
        welect=welect,
        key=-1,
        offset=T,
        out_dtype=torch.float32 if T == 3 else None,
    )


@pytest.mark.parametrize("elect", ["sum", "count"])
def test_ties_merge_counts_only(elect):
    base, experts = _int_experts((31, 37), 3, torch.float16, False, seed=8)
    _run_ties(base, experts, _params(3, drop=False), elect=elect, merge="mean", welect=True, with_out=False)


def test_ties_merge_none_without_out_is_noop():
    base, experts = _int_experts((7,), 2, torch.float32, True)
    counts = torch.tensor([1, 2], device=DEV)
    k_ties.ties_merge(base, experts, _params(2), None, counts, 0, 0, 0, 0, 1, False, 1.0, 1.0)
    _same(counts, torch.tensor([1, 2], device=DEV))


def test_ties_merge_random_float_unaligned():
    """Random fp32 data, experts at unaligned addresses: exact counts, values within rounding."""
    g = _gen(6)
    n = 1031
    storage = torch.randn(4, n + 1, generator=g).to(DEV)
    experts = [storage[t, 1:] for t in range(3)]  # contiguous views, 4-byte offset
    base = storage[3, 1:]
    params = torch.tensor([[0.7, 0.1, 3.0, 0.2, 1.3], [-0.4, 0.0, INF, 0.0, 1.0], [1.1, 0.05, 2.0, 0.6, 2.5]])
    for elect, merge in [("sum", "wmean"), ("count", "max"), ("none", "mean"), ("sum", "sum")]:
        _run_ties(
            base,
            experts,
            params,
            elect=elect,
            merge=merge,
            welect=True,
            lam=0.8,
            seed=-3,
            key=2**64 - 2,
            offset=2**31 + 2,
            exact=False,
        )


@pytest.mark.parametrize("merge", list(MERGE))
@pytest.mark.parametrize("elect", list(ELECT))
def test_ties_merge_special_values(elect, merge):
    sv = _special_values(torch.float32)
    g = _gen(7)
    experts = [sv[torch.randperm(sv.numel(), generator=g).to(DEV)].repeat(5) for _ in range(3)]
    params = torch.tensor([[1.0, 0.0, INF, 0.0, 1.0], [-2.0, 0.0, INF, 0.3, 1.0], [0.5, 0.5, INF, 0.0, 2.0]])
    _run_ties(None, experts, params, elect=elect, merge=merge, welect=elect == "count", lam=1.0)


# ----------------------------------------------------------------------------------------------------------
# TALL masks and consensus merging


def _lambdas(T):
    return torch.tensor([0.5, 1.0, 0.25][:T], dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_tall_masks_and_consensus(shape, dtype):
    for T, with_base, with_mtl in [(1, True, False), (2, False, True), (3, True, False), (3, False, True)]:
        base, experts = _int_experts(shape, T, dtype, with_base, seed=10 + T)
        mtl = _int_tensor(shape, -5, 6, _gen(T)).to(dtype).to(DEV) if with_mtl else None
        lams = _lambdas(T)
        masks = torch.ones((T, *shape), dtype=torch.bool, device=DEV)
        k_tall.tall_masks(base, experts, lams, mtl, masks)
        _same(masks, tall_masks_ref(base, experts, lams, mtl))
        for min_count in (1, 2):
            out = torch.full(shape, 9.0, dtype=dtype, device=DEV)
            k_consensus.consensus_merge(base, experts, lams, mtl, min_count, 0.5, out)
            _same(out, consensus_merge_ref(base, experts, lams, mtl, min_count=min_count, lam=0.5))


def test_tall_consensus_special_values():
    sv = _special_values(torch.float32)
    g = _gen(14)
    experts = [sv[torch.randperm(sv.numel(), generator=g).to(DEV)].repeat(7) for _ in range(3)]
    base = sv[torch.randperm(sv.numel(), generator=g).to(DEV)].repeat(7)
    lams = _lambdas(3)
    for b in (None, base):
        masks = torch.empty((3, sv.numel() * 7), dtype=torch.bool, device=DEV)
        k_tall.tall_masks(b, experts, lams, None, masks)
        _same(masks, tall_masks_ref(b, experts, lams))
        out = torch.empty_like(base)
        k_consensus.consensus_merge(b, experts, lams, None, 2, 1.0, out)
        _same(out, consensus_merge_ref(b, experts, lams, min_count=2))


def test_consensus_random_float_out_dtype():
    g = _gen(12)
    experts = [torch.randn(2049, generator=g).to(torch.float16).to(DEV) for _ in range(3)]
    base = torch.randn(2049, generator=g).to(torch.float16).to(DEV)
    lams = torch.tensor([0.6, 1.0, 1.7])
    masks = torch.empty((3, 2049), dtype=torch.bool, device=DEV)
    k_tall.tall_masks(base, experts, lams, None, masks)
    _same(masks, tall_masks_ref(base, experts, lams))
    out = torch.empty(2049, dtype=torch.float32, device=DEV)
    k_consensus.consensus_merge(base, experts, lams, None, 2, 0.9, out)
    r = consensus_merge_ref(base, experts, lams, min_count=2, lam=0.9, out_dtype=torch.float32)
    torch.testing.assert_close(out, r, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# EMR


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_emr_elect(shape, dtype):
    for T, with_base in [(1, False), (2, True), (3, True)]:
        base, experts = _int_experts(shape, T, dtype, with_base, seed=20 + T)
        tau = torch.full(shape, 5.0, dtype=dtype, device=DEV)
        masks = torch.ones((T, *shape), dtype=torch.bool, device=DEV)
        stats0 = torch.arange(2 * T, dtype=torch.float64, device=DEV).reshape(T, 2)
        stats = stats0.clone()
        k_emr.emr_elect(base, experts, tau, masks, stats)
        r_tau, r_masks, r_stats = emr_elect_ref(base, experts, out_dtype=dtype)
        _same(tau, r_tau)
        _same(masks, r_masks)
        _same(stats, stats0 + r_stats)  # integer data: the sums are exact


def test_emr_elect_random_float():
    g = _gen(13)
    experts = [torch.randn(3001, generator=g).to(DEV) for _ in range(3)]
    tau = torch.empty(3001, dtype=torch.float16, device=DEV)
    masks = torch.empty((3, 3001), dtype=torch.bool, device=DEV)
    stats = torch.zeros(3, 2, dtype=torch.float64, device=DEV)
    k_emr.emr_elect(None, experts, tau, masks, stats)
    r_tau, r_masks, r_stats = emr_elect_ref(None, experts, out_dtype=torch.float16)
    _same(tau, r_tau)
    _same(masks, r_masks)
    torch.testing.assert_close(stats, r_stats, rtol=1e-6, atol=1e-9)


def test_emr_elect_special_values():
    sv = _special_values(torch.float32)
    g = _gen(15)
    experts = [sv[torch.randperm(sv.numel(), generator=g).to(DEV)].repeat(9) for _ in range(3)]
    experts[1][:4] = torch.tensor([INF, 0.0, -1.0, 2.0], device=DEV)  # a disagreeing inf gives inf * 0 = NaN
    experts[0][:4] = torch.tensor([1.0, INF, 1.0, -INF], device=DEV)
    tau = torch.empty_like(experts[0])
    masks = torch.empty((3, experts[0].numel()), dtype=torch.bool, device=DEV)
    stats = torch.zeros(3, 2, dtype=torch.float64, device=DEV)
    k_emr.emr_elect(None, experts, tau, masks, stats)
    r_tau, r_masks, r_stats = emr_elect_ref(None, experts)
    _same(tau, r_tau)
    _same(masks, r_masks)
    _same(stats.isnan(), r_stats.isnan())
