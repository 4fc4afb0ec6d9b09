"""orth_project on every backend that registers it, against its oracle (fastmerge/ops/orth_project.py)."""

import pytest
import torch
from _backends import backends_for, device_or_skip, dtypes_for, kernel

from fastmerge import ops
from fastmerge.ops.orth_project import orth_project_ref


@pytest.mark.parametrize("backend", backends_for("orth_project"))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 37, 29, 5), (3, 130, 67, 17), (1, 65, 200, 1), (2, 40, 9, 0),
                                   (1, 300, 70, 150)], ids=str)
def test_orth_project_backends(backend, shape):
    dev = device_or_skip(backend)
    fn = kernel(backend, "orth_project")
    b, m, n, k = shape
    for dtype in dtypes_for(backend, dev):
        g = torch.Generator().manual_seed(m * n + k)
        x = torch.randn(b, m, n, generator=g).to(dtype)
        u = torch.linalg.qr(torch.randn(b, m, max(k, 1), generator=g)).Q[..., :k].to(dtype)
        want = orth_project_ref(x, u, torch.float32)
        out = torch.empty(b, m, n, dtype=torch.float32, device=dev)
        fn(x.to(dev), u.to(dev), out)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.cpu(), want, rtol=tol, atol=tol)
        if dtype == torch.float32 and k:
            assert float((u.mT @ out.cpu()).abs().max()) < 1e-4  # nothing of span(U) is left


@pytest.mark.parametrize("backend", backends_for("orth_project"))
def test_orth_project_non_contiguous_through_dispatcher(backend, monkeypatch):
    dev = device_or_skip(backend)
    monkeypatch.setenv("FASTMERGE_BACKEND", backend)
    big = torch.randn(2, 90, 61)
    x = big.transpose(1, 2)[:, 3:58:2, :]  # (2, 28, 90), strided
    u = torch.linalg.qr(torch.randn(2, 90, 14)).Q.transpose(1, 2).contiguous().transpose(1, 2)[:, 3:58:2, :]
    u = torch.linalg.qr(u).Q  # (2, 28, 14), orthonormal, non-contiguous after slicing below
    u = torch.cat([u, u], 2)[..., ::2]
    assert not x.is_contiguous() and not u.is_contiguous()
    got = ops.orth_project(x.to(dev), u.to(dev))
    torch.testing.assert_close(got.cpu(), orth_project_ref(x, u, torch.float32), rtol=1e-5, atol=1e-5)
    out = torch.empty(2, 90, 28, device=dev).transpose(1, 2)  # non-contiguous output through the op
    torch.ops.fastmerge.orth_project(x.to(dev), u.to(dev), out)
    torch.testing.assert_close(out.cpu(), orth_project_ref(x, u, torch.float32), rtol=1e-5, atol=1e-5)


def test_orth_project_errors_and_single_matrix():
    x = torch.randn(20, 7)
    u = torch.linalg.qr(torch.randn(20, 3)).Q
    got = ops.orth_project(x, u)
    torch.testing.assert_close(got, x - u @ (u.T @ x), rtol=1e-5, atol=1e-5)
    assert ops.orth_project(x.double(), u).dtype == torch.float64
    with pytest.raises(ValueError, match="share"):
        ops.orth_project(x, torch.randn(19, 3))
    with pytest.raises(RuntimeError, match="u must be"):
        torch.ops.fastmerge.orth_project(x[None], torch.randn(2, 20, 3), torch.empty(1, 20, 7))
    with pytest.raises(RuntimeError, match="x must be a floating"):
        torch.ops.fastmerge.orth_project(x[None].int(), u[None], torch.empty(1, 20, 7))


def test_orth_project_opcheck():
    x = torch.randn(2, 9, 5)
    u = torch.linalg.qr(torch.randn(2, 9, 3)).Q
    torch.library.opcheck(torch.ops.fastmerge.orth_project.default, (x, u, torch.empty(2, 9, 5)))
