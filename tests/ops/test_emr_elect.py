"""emr_elect on every backend that registers it, against its oracle (fastmerge/ops/emr_elect.py)."""

import itertools

import cpp_cases as cpp
import pytest
import torch
import triton_cases as tri
from _backends import backends_for, device_or_skip, dtypes_for, kernel
from _cases import INF, experts_for, opcheck_args

from fastmerge.ops.emr_elect import emr_elect_ref


@pytest.mark.parametrize("backend", backends_for("emr_elect"))
@pytest.mark.parametrize("shape", [(1,), (7,), (31, 37)], ids=str)
@pytest.mark.parametrize("T", [1, 2, 3])
def test_emr_elect(backend, shape, T):
    dev = device_or_skip(backend)
    for dtype in dtypes_for(backend, dev):
        for with_base in (True, False):
            base, ex = experts_for(shape, dtype, dev, T, with_base)
            uni = torch.empty(shape, dtype=torch.float32, device=dev)
            masks = torch.empty((T, *shape), dtype=torch.bool, device=dev)
            stats = torch.zeros(T, 2, dtype=torch.float64, device=dev)
            kernel(backend, "emr_elect")(base, ex, uni, masks, stats)
            wu, wm, ws = emr_elect_ref(base, ex)
            assert torch.equal(uni.cpu(), wu.cpu())
            assert torch.equal(masks.cpu(), wm.cpu())
            torch.testing.assert_close(stats.cpu(), ws.cpu(), rtol=1e-9, atol=0)


def test_opcheck():
    b, e = opcheck_args()
    torch.library.opcheck(torch.ops.fastmerge.emr_elect.default, (b, e, torch.empty(9, 5),
                                                                   torch.empty(3, 9, 5, dtype=torch.bool),
                                                                   torch.zeros(3, 2, dtype=torch.float64)))


# ---- the C++ kernel ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", cpp.DTYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_cpp_emr_elect(C, dtype, T, isa):
    for shape, kind, with_base, out_dtype in itertools.product(
        [(0,), (1,), (7,), (37, 129)], ["int", "float"], [True, False], [torch.float32, torch.bfloat16]
    ):
        base, ex = cpp.experts(shape, dtype, kind, T, with_base, seed=3 * T)
        ref_uni, ref_masks, ref_stats = emr_elect_ref(base, ex, out_dtype)
        uni = torch.empty(shape, dtype=out_dtype)
        masks = torch.empty((T, *shape), dtype=torch.bool)
        stats = torch.ones(T, 2, dtype=torch.float64)
        C.emr_elect_cpu(base, ex, uni, masks, stats)
        cpp.same(uni, ref_uni)
        assert torch.equal(masks, ref_masks)
        cpp.close_stats(stats, ref_stats + 1)


def test_cpp_emr_elect_threads(C, isa):
    g = torch.Generator().manual_seed(0)
    ex = [torch.randn(100_003, generator=g).bfloat16() for _ in range(3)]
    ref_uni, ref_masks, ref_stats = emr_elect_ref(None, ex)
    uni, masks, stats = torch.empty(100_003), torch.empty(3, 100_003, dtype=torch.bool), torch.zeros(3, 2).double()
    C.emr_elect_cpu(None, ex, uni, masks, stats)
    cpp.same(uni, ref_uni)
    assert torch.equal(masks, ref_masks)
    cpp.close_stats(stats, ref_stats)


# ---- the Triton kernel -------------------------------------------------------------------------------------


@tri.test
@pytest.mark.parametrize("dtype", tri.DTYPES)
@pytest.mark.parametrize("shape", tri.SHAPES)
def test_triton_emr_elect(shape, dtype):
    for T, with_base in [(1, False), (2, True), (3, True)]:
        base, experts = tri.int_experts(shape, T, dtype, with_base, seed=20 + T)
        tau = torch.full(shape, 5.0, dtype=dtype, device=tri.DEV)
        masks = torch.ones((T, *shape), dtype=torch.bool, device=tri.DEV)
        stats0 = torch.arange(2 * T, dtype=torch.float64, device=tri.DEV).reshape(T, 2)
        stats = stats0.clone()
        kernel("triton", "emr_elect")(base, experts, tau, masks, stats)
        r_tau, r_masks, r_stats = emr_elect_ref(base, experts, out_dtype=dtype)
        tri.same(tau, r_tau)
        tri.same(masks, r_masks)
        tri.same(stats, stats0 + r_stats)  # integer data: the sums are exact


@tri.test
def test_triton_emr_elect_random_float():
    g = tri.gen(13)
    experts = [torch.randn(3001, generator=g).to(tri.DEV) for _ in range(3)]
    tau = torch.empty(3001, dtype=torch.float16, device=tri.DEV)
    masks = torch.empty((3, 3001), dtype=torch.bool, device=tri.DEV)
    stats = torch.zeros(3, 2, dtype=torch.float64, device=tri.DEV)
    kernel("triton", "emr_elect")(None, experts, tau, masks, stats)
    r_tau, r_masks, r_stats = emr_elect_ref(None, experts, out_dtype=torch.float16)
    tri.same(tau, r_tau)
    tri.same(masks, r_masks)
    torch.testing.assert_close(stats, r_stats, rtol=1e-6, atol=1e-9)


@tri.test
def test_triton_emr_elect_special_values():
    sv = tri.special_values(torch.float32)
    g = tri.gen(15)
    experts = [sv[torch.randperm(sv.numel(), generator=g).to(tri.DEV)].repeat(9) for _ in range(3)]
    experts[1][:4] = torch.tensor([INF, 0.0, -1.0, 2.0], device=tri.DEV)  # a disagreeing inf gives inf * 0 = NaN
    experts[0][:4] = torch.tensor([1.0, INF, 1.0, -INF], device=tri.DEV)
    tau = torch.empty_like(experts[0])
    masks = torch.empty((3, experts[0].numel()), dtype=torch.bool, device=tri.DEV)
    stats = torch.zeros(3, 2, dtype=torch.float64, device=tri.DEV)
    kernel("triton", "emr_elect")(None, experts, tau, masks, stats)
    r_tau, r_masks, r_stats = emr_elect_ref(None, experts)
    tri.same(tau, r_tau)
    tri.same(masks, r_masks)
    tri.same(stats.isnan(), r_stats.isnan())
