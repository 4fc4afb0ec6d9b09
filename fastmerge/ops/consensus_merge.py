"""consensus_merge: consensus merging (TALL paper), the multi-task vector kept where at least ``min_count`` TALL
masks (fastmerge.ops.tall_masks) are set, fused: no mask is stored."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check_float, check_same
from ._lib import contig, deltas, empty, host_floats, into, register, task_sum
from .tall_masks import check_inputs, tall_inputs, tall_masks_ref

SCHEMA = ("consensus_merge(Tensor? base, Tensor[] experts, Tensor lambdas, Tensor? mtl, int min_count, float lam, "
          "Tensor(a!) out) -> ()")


def _check(base, experts, lambdas, mtl, min_count, lam, out) -> None:
    check_inputs(base, experts, lambdas, mtl)
    check_float("out", out)
    check_same("out", out, experts[0])


def _run(base, experts, lambdas, mtl, min_count, lam, out) -> None:
    base, experts = contig(base), [contig(e) for e in experts]
    fn = select("consensus_merge", experts[0].device, (experts[0].dtype, out.dtype), len(experts))
    lambdas, mtl = host_floats(lambdas), contig(mtl)
    into(out, lambda out_: fn(base, experts, lambdas, mtl, min_count, lam, out_))


register(SCHEMA, _check, _run)


def consensus_merge(base, experts, lambdas, mtl=None, *, min_count: int = 2, lam: float = 1.0,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """base + lam * [#TALL masks >= min_count] * mtl, fused (no mask is stored)."""
    experts, lamt = tall_inputs(experts, lambdas)
    out = empty(experts[0].shape, out_dtype or experts[0].dtype, experts[0].device)
    torch.ops.fastmerge.consensus_merge(base, experts, lamt, mtl, int(min_count), float(lam), out)
    return out


def consensus_merge_ref(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    lambdas: torch.Tensor,
    mtl: torch.Tensor | None = None,
    *,
    min_count: int = 2,
    lam: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Consensus merging (TALL paper): keep mtl where at least ``min_count`` TALL masks are set.

    out = base + lam * [sum_t m_t >= min_count] * mtl, m_t as in :func:`tall_masks_ref`.
    """
    d = deltas(base, experts)
    m = task_sum(d) if mtl is None else mtl.float().reshape(1, -1)
    masks = tall_masks_ref(base, experts, lambdas, mtl).reshape(len(experts), -1)
    keep = masks.sum(0) >= min_count
    res = lam * (m.reshape(-1) * keep)
    if base is not None:
        res = base.float().reshape(-1) + res
    return res.reshape(experts[0].shape).to(out_dtype or experts[0].dtype)


@REFERENCE.kernel("consensus_merge")
def _reference(base, experts, lambdas, mtl, min_count, lam, out):
    out.copy_(consensus_merge_ref(base, experts, lambdas, mtl, min_count=min_count, lam=lam, out_dtype=out.dtype))
