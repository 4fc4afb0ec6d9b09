"""orth_project: X - U (U^T X) for a stack of matrices, the part of X outside span(U) (U with orthonormal
columns)."""

from __future__ import annotations

import torch

from .. import context
from ..backends import get_backend, select
from ..backends.reference import REFERENCE
from ._checks import check, check_float, check_same
from ._lib import empty, into, register

SCHEMA = "orth_project(Tensor x, Tensor u, Tensor(a!) out) -> ()"


def _check(x, u, out) -> None:
    check_float("x", x)
    check_float("u", u)
    check_float("out", out)
    check(x.dim() == 3, lambda: f"x must be a stack of matrices (B, m, n), got shape {tuple(x.shape)}")
    check(u.dim() == 3 and u.shape[0] == x.shape[0] and u.shape[1] == x.shape[1],
          lambda: f"u must be (B, m, k) = ({x.shape[0]}, {x.shape[1]}, k) like x, got {tuple(u.shape)}")
    check(u.device == x.device, lambda: f"u is on {u.device}, x is on {x.device}")
    check_same("out", out, x, "x")


def _run(x, u, out) -> None:
    if torch.float64 in (x.dtype, u.dtype, out.dtype) and not context.forced_backend():
        fn = get_backend("reference").fn("orth_project")  # fp64: two BLAS GEMMs in fp64, what the reference does
    else:
        fn = select("orth_project", x.device, (x.dtype, u.dtype, out.dtype))
    into(out, lambda o: fn(x, u, o))  # the kernels take any strides


register(SCHEMA, _check, _run)


def orth_project(x: torch.Tensor, u: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """X - U (U^T X) for a matrix or a stack of matrices (..., m, n), U (..., m, k) with orthonormal columns:
    the part of X outside span(U). fp32 maths (fp64 for fp64 inputs); the result in ``out_dtype`` (default:
    fp32, or fp64 for fp64 inputs)."""
    if x.dim() < 2 or u.dim() != x.dim() or u.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"orth_project: x (..., m, n) and u (..., m, k) must share (..., m); got "
                         f"{tuple(x.shape)} and {tuple(u.shape)}")
    lead = x.shape[:-2]
    xs = x.reshape(-1, *x.shape[-2:])
    us = u.reshape(-1, *u.shape[-2:])
    dt = out_dtype or (torch.float64 if torch.float64 in (x.dtype, u.dtype) else torch.float32)
    out = empty(xs.shape, dt, x.device)
    torch.ops.fastmerge.orth_project(xs, us, out)
    return out.reshape(*lead, *x.shape[-2:])


def orth_project_ref(x: torch.Tensor, u: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """X - U (U^T X) per matrix of a stack: x (B, m, n), u (B, m, k); fp32 maths (fp64 for fp64 inputs)."""
    dt = torch.float64 if torch.float64 in (x.dtype, u.dtype) else torch.float32
    xf, uf = x.to(dt), u.to(dt)
    return (xf - uf @ (uf.mT @ xf)).to(out_dtype or x.dtype)


@REFERENCE.kernel("orth_project")
def _reference(x, u, out):
    out.copy_(orth_project_ref(x, u, out.dtype))
