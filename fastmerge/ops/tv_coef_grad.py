"""tv_coef_grad (test-time adaptation): the gradient of tv_combine's coefficients, the dot product of the loss
gradient with each task vector over each segment, in one pass."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check_buffer
from ._lib import contig, into, register
from .tv_combine import check_segments, host_offsets, segment_ids

SCHEMA = "tv_coef_grad(Tensor grad, Tensor taus, Tensor offsets, Tensor(a!) out) -> ()"


def _check(grad, taus, offsets, out) -> None:
    S = check_segments("grad", grad, taus, offsets)
    check_buffer("out", out, torch.float32, (taus.shape[0], S), taus.device)


def _run(grad, taus, offsets, out) -> None:
    off = host_offsets(offsets, taus.shape[1])
    fn = select("tv_coef_grad", taus.device, (taus.dtype,))
    into(out, lambda o: fn(contig(grad), contig(taus), off, o))


register(SCHEMA, _check, _run)


def tv_coef_grad(grad: torch.Tensor, taus: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(T, S) = sum over segment s of grad[p] * taus[t, p]: the gradient of the coefficients of tv_combine."""
    out = torch.empty(taus.shape[0], offsets.numel() - 1, dtype=torch.float32, device=taus.device)
    torch.ops.fastmerge.tv_coef_grad(grad, taus, offsets, out)
    return out


def tv_coef_grad_ref(grad: torch.Tensor, taus: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(T, S): sum over segment s of grad[p] * taus[t, p], fp64 sums rounded to fp32."""
    seg = segment_ids(offsets, taus.device)
    prod = taus.double() * grad.double()
    out = torch.zeros(taus.shape[0], offsets.numel() - 1, dtype=torch.float64, device=taus.device)
    return out.index_add_(1, seg, prod).float()


@REFERENCE.kernel("tv_coef_grad")
def _reference(grad, taus, offsets, out):
    out.copy_(tv_coef_grad_ref(grad, taus, offsets))
