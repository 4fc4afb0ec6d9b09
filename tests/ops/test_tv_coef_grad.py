"""tv_coef_grad on every backend that registers it, against its oracle (fastmerge/ops/tv_coef_grad.py)."""

import pytest
import torch
from _backends import backends_for, device_or_skip, dtypes_for, kernel
from _tv import SIZES, offsets

from fastmerge.ops.tv_coef_grad import tv_coef_grad_ref


@pytest.mark.parametrize("backend", backends_for("tv_coef_grad"))
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("T", [1, 3])
def test_tv_coef_grad_backends(backend, sizes, T):
    dev = device_or_skip(backend)
    off = offsets(sizes)
    P, S = int(off[-1]), len(sizes)
    g = torch.Generator().manual_seed(P + T)
    for dtype in dtypes_for(backend, dev):
        taus = torch.randn(T, P, generator=g).to(dtype)
        grad = torch.randn(P, generator=g)
        cg = torch.empty(T, S, device=dev)
        kernel(backend, "tv_coef_grad")(grad.to(dev), taus.to(dev), off, cg)
        torch.testing.assert_close(cg.cpu(), tv_coef_grad_ref(grad, taus, off), rtol=1e-4, atol=1e-3)


def test_tv_coef_grad_opcheck():
    off = offsets([3, 4])
    taus, grad = torch.randn(2, 7), torch.randn(7)
    torch.library.opcheck(torch.ops.fastmerge.tv_coef_grad.default, (grad, taus, off, torch.empty(2, 2)))
