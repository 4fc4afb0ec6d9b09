"""emr_elect: EMR-Merging's elect / mask / rescale statistics for one tensor, in one pass."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check_buffer, check_experts, check_float, check_same, expert_list
from ._lib import contig, deltas, empty, into, register, task_sum

SCHEMA = ("emr_elect(Tensor? base, Tensor[] experts, Tensor(a!) tau_uni, Tensor(b!) masks, Tensor(c!) stats) "
          "-> ()")


def _check(base, experts, tau_uni, masks, stats) -> None:
    check_experts(base, experts)
    check_float("tau_uni", tau_uni)
    check_same("tau_uni", tau_uni, experts[0])
    check_buffer("masks", masks, torch.bool, (len(experts), *experts[0].shape), experts[0].device)
    check_buffer("stats", stats, torch.float64, (len(experts), 2), experts[0].device)


def _run(base, experts, tau_uni, masks, stats) -> None:
    base, experts = contig(base), [contig(e) for e in experts]
    fn = select("emr_elect", experts[0].device, (experts[0].dtype, tau_uni.dtype), len(experts))
    into(tau_uni, lambda u: into(masks, lambda m: fn(base, experts, u, m, stats)))


register(SCHEMA, _check, _run)


def emr_elect(base, experts, out_dtype: torch.dtype = torch.float32):
    """EMR elect: (tau_uni, bool masks (T, *shape), fp64 (T, 2) [sum |delta_t|, sum |tau_uni| mask_t])."""
    experts = expert_list(experts)
    e0 = experts[0]
    uni = empty(e0.shape, out_dtype, e0.device)
    masks = empty((len(experts), *e0.shape), torch.bool, e0.device)
    stats = torch.zeros(len(experts), 2, dtype=torch.float64, device=e0.device)
    torch.ops.fastmerge.emr_elect(base, experts, uni, masks, stats)
    return uni, masks, stats


def emr_elect_ref(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EMR-Merging's elect / mask / rescale statistics for one tensor.

    flag = +1 where sum_t delta_t > 0 else -1 (a zero sum gives -1, as the official code);
    agree_t = delta_t * flag > 0; tau_uni = flag * max_t |delta_t| agree_t.
    Returns (tau_uni in ``out_dtype``, bool masks (T, *shape) = agree_t,
    fp64 (T, 2) = [sum |delta_t|, sum |tau_uni| * agree_t]). The rescaler of task t is
    sum over tensors of mean|delta_t| / sum over tensors of mean|tau_uni * mask_t|.
    """
    d = deltas(base, experts)
    flag = torch.where(task_sum(d).reshape(-1) > 0, 1.0, -1.0)
    agree = d * flag > 0
    uni = flag * (d.abs() * agree).amax(0)
    stats = torch.stack([d.abs().double().sum(1), (uni.abs() * agree).double().sum(1)], dim=1)
    shape = experts[0].shape
    return uni.reshape(shape).to(out_dtype), agree.reshape(len(experts), *shape), stats


@REFERENCE.kernel("emr_elect")
def _reference(base, experts, tau_uni, masks, stats):
    uni, m, st = emr_elect_ref(base, experts, tau_uni.dtype)
    tau_uni.copy_(uni)
    masks.copy_(m)
    stats += st.to(stats.device)
