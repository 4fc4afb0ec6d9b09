"""doge_grad: DOGE's closed-form loss gradient core, per stack member and row (fp32)."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check, check_same
from ._lib import contig, empty, into, register

SCHEMA = "doge_grad(Tensor taus, Tensor a, Tensor d, Tensor(a!) out) -> ()"


def _check(taus, a, d, out) -> None:
    for name, t, dim in (("taus", taus, 4), ("a", a, 3), ("d", d, 3), ("out", out, 3)):
        check(t.dtype == torch.float32 and t.dim() == dim,
              lambda name=name, t=t, dim=dim: f"{name} must be a {dim}-D float32 tensor, got {t.dtype} "
              f"{tuple(t.shape)}")
    B, T, M, N = taus.shape
    check(tuple(a.shape) == (B, T, M), lambda: f"a must have shape {(B, T, M)}, got {tuple(a.shape)}")
    check(tuple(d.shape) == (B, M, N), lambda: f"d must have shape {(B, M, N)}, got {tuple(d.shape)}")
    check_same("out", out, d, "d")
    check(a.device == taus.device and d.device == taus.device, lambda: "taus, a and d must share a device")


def _run(taus, a, d, out) -> None:
    fn = select("doge_grad", taus.device, (taus.dtype,))
    into(out, lambda o: fn(contig(taus), contig(a), contig(d), o))


register(SCHEMA, _check, _run)


def doge_grad(taus: torch.Tensor, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """-2 sum_j (a_j - rowdot(tau_j, d)) tau_j per stack member: DOGE's loss gradient core (fp32, (B, m, n))."""
    out = empty(d.shape, torch.float32, d.device)
    torch.ops.fastmerge.doge_grad(taus, a, d, out)
    return out


def doge_grad_ref(taus: torch.Tensor, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """DOGE's closed-form gradient core, per stack member b and row r:
    -2 * sum_j (a[b, j, r] - <taus[b, j, r, :], d[b, r, :]>) * taus[b, j, r, :]; fp32 (B, m, n)."""
    t = taus.float()
    e = torch.einsum("btmn,bmn->btm", t.double(), d.double()).float()
    return -2.0 * torch.einsum("btm,btmn->bmn", a.float() - e, t)


@REFERENCE.kernel("doge_grad")
def _reference(taus, a, d, out):
    out.copy_(doge_grad_ref(taus, a, d))
