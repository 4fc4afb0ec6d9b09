"""doge_grad on every backend that registers it, against its oracle (fastmerge/ops/doge_grad.py)."""

import pytest
import torch
from _backends import backends_for, device_or_skip, kernel

from fastmerge import ops
from fastmerge.ops.doge_grad import doge_grad_ref


@pytest.mark.parametrize("backend", backends_for("doge_grad"))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 5), (3, 2, 33, 130), (1, 5, 4, 9000)], ids=str)
def test_doge_grad_backends(backend, shape):
    dev = device_or_skip(backend)
    g = torch.Generator().manual_seed(sum(shape))
    B, T, M, N = shape
    taus = torch.randn(B, T, M, N, generator=g)
    a = torch.randn(B, T, M, generator=g)
    d = torch.randn(B, M, N, generator=g) * 0.1
    out = torch.empty(B, M, N, device=dev)
    kernel(backend, "doge_grad")(taus.to(dev), a.to(dev), d.to(dev), out)
    torch.testing.assert_close(out.cpu(), doge_grad_ref(taus, a, d), rtol=2e-5, atol=2e-4)


def test_doge_grad_opcheck_and_errors():
    taus, a, d = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5), torch.randn(2, 5, 4)
    torch.library.opcheck(torch.ops.fastmerge.doge_grad.default, (taus, a, d, torch.empty(2, 5, 4)))
    with pytest.raises(RuntimeError, match="a must have shape"):
        ops.doge_grad(taus, a[:, :2], d)
    with pytest.raises(RuntimeError, match="float32"):
        ops.doge_grad(taus.double(), a, d)
