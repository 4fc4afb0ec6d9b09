"""tall_masks on every backend that registers it, against its oracle (fastmerge/ops/tall_masks.py)."""

import cpp_cases as cpp
import pytest
import torch
import triton_cases as tri
from _backends import backends_for, device_or_skip, dtypes_for, kernel
from _cases import opcheck_args, tall_cases

from fastmerge.ops.tall_masks import tall_masks_ref


@pytest.mark.parametrize("backend", backends_for("tall_masks"))
@pytest.mark.parametrize("shape", [(1,), (7,), (31, 37)], ids=str)
@pytest.mark.parametrize("T", [1, 2, 4])
def test_tall_masks(backend, shape, T):
    dev = device_or_skip(backend)
    for _, base, ex, lambdas, mtl in tall_cases(backend, dev, dtypes_for(backend, dev), shape, T):
        masks = torch.empty((T, *shape), dtype=torch.bool, device=dev)
        kernel(backend, "tall_masks")(base, ex, lambdas, mtl, masks)
        assert torch.equal(masks.cpu(), tall_masks_ref(base, ex, lambdas, mtl).cpu())


def test_opcheck():
    b, e = opcheck_args()
    torch.library.opcheck(torch.ops.fastmerge.tall_masks.default,
                          (b, e, torch.ones(3), None, torch.empty(3, 9, 5, dtype=torch.bool)))


# ---- the C++ kernel ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", cpp.DTYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_cpp_tall_masks(C, dtype, T, isa):
    for shape, base, ex, lambdas, mtl in cpp.tall_cases(dtype, T):
        masks = torch.empty((T, *shape), dtype=torch.bool)
        C.tall_masks_cpu(base, ex, lambdas, mtl, masks)
        assert torch.equal(masks, tall_masks_ref(base, ex, lambdas, mtl))


# ---- the Triton kernel -------------------------------------------------------------------------------------


@tri.test
@pytest.mark.parametrize("dtype", tri.DTYPES)
@pytest.mark.parametrize("shape", tri.SHAPES)
def test_triton_tall_masks(shape, dtype):
    for T, base, experts, lams, mtl in tri.tall_cases(shape, dtype):
        masks = torch.ones((T, *shape), dtype=torch.bool, device=tri.DEV)
        kernel("triton", "tall_masks")(base, experts, lams, mtl, masks)
        tri.same(masks, tall_masks_ref(base, experts, lams, mtl))


@tri.test
def test_triton_tall_masks_special_values():
    base, experts = tri.special_experts()
    lams = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float32)
    for b in (None, base):
        masks = torch.empty((3, base.numel()), dtype=torch.bool, device=tri.DEV)
        kernel("triton", "tall_masks")(b, experts, lams, None, masks)
        tri.same(masks, tall_masks_ref(b, experts, lams))


@tri.test
def test_triton_tall_masks_random_float():
    base, experts, lams = tri.random_experts()
    masks = torch.empty((3, 2049), dtype=torch.bool, device=tri.DEV)
    kernel("triton", "tall_masks")(base, experts, lams, None, masks)
    tri.same(masks, tall_masks_ref(base, experts, lams))
