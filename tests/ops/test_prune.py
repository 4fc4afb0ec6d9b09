"""prune on every backend that registers it, against its oracle (fastmerge/ops/prune.py)."""

import itertools
import math

import cpp_cases as cpp
import pytest
import torch
import triton_cases as tri
from _backends import backends_for, device_or_skip, dtypes_for, kernel
from _cases import INF, SHAPES, opcheck_args, qint

from fastmerge import ops
from fastmerge.ops.philox import name_key, philox_uniform
from fastmerge.ops.prune import prune_ref


@pytest.mark.parametrize("backend", backends_for("prune"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_prune(backend, shape, p):
    dev = device_or_skip(backend)
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
            kernel(backend, "prune")(x, lo.to(dev), hi.to(dev), out, stats, p, seed, key, offset, 2.0)
            want, wst = prune_ref(x, lo.to(dev), hi.to(dev), p, seed, key, offset, 2.0, out_dtype)
            assert torch.equal(out.cpu(), want.cpu()), (dtype, out_dtype)
            torch.testing.assert_close(stats.cpu(), wst.cpu() + 1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backends_for("prune"))
def test_dare_masks_bit_identical(backend):
    """The same (seed, key) draws the same mask as the oracle, also across chunk offsets."""
    dev = device_or_skip(backend)
    n = 4099
    x = torch.ones(n, device=dev)
    lo, hi = torch.zeros(1, device=dev), torch.full((1,), math.inf, device=dev)
    for seed, key in [(0, 0), (1, -1), (2**40 + 3, name_key("embed_tokens.weight"))]:
        full = torch.empty(n, device=dev)
        kernel(backend, "prune")(x, lo, hi, full, torch.zeros(2, dtype=torch.float64, device=dev), 0.5, seed, key, 0,
                                 1.0)
        want = (philox_uniform(n, seed, key, 0) >= 0.5).float()
        assert torch.equal(full.cpu(), want)
        part = torch.empty(n - 1000, device=dev)
        kernel(backend, "prune")(x[1000:], lo, hi, part, torch.zeros(2, dtype=torch.float64, device=dev), 0.5, seed,
                                 key, 1000, 1.0)
        assert torch.equal(part.cpu(), want[1000:])


def test_opcheck():
    _, e = opcheck_args()
    torch.library.opcheck(torch.ops.fastmerge.prune.default, (e[0], torch.zeros(1), torch.full((1,), math.inf),
                                                               torch.empty(9, 5), torch.zeros(2, dtype=torch.float64),
                                                               0.5, 1, 2, 0, 2.0))


def test_errors_name_the_argument():
    _, ex = opcheck_args()
    with pytest.raises(Exception, match=r"p \(drop probability\) must be in"):
        ops.prune(ex[0], p=1.5)


# ---- the C++ kernel ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", cpp.DTYPES)
@pytest.mark.parametrize("shape", cpp.SHAPES)
def test_cpp_prune(C, dtype, shape, isa):
    g = torch.Generator().manual_seed(len(shape))
    x = cpp.make(shape, dtype, "float", g)
    rows_opts = [1] + ([shape[0]] if len(shape) == 2 else [])
    for rows, p, out_dtype in itertools.product(rows_opts, [0.0, 0.4], cpp.DTYPES):
        lo = (torch.rand(rows, generator=g) * 0.5).float()
        hi = torch.where(torch.rand(rows, generator=g) < 0.5, INF, 1.5).float()
        kw = dict(p=p, seed=9, key=4, offset=3, scale=1.7, out_dtype=out_dtype)
        ref, ref_stats = prune_ref(x, lo, hi, **kw)
        out = torch.empty(shape, dtype=out_dtype)
        stats = torch.tensor([1.0, 2.0], dtype=torch.float64)
        C.prune_cpu(x, lo, hi, out, stats, p, 9, 4, 3, 1.7)
        cpp.same(out, ref)
        cpp.close_stats(stats, ref_stats + torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_cpp_prune_dare_mask_bit_identical(C, isa3):
    n = 200_003
    x = torch.ones(n)
    lo, hi = torch.zeros(1), torch.full((1,), INF)
    for p, seed, key, offset in [(0.1, 0, 0, 0), (0.5, 2**40 + 3, -1, 77), (0.9, -5, 12, 2**33 + 1)]:
        ref, _ = prune_ref(x, lo, hi, p=p, seed=seed, key=key, offset=offset)
        out, stats = torch.empty(n), torch.zeros(2, dtype=torch.float64)
        C.prune_cpu(x, lo, hi, out, stats, p, cpp.s64(seed), cpp.s64(key), offset, 1.0)
        assert torch.equal(out, ref)
        # and against the draws themselves
        u = philox_uniform(n, seed, key, offset)
        assert torch.equal(out, (u >= p).float())


def test_cpp_bad_arguments_are_named(C):
    x = torch.ones(4)
    with pytest.raises(RuntimeError, match="stats"):
        C.prune_cpu(x, torch.zeros(1), torch.ones(1), torch.empty(4), torch.zeros(2), 0.0, 0, 0, 0, 1.0)


# ---- the Triton kernel -------------------------------------------------------------------------------------


def _run_prune(x, lo, hi, p, seed, key, offset, scale, out_dtype=None, stats0=None):
    out = torch.full(x.shape, 7.0, dtype=out_dtype or x.dtype, device=tri.DEV)
    stats = torch.zeros(2, dtype=torch.float64, device=tri.DEV) if stats0 is None else stats0.clone()
    kernel("triton", "prune")(x, lo, hi, out, stats, p, seed, key, offset, scale)
    r_out, r_stats = prune_ref(x, lo, hi, p, seed, key, offset, scale, out_dtype)
    tri.same(out, r_out)
    expect = r_stats if stats0 is None else stats0 + r_stats
    torch.testing.assert_close(stats, expect, rtol=1e-6, atol=1e-9)


@tri.test
@pytest.mark.parametrize("dtype", tri.DTYPES)
@pytest.mark.parametrize("shape", tri.SHAPES)
def test_triton_prune(shape, dtype):
    g = tri.gen(2)
    x = tri.int_tensor(shape, -6, 7, g).to(dtype).to(tri.DEV)
    rows = shape[0] if len(shape) == 2 else 1
    # per-tensor magnitude band, no drop
    lo = torch.tensor([1.0], device=tri.DEV)
    hi = torch.tensor([5.0], device=tri.DEV)
    _run_prune(x, lo, hi, 0.0, 0, 0, 0, 1.0, stats0=torch.tensor([1.5, -2.0], dtype=torch.float64, device=tri.DEV))
    # per-row bands + DARE with an unaligned offset, out in another dtype
    lo = torch.arange(rows, dtype=torch.float32, device=tri.DEV) % 3
    hi = 3.0 + torch.arange(rows, dtype=torch.float32, device=tri.DEV) % 4
    _run_prune(x, lo, hi, 0.3, 11, -5, 3, 2.0, out_dtype=torch.float32)
    # keep-everything band, DARE with a huge offset and rescale
    lo = torch.zeros(1, device=tri.DEV)
    hi = torch.full((1,), INF, device=tri.DEV)
    _run_prune(x, lo, hi, 0.5, -(2**63), 2**64 - 1, 2**35 + 1, 2.0)


@tri.test
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**32 + 7])
def test_triton_prune_ones_dare_bit_exact(offset):
    x = torch.ones(1237, device=tri.DEV)
    lo = torch.zeros(1, device=tri.DEV)
    hi = torch.full((1,), INF, device=tri.DEV)
    _run_prune(x, lo, hi, 0.9, 42, offset * 3 + 1, offset, 10.0)
    # u >= p compares in fp32 (torch rounds the Python scalar p to the tensor's dtype): with p a hair above
    # a drawn u, fp32(p) == u and the element is kept
    u = philox_uniform(x.numel(), 3, 4, offset, tri.DEV)
    k = int(torch.nonzero(u >= 0.25)[0])
    p = float(u[k]) + 2**-30
    _run_prune(x, lo, hi, p, 3, 4, offset, 1.0)
    out = torch.empty_like(x)
    kernel("triton", "prune")(x, lo, hi, out, torch.zeros(2, dtype=torch.float64, device=tri.DEV), p, 3, 4, offset,
                              1.0)
    assert out[k] == 1.0


@tri.test
@pytest.mark.parametrize("rows,cols", [(1, 2053), (3, 2053), (70, 37), (2, 4097)])
def test_triton_prune_rows_random(rows, cols):
    """Per-row bands over several programs: rows longer than a tile (two rows per tile at most) and shorter
    (many rows per tile, tiles starting mid-row)."""
    g = tri.gen(3)
    x = torch.randn(rows, cols, generator=g).to(tri.DEV)
    lo = (torch.rand(rows, generator=g) * 0.5).to(tri.DEV)
    hi = (1.0 + torch.rand(rows, generator=g)).to(tri.DEV)
    _run_prune(x, lo, hi, 0.25, 5, 6, 7, 1.5)
    _run_prune(x.to(torch.float16), lo, hi, 0.0, 0, 0, 0, 0.5)


@tri.test
def test_triton_prune_special_values():
    x = tri.special_values(torch.float32).repeat(20)
    lo = torch.tensor([0.5], device=tri.DEV)
    hi = torch.tensor([10.0], device=tri.DEV)
    out = torch.empty_like(x)
    stats = torch.zeros(2, dtype=torch.float64, device=tri.DEV)
    kernel("triton", "prune")(x, lo, hi, out, stats, 0.2, 1, 2, 0, 3.0)
    r_out, r_stats = prune_ref(x, lo, hi, 0.2, 1, 2, 0, 3.0)
    tri.same(out, r_out)
    tri.same(stats.isnan(), r_stats.isnan())
