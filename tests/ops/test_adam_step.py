"""adam_step on every backend that registers it, against its oracle (fastmerge/ops/adam_step.py) and against
torch.optim.Adam."""

import pytest
import torch
from _backends import backends_for, device_or_skip, kernel

from fastmerge import ops
from fastmerge.ops.adam_step import adam_step_ref


@pytest.mark.parametrize("backend", backends_for("adam_step"))
@pytest.mark.parametrize(("S", "repeat", "inner"), [(1, 1, 1), (3, 1, 1001), (6, 3, 37), (4, 4, 5)])
def test_adam_step_backends(backend, S, repeat, inner):
    dev = device_or_skip(backend)
    g = torch.Generator().manual_seed(S * inner + repeat)
    p0 = torch.randn(S, inner, generator=g)
    grad = torch.randn(S // repeat, inner, generator=g)
    scale = torch.rand(S, generator=g) + 0.5
    want = [p0.clone(), torch.zeros(S, inner), torch.zeros(S, inner)]
    got = [t.to(dev) for t in want]
    for step in (1, 2, 3):
        adam_step_ref(*want[:1], grad, want[1], want[2], scale, repeat, 1e-3, 0.9, 0.999, 1e-8, step)
        kernel(backend, "adam_step")(got[0], grad.to(dev), got[1], got[2], scale.to(dev), repeat, 1e-3, 0.9, 0.999,
                                     1e-8, step)
    for w, x in zip(want, got, strict=True):
        torch.testing.assert_close(x.cpu(), w, rtol=1e-6, atol=1e-7)


def test_adam_step_matches_torch_optim():
    p = torch.randn(2, 50)
    q = p.clone().requires_grad_(True)
    opt = torch.optim.Adam([q], lr=1e-2)
    m1, m2 = torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 6):
        grad = torch.randn(2, 50)
        opt.zero_grad()
        q.grad = grad.clone()
        opt.step()
        ops.adam_step(p, grad, m1, m2, torch.ones(2), lr=1e-2, step=step)
    torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)


def test_adam_step_opcheck_and_errors():
    p, gr = torch.randn(4, 6), torch.randn(2, 6)
    torch.library.opcheck(torch.ops.fastmerge.adam_step.default,
                          (p, gr, torch.zeros(4, 6), torch.zeros(4, 6), torch.ones(4), 2, 1e-3, 0.9, 0.999, 1e-8, 1))
    with pytest.raises(RuntimeError, match="grad must have shape"):
        ops.adam_step(p, gr, torch.zeros(4, 6), torch.zeros(4, 6), torch.ones(4), repeat=1, lr=1e-3, step=1)
