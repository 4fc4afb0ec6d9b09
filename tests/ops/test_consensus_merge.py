"""consensus_merge on every backend that registers it, against its oracle (fastmerge/ops/consensus_merge.py)."""

import itertools

import cpp_cases as cpp
import pytest
import torch
import triton_cases as tri
from _backends import backends_for, device_or_skip, dtypes_for, kernel
from _cases import opcheck_args, tall_cases

from fastmerge.ops.consensus_merge import consensus_merge_ref


@pytest.mark.parametrize("backend", backends_for("consensus_merge"))
@pytest.mark.parametrize("shape", [(1,), (7,), (31, 37)], ids=str)
@pytest.mark.parametrize("T", [1, 2, 4])
def test_consensus_merge(backend, shape, T):
    dev = device_or_skip(backend)
    for dtype, base, ex, lambdas, mtl in tall_cases(backend, dev, dtypes_for(backend, dev), shape, T):
        for k in (1, 2):
            out = torch.empty(shape, dtype=dtype, device=dev)
            kernel(backend, "consensus_merge")(base, ex, lambdas, mtl, k, 0.5, out)
            want = consensus_merge_ref(base, ex, lambdas, mtl, min_count=k, lam=0.5)
            assert torch.equal(out.cpu(), want.cpu())


def test_opcheck():
    b, e = opcheck_args()
    torch.library.opcheck(torch.ops.fastmerge.consensus_merge.default, (b, e, torch.ones(3), None, 2, 1.0,
                                                                         torch.empty(9, 5)))


# ---- the C++ kernel ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", cpp.DTYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_cpp_consensus_merge(C, dtype, T, isa):
    for shape, base, ex, lambdas, mtl in cpp.tall_cases(dtype, T):
        for min_count, out_dtype in itertools.product([0, 1, 2, T + 1], [dtype, torch.float32]):
            ref = consensus_merge_ref(base, ex, lambdas, mtl, min_count=min_count, lam=0.6, out_dtype=out_dtype)
            out = torch.empty(shape, dtype=out_dtype)
            C.consensus_merge_cpu(base, ex, lambdas, mtl, min_count, 0.6, out)
            cpp.same(out, ref)


# ---- the Triton kernel -------------------------------------------------------------------------------------


@tri.test
@pytest.mark.parametrize("dtype", tri.DTYPES)
@pytest.mark.parametrize("shape", tri.SHAPES)
def test_triton_consensus_merge(shape, dtype):
    for _, base, experts, lams, mtl in tri.tall_cases(shape, dtype):
        for min_count in (1, 2):
            out = torch.full(shape, 9.0, dtype=dtype, device=tri.DEV)
            kernel("triton", "consensus_merge")(base, experts, lams, mtl, min_count, 0.5, out)
            tri.same(out, consensus_merge_ref(base, experts, lams, mtl, min_count=min_count, lam=0.5))


@tri.test
def test_triton_consensus_merge_special_values():
    base, experts = tri.special_experts()
    lams = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float32)
    for b in (None, base):
        out = torch.empty_like(base)
        kernel("triton", "consensus_merge")(b, experts, lams, None, 2, 1.0, out)
        tri.same(out, consensus_merge_ref(b, experts, lams, min_count=2))


@tri.test
def test_triton_consensus_random_float_out_dtype():
    base, experts, lams = tri.random_experts()
    out = torch.empty(2049, dtype=torch.float32, device=tri.DEV)
    kernel("triton", "consensus_merge")(base, experts, lams, None, 2, 0.9, out)
    r = consensus_merge_ref(base, experts, lams, min_count=2, lam=0.9, out_dtype=torch.float32)
    torch.testing.assert_close(out, r, rtol=1e-6, atol=1e-6)
