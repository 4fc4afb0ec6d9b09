"""tall_masks: TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging and Compression"),
the experts' share of a multi-task vector: |delta_t| > lambda_t * |mtl - delta_t|."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check_buffer, check_experts, check_float, check_same, expert_list
from ._lib import contig, deltas, empty, host_floats, into, register, task_sum

SCHEMA = "tall_masks(Tensor? base, Tensor[] experts, Tensor lambdas, Tensor? mtl, Tensor(a!) masks) -> ()"


def check_inputs(base, experts, lambdas, mtl) -> None:
    """The inputs of the TALL ops (tall_masks, consensus_merge)."""
    check_experts(base, experts, lambdas, "lambdas")
    if mtl is not None:
        check_float("mtl", mtl)
        check_same("mtl", mtl, experts[0])


def _check(base, experts, lambdas, mtl, masks) -> None:
    check_inputs(base, experts, lambdas, mtl)
    check_buffer("masks", masks, torch.bool, (len(experts), *experts[0].shape), experts[0].device)


def _run(base, experts, lambdas, mtl, masks) -> None:
    base, experts = contig(base), [contig(e) for e in experts]
    fn = select("tall_masks", experts[0].device, (experts[0].dtype,), len(experts))
    lambdas, mtl = host_floats(lambdas), contig(mtl)
    into(masks, lambda m: fn(base, experts, lambdas, mtl, m))


register(SCHEMA, _check, _run)


def tall_inputs(experts, lambdas) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The experts of a TALL op's wrapper as a list, and one lambda per expert (a scalar is broadcast) as the
    fp32 (T,) table of its schema."""
    experts = expert_list(experts)
    return experts, torch.as_tensor(lambdas, dtype=torch.float32).reshape(-1).expand(len(experts)).contiguous()


def tall_masks(base, experts, lambdas, mtl=None) -> torch.Tensor:
    """TALL masks, bool (T, *shape): |delta_t| > lambda_t * |mtl - delta_t| (mtl = sum of deltas by default)."""
    experts, lam = tall_inputs(experts, lambdas)
    masks = empty((len(experts), *experts[0].shape), torch.bool, experts[0].device)
    torch.ops.fastmerge.tall_masks(base, experts, lam, mtl, masks)
    return masks


def tall_masks_ref(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    lambdas: torch.Tensor,
    mtl: torch.Tensor | None = None,
) -> torch.Tensor:
    """TALL masks: m_t = |delta_t| > lambda_t * |mtl - delta_t|, mtl = sum_t delta_t unless given.

    lambdas: fp32 (T,). mtl: optional multi-task vector of the experts' shape (e.g. a TIES merge).
    Returns bool (T, *shape).
    """
    d = deltas(base, experts)
    m = task_sum(d) if mtl is None else mtl.float().reshape(1, -1)
    lam = lambdas.float().to(d.device).reshape(-1, 1)
    return (d.abs() > lam * (m - d).abs()).reshape(len(experts), *experts[0].shape)


@REFERENCE.kernel("tall_masks")
def _reference(base, experts, lambdas, mtl, masks):
    masks.copy_(tall_masks_ref(base, experts, lambdas, mtl))
