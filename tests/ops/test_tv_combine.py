"""tv_combine on every backend that registers it, against its oracle (fastmerge/ops/tv_combine.py)."""

import pytest
import torch
from _backends import backends_for, device_or_skip, dtypes_for, kernel
from _tv import SIZES, offsets

from fastmerge import ops
from fastmerge.ops.tv_combine import tv_combine_ref


@pytest.mark.parametrize("backend", backends_for("tv_combine"))
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("T", [1, 3])
def test_tv_combine_backends(backend, sizes, T):
    dev = device_or_skip(backend)
    off = offsets(sizes)
    P, S = int(off[-1]), len(sizes)
    g = torch.Generator().manual_seed(P + T)
    for dtype in dtypes_for(backend, dev):
        taus = torch.randn(T, P, generator=g).to(dtype)
        base = torch.randn(P, generator=g)
        coef = torch.rand(T, S, generator=g)
        out = torch.empty(P, device=dev)
        kernel(backend, "tv_combine")(base.to(dev), taus.to(dev), coef.to(dev), off, out)
        torch.testing.assert_close(out.cpu(), tv_combine_ref(base, taus, coef, off), rtol=1e-5, atol=1e-5)


def test_tv_combine_checks_and_opcheck():
    off = offsets([3, 4])
    taus, base, coef = torch.randn(2, 7), torch.randn(7), torch.rand(2, 2)
    torch.library.opcheck(torch.ops.fastmerge.tv_combine.default, (base, taus, coef, off, torch.empty(7)))
    with pytest.raises(RuntimeError, match="coef must be"):
        ops.tv_combine(base, taus, torch.rand(2, 3), off)
    with pytest.raises(RuntimeError, match="offsets must rise"):
        ops.tv_combine(base, taus, coef, torch.tensor([0, 5, 6]))
    with pytest.raises(RuntimeError, match="base must be"):
        ops.tv_combine(base[:5], taus, coef, off)
