"""adam_step: torch.optim.Adam's update of every slice of a parameter, each slice with its own gradient scale, in
one fused pass (DOGE's optimiser step)."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check, check_same
from ._lib import contig, register

SCHEMA = ("adam_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor scale, "
          "int repeat, float lr, float beta1, float beta2, float eps, int step) -> ()")


def _check(param, grad, exp_avg, exp_avg_sq, scale, repeat, lr, beta1, beta2, eps, step) -> None:
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                    ("scale", scale)):
        check(t.dtype == torch.float32, lambda name=name, t=t: f"{name} must be float32, got {t.dtype}")
        check(t.device == param.device, lambda name=name, t=t: f"{name} is on {t.device}, param is on {param.device}")
    check_same("exp_avg", exp_avg, param, "param")
    check_same("exp_avg_sq", exp_avg_sq, param, "param")
    S = scale.numel()
    check(scale.dim() == 1 and param.dim() >= 1 and param.shape[0] == S,
          lambda: f"scale must be 1-D with one entry per slice of param (dim 0), got {tuple(scale.shape)} "
          f"for param {tuple(param.shape)}")
    check(repeat >= 1 and S % repeat == 0 and grad.dim() == param.dim() and grad.shape[0] * repeat == S
          and tuple(grad.shape[1:]) == tuple(param.shape[1:]),
          lambda: f"grad must have shape ({S} / repeat, *param.shape[1:]) with repeat={repeat}, got "
          f"{tuple(grad.shape)}")
    check(step >= 1, lambda: f"step must be >= 1, got {step}")
    check(0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0, lambda: f"betas must lie in [0, 1), got ({beta1}, {beta2})")


def _run(param, grad, exp_avg, exp_avg_sq, scale, *rest) -> None:
    check(param.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous(),
          lambda: "adam_step updates param, exp_avg and exp_avg_sq in place: they must be contiguous")
    fn = select("adam_step", param.device, (param.dtype,))
    fn(param, contig(grad), exp_avg, exp_avg_sq, contig(scale), *rest)


register(SCHEMA, _check, _run)


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              scale: torch.Tensor, *, repeat: int = 1, lr: float, beta1: float = 0.9, beta2: float = 0.999,
              eps: float = 1e-8, step: int) -> None:
    """In place: torch.optim.Adam's update of every slice of param (S, ...), slice s with gradient
    scale[s] * grad[s // repeat]: one fused pass instead of Adam's six."""
    torch.ops.fastmerge.adam_step(param, grad, exp_avg, exp_avg_sq, scale, int(repeat), float(lr), float(beta1),
                                  float(beta2), float(eps), int(step))


def adam_step_ref(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  scale: torch.Tensor, repeat: int, lr: float, beta1: float, beta2: float, eps: float,
                  step: int) -> None:
    """In place: torch.optim.Adam's single-tensor update (no weight decay, no amsgrad) of the S slices of
    ``param`` (S, ...), slice s with gradient scale[s] * grad[s // repeat]."""
    S = scale.numel()
    g = grad.repeat_interleave(repeat, 0) * scale.reshape(S, *([1] * (param.dim() - 1))).to(grad)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


REFERENCE.kernel("adam_step")(adam_step_ref)  # the oracle updates in place: it is the kernel as it stands
