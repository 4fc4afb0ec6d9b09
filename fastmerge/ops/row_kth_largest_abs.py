"""row_kth_largest_abs: the k-th largest |x| of every row of a 2-D tensor, by radix select (no sort)."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check, check_buffer, check_float
from ._lib import contig, into, register

SCHEMA = "row_kth_largest_abs(Tensor x, int k, Tensor(a!) out) -> ()"


def _check(x, k, out) -> None:
    check_float("x", x)
    check(x.dim() == 2, lambda: f"x must be 2-D (rows, cols), got shape {tuple(x.shape)}")
    check(0 <= k <= x.shape[1], lambda: f"k must be in [0, {x.shape[1]}], got {k}")
    check_buffer("out", out, torch.float32, (x.shape[0],), x.device)


def _run(x, k, out) -> None:
    fn = select("row_kth_largest_abs", x.device, (x.dtype,))
    into(out, lambda o: fn(contig(x), k, o))


register(SCHEMA, _check, _run)


def row_kth_largest_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest |x| of every row of a 2-D tensor (radix select), fp32 (rows,); k = 0 gives +inf."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, cols), got shape {tuple(x.shape)}")
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    torch.ops.fastmerge.row_kth_largest_abs(x, int(k), out)
    return out


def row_kth_largest_abs_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest |x| of every row (1-based k) as fp32.

    x: (rows, cols), floating. Returns fp32 (rows,). k = 0 gives +inf (keep nothing); k > cols is an error.
    """
    rows, cols = x.shape
    if not 0 <= k <= cols:
        raise ValueError(f"k must be in [0, {cols}], got {k}")
    if k == 0:
        return torch.full((rows,), float("inf"), dtype=torch.float32, device=x.device)
    return x.float().abs().topk(k, dim=1).values[:, -1].contiguous()


@REFERENCE.kernel("row_kth_largest_abs")
def _reference(x, k, out):
    out.copy_(row_kth_largest_abs_ref(x, k))
