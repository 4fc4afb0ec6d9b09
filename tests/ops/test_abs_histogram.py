"""abs_histogram on every backend that registers it, against its oracle (fastmerge/ops/abs_histogram.py)."""

import cpp_cases as cpp
import pytest
import torch
import triton_cases as tri
from _backends import backends_for, device_or_skip, dtypes_for, kernel
from _cases import INF, SHAPES, opcheck_args

from fastmerge import ops
from fastmerge.ops.abs_histogram import abs_histogram_ref
from fastmerge.ops.keys import HIST_BINS, abs_keys


@pytest.mark.parametrize("backend", backends_for("abs_histogram"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_abs_histogram(backend, shape):
    dev = device_or_skip(backend)
    for dtype in dtypes_for(backend, dev):
        x = torch.randn(shape).to(dtype=dtype, device=dev)
        if x.numel():
            x.view(-1)[0] = 0.0
            x.view(-1)[-1] = -0.0
        for level in (0, 1):
            prefix = int(abs_keys(x).reshape(-1)[0] >> 16) if x.numel() and level else 0
            hist = torch.full((65536,), 3, dtype=torch.int64, device=dev)  # accumulates
            kernel(backend, "abs_histogram")(x, hist, level, prefix)
            want = abs_histogram_ref(x, level, prefix) + 3
            assert torch.equal(hist.cpu(), want.cpu()), (dtype, level)


def test_opcheck():
    _, e = opcheck_args()
    torch.library.opcheck(torch.ops.fastmerge.abs_histogram.default,
                          (e[0], torch.zeros(65536, dtype=torch.int64), 0, 0))


def test_errors_name_the_argument():
    with pytest.raises(Exception, match="x must be a floating tensor"):
        ops.abs_histogram(torch.arange(4))


# ---- the C++ kernel ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", cpp.DTYPES)
def test_cpp_abs_histogram(C, dtype):
    g = torch.Generator().manual_seed(4)
    specials = torch.tensor([0.0, -0.0, INF, -INF, float("nan"), 1e-40, -2.5e-39, 65504.0, -1e-7])
    xs = [
        torch.empty(0, dtype=dtype),
        specials.to(dtype),
        cpp.make((37, 129), dtype, "int", g),
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


def test_cpp_bad_arguments_are_named(C):
    with pytest.raises(RuntimeError, match="hist"):
        C.abs_histogram_cpu(torch.ones(4), torch.zeros(10, dtype=torch.int64), 0, 0)


# ---- the Triton kernel -------------------------------------------------------------------------------------


@tri.test
@pytest.mark.parametrize("dtype", tri.DTYPES)
@pytest.mark.parametrize("shape", tri.SHAPES)
def test_triton_abs_histogram(shape, dtype):
    g = tri.gen(1)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(tri.DEV)
    if x.numel() >= 7:
        x.view(-1)[:3] = torch.tensor([0.0, -0.0, 0.75], dtype=dtype, device=tri.DEV)
    prior = torch.randint(0, 5, (HIST_BINS,), generator=g).to(tri.DEV)
    h0 = prior.clone()
    kernel("triton", "abs_histogram")(x, h0, 0, 0)
    tri.same(h0, prior + abs_histogram_ref(x, 0))
    keys = abs_keys(x).reshape(-1)
    prefixes = [int(keys[-1] >> 16), 12345] if keys.numel() else [0]
    for prefix in prefixes:
        h1 = prior.clone()
        kernel("triton", "abs_histogram")(x, h1, 1, prefix)
        tri.same(h1, prior + abs_histogram_ref(x, 1, prefix))


@tri.test
@pytest.mark.parametrize("dtype", tri.DTYPES)
def test_triton_abs_histogram_special_values(dtype):
    x = tri.special_values(dtype).repeat(50)
    for level, prefix in [(0, 0), (1, int(abs_keys(torch.tensor([3.0]))[0] >> 16))]:
        h = torch.zeros(HIST_BINS, dtype=torch.int64, device=tri.DEV)
        kernel("triton", "abs_histogram")(x, h, level, prefix)
        tri.same(h, abs_histogram_ref(x, level, prefix))
    with pytest.raises(ValueError):
        kernel("triton", "abs_histogram")(x, h, 2, 0)
