"""gta_merge: mergekit's generalised task arithmetic after sparsification — weight the (masked, rescaled) task
vectors, optionally elect signs by their sum, combine, normalise, scale, add the base — rounding as mergekit's
whole-tensor ops do in the inputs' dtype, so its result is mergekit's to the bit; one pass, no (T, N)
intermediates (csrc/cpu/gta_merge.cpp)."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check, check_experts, check_float
from ._lib import contig, into, register

SCHEMA = ("gta_merge(Tensor base, Tensor[] experts, Tensor[] keep, Tensor params, bool consensus, bool normalize, "
          "float lam, Tensor(a!) out) -> ()")


def _check(base, experts, keep, params, consensus, normalize, lam, out) -> None:
    check_experts(base, experts)
    T = len(experts)
    check(len(keep) in (0, T), lambda: f"keep must be empty or hold one mask per expert ({T}), got {len(keep)}")
    for i, k in enumerate(keep):
        check(k.numel() == 0 or (k.dtype == torch.bool and tuple(k.shape) == tuple(base.shape)),
              lambda i=i, k=k: f"keep[{i}] must be empty or bool of shape {tuple(base.shape)}, got {k.dtype} "
                               f"{tuple(k.shape)}")
    check(params.dtype == torch.float64 and tuple(params.shape) == (T, 2),
          lambda: f"params must be float64 of shape ({T}, 2) [weight, scale], got {params.dtype} "
                  f"{tuple(params.shape)}")
    check_float("out", out)
    check(tuple(out.shape) == tuple(base.shape), lambda: f"out has shape {tuple(out.shape)}, base has "
                                                         f"{tuple(base.shape)}")


def _run(base, experts, keep, params, consensus, normalize, lam, out) -> None:
    fn = select("gta_merge", base.device, (base.dtype,))
    if base.dtype == torch.float32 and len(experts) > 4:
        # torch's fp32 sum over five or more rows is not a sequential sum (the fused kernels' order): there the
        # oracle's own whole-tensor sums give mergekit's bits
        fn = REFERENCE.fn("gta_merge")
    into(out, lambda o: fn(contig(base), [contig(e) for e in experts], [contig(k) for k in keep],
                           params.detach().cpu().contiguous(), consensus, normalize, lam, o))


register(SCHEMA, _check, _run)


def gta_merge(base: torch.Tensor, experts: list[torch.Tensor], keep: list[torch.Tensor] | None, weights: list[float],
              scales: list[float] | None = None, *, consensus: bool, normalize: bool, lam: float = 1.0,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """See gta_merge_ref; ``weights`` and ``scales`` are rounded to the inputs' dtype here, as mergekit's
    tensors of them are."""
    T = len(experts)
    dt = base.dtype
    w = torch.tensor(weights, dtype=dt).double()
    s = torch.ones(T, dtype=torch.float64) if scales is None else torch.tensor(scales, dtype=torch.float64)
    out = torch.empty(base.shape, dtype=out_dtype or dt, device=base.device)
    torch.ops.fastmerge.gta_merge(base, experts, list(keep or []), torch.stack([w, s], 1), bool(consensus),
                                  bool(normalize), float(lam), out)
    return out


def gta_merge_ref(base, experts, keep, params, consensus, normalize, lam, out_dtype=None) -> torch.Tensor:
    """mergekit 0.1.5's generalized_task_arithmetic after sparsification, op for op in base's dtype.

    base, experts[t]: one shape and floating dtype. keep: [] or per task a bool mask (or an empty tensor: keep
    all). params: float64 (T, 2), per task [weight, scale], values of the dtype. Per task
    d_t = (experts[t] - base) * keep_t * scale_t * weight_t (each product rounded to the dtype). consensus:
    majority sign of sum_t d_t (>= 0: +), keep d_t whose sign is it, mixed = sum of the kept d_t, divisor = sum
    of their weights (1 where 0); else mixed = sum_t d_t, divisor = sum_t weight_t (1 where |.| < 1e-8).
    normalize: mixed / divisor; lam != 1: mixed * lam; result base + mixed in base's dtype, then out_dtype.
    Sums over tasks are torch's sums over the task dimension of a (T, ...) stack."""
    dt = base.dtype
    deltas = torch.stack([e - base for e in experts])
    for t, k in enumerate(keep):
        if k.numel():
            deltas[t].mul_(k)
    p = params.to(device=base.device)
    shape = (-1, *([1] * base.dim()))
    deltas.mul_(p[:, 1].to(dt).reshape(shape))
    w = p[:, 0].to(dt).reshape(shape)
    deltas.mul_(w)
    if consensus:
        sign = deltas.sign()
        mask = sign == ((deltas.sum(dim=0) >= 0).to(dt) * 2 - 1)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(dt).to(out_dtype or dt)


@REFERENCE.kernel("gta_merge")
def _reference(base, experts, keep, params, consensus, normalize, lam, out):
    out.copy_(gta_merge_ref(base, experts, keep, params, consensus, normalize, lam, out.dtype))
