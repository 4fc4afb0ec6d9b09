"""The TALL-mask family: ``consensus_ta`` / ``consensus_ties`` (one model: task-vector entries kept where at
least k tasks' TALL masks agree), and the multi-task stores ``tall`` (shared tau_MTL + one mask per task) and
``emr`` (EMR-merging: tau_uni + one mask and scale per task), written by fastmerge.execute.sinks."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .. import ops
from ..algo import ties as sign_consensus
from ..execute.sinks import write_mask_store
from .base import NONBASE, SHARED, Method, Param, TensorCall
from .registry import register


def _mtl(c: TensorCall, ties: bool) -> torch.Tensor | None:
    """The multi-task vector (fp32): the sum of the task vectors, or their TIES dis-sum merge."""
    deltas = [sign_consensus.delta(x, c.base) for x in c.experts]
    T = len(deltas)
    if not ties:
        return ops.weighted_sum(deltas)
    lo = c.stats.get("lo")
    zero_sign = c.stats.get("zero_sign")
    if lo is None:
        lo = [sign_consensus.magnitude_threshold_for(d, p["density"], "official")
              for d, p in zip(deltas, c.expert_params, strict=True)]
    params = ops.ties_params(T, lo=lo)
    if zero_sign is None:
        counts = ops.ties_merge(None, deltas, params, elect="sum", merge="sum", write=False)[1]
        zero_sign = float(torch.sign(counts[0] - counts[1]))
    return ops.ties_merge(None, deltas, params, elect="sum", merge="sum", zero_sign=zero_sign)[0]


def _consensus(ties: bool) -> Callable[[TensorCall], torch.Tensor]:
    def run(c: TensorCall) -> torch.Tensor:
        lams = [p["tall_lambda"] for p in c.expert_params]
        mtl = _mtl(c, True) if ties else None
        return ops.consensus_merge(c.base, c.experts, lams, mtl, min_count=int(c.shared["k"]), lam=c.shared["lambda"],
                                   out_dtype=c.out_dtype)

    return run


def tall_parts(c: TensorCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shared task vector tau_MTL (fp32), bool masks (T, *shape), fp64 (T, 2) stats unused by TALL)."""
    mtl = _mtl(c, c.shared["mtl"] == "ties")
    masks = ops.tall_masks(c.base, c.experts, [p["tall_lambda"] for p in c.expert_params], mtl)
    return mtl, masks, torch.zeros(len(c.experts), 2, dtype=torch.float64)


def emr_parts(c: TensorCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ops.emr_elect(c.base, c.experts)

_TALL_PARAMS = (Param("tall_lambda", NONBASE, float, 0.4, 0.0), Param("density", NONBASE, float, 0.2, 0.0, 1.0))
_CONSENSUS_PARAMS = (Param("lambda", SHARED, float, 1.0), Param("k", SHARED, int, 2, 0.0), *_TALL_PARAMS)

register(
    Method("consensus_ta", _CONSENSUS_PARAMS, _consensus(False),
           doc="TALL-mask consensus over the task-arithmetic vector"),
    Method("consensus_ties", _CONSENSUS_PARAMS, _consensus(True), global_trim=True,
           doc="TALL-mask consensus over the TIES (dis-sum) vector"),
    Method("tall", (Param("mtl", SHARED, str, "ta"), *_TALL_PARAMS), None, global_trim=True,
           sink=functools.partial(write_mask_store, parts=tall_parts, rescale=False),
           doc="TALL masks: a multi-task store (shared tau_MTL + one packed mask per task)"),
    Method("emr", (), None, sink=functools.partial(write_mask_store, parts=emr_parts, rescale=True),
           doc="EMR-merging: a multi-task store (tau_uni + one packed mask and scale per task)"),
)
