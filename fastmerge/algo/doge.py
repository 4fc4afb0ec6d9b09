"""DOGE (adaptive projective gradient descent, Wei et al., ICML 2025) as its first author's FusionBench code does it
(../shared/spec/algorithms.md §2), batched over same-shape layers on fused kernels.

DOGE_TA, per selected layer l (W is m x n, r = min(m, n)), with T task vectors tau_i:

* lambda_i = eta / ||tau_i||_F (eta = 0.07; 0 for a zero task vector, where the official code divides by 0);
* a shared subspace: the top int(r/T) left singular vectors of every tau_i packed side by side (as TSV-M packs
  them), and B = the top int(r / subspace) left singular vectors of that packed matrix (subspace = 6);
* one modification Delta (m x n, zero at the start) minimising
  L(Delta) = sum_j sum_rows <tau_j[r], tau_j[r] - tau_m[r]>^2, tau_m = sum_i lambda_i tau_i + (sum_i lambda_i) Delta,
  by Adam (lr 1e-4, default betas, 400 steps, a fresh state per layer), each gradient's component in span(B)
  removed before the step;
* the merge theta = theta_0 + sum_i lambda_i ((tau_i + Delta) * M_i), M_i the top-K magnitude mask of tau_i over
  all selected layers together (K = 0.30, the official k-th-value threshold, ties kept; two streaming passes);
* every other tensor stays at the pretrained value.

DOGE_AM: one Delta_i per task, tau_m = sum_i lambda_i (tau_i + Delta_i), the subspace rank int(r/T); it writes
the modified task vectors (tau_i + Delta_i) * M_i (no lambda) as a task-vector store for AdaMerging.

Speed by construction: the loss is quadratic in Delta, so its gradient is closed-form,
dL/dDelta = c * G with G[r] = -2 sum_j (a_j[r] - <tau_j[r], D[r]>) tau_j[r], a_j = |tau_j|^2 - <tau_j, sum_i lambda_i
tau_i> per row (fixed), D = c Delta (TA; c = sum_i lambda_i) or sum_i lambda_i Delta_i (AM, where task i's
gradient is lambda_i G). Every step is three fused ops on the whole stack of same-shape layers, each layer with
its own Adam state: ``doge_grad`` (one pass over the task vectors), ``orth_project`` (G - B (B^T G)) and
``adam_step`` (one pass): the same iterates as the sequential per-layer loop with autograd, without the m x m
projector.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from . import subspace

# ---------------------------------------------------------------------------------------------------------
# the maths on stacks of same-shape layers: taus (G, T, m, n) fp32


def lambdas(taus: torch.Tensor, eta: float) -> torch.Tensor:
    """(G, T): eta / ||tau_i||_F per layer and task, 0 for zero task vectors."""
    norms = torch.linalg.vector_norm(taus.double(), dim=(-2, -1))
    return torch.where(norms > 0, eta / norms.clamp_min(1e-300), torch.zeros_like(norms)).float()


def shared_basis(taus: torch.Tensor, rank: int, mode: str = "fast") -> torch.Tensor:
    """(G, m, rank): the top left singular vectors of the packed top-int(r/T) left singular vectors of the tasks."""
    G, T, m, n = taus.shape
    k = subspace.tsv_pack_sizes(min(m, n), T)
    u, _, _ = subspace.svd_topk(taus.reshape(G * T, m, n), k, mode=mode)
    packed = u.reshape(G, T, m, k).permute(0, 2, 1, 3).reshape(G, m, T * k)
    if mode == "exact":  # the official zero slots: SVD of the m x r matrix
        packed = torch.nn.functional.pad(packed, (0, min(m, n) - T * k))
    return subspace.svd_topk(packed, min(rank, packed.shape[-1]), mode="exact" if mode == "exact" else "fast")[0]


def row_constants(taus: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """a_j[r] = |tau_j[r]|^2 - <tau_j[r], sum_i lambda_i tau_i[r]> (G, T, m), fp32 (as the reference's loss)."""
    s = torch.einsum("gt,gtmn->gmn", lam.to(taus.dtype), taus)
    return torch.einsum("gtmn,gtmn->gtm", taus, taus) - torch.einsum("gtmn,gmn->gtm", taus, s)


def optimize(taus: torch.Tensor, lam: torch.Tensor, basis: torch.Tensor, *, per_task: bool = False,
             steps: int = 400, lr: float = 1e-4, beta1: float = 0.9, beta2: float = 0.999,
             eps: float = 1e-8) -> torch.Tensor:
    """Adam on Delta with projected closed-form gradients; (G, m, n) for DOGE_TA, (G, T, m, n) per task."""
    G, T, m, n = taus.shape
    taus = taus.float().contiguous()
    a = row_constants(taus, lam).contiguous()
    shape = (G, T, m, n) if per_task else (G, m, n)
    delta = torch.zeros(shape, dtype=torch.float32, device=taus.device)
    m1, m2 = torch.zeros_like(delta), torch.zeros_like(delta)
    c = lam.sum(1)
    scale = (lam.reshape(-1) if per_task else c).contiguous()
    basis = basis.float().contiguous()
    # per-step temporaries are ordinary allocations, never the engine's per-tensor scratch (kept until the tensor
    # is written: hundreds of steps of it would grow without bound)
    with ops.allocating(None):
        for step in range(1, steps + 1):
            d = torch.einsum("gt,gtmn->gmn", lam, delta) if per_task else delta * c[:, None, None]
            g = ops.orth_project(ops.doge_grad(taus, a, d.contiguous()), basis)
            flat = delta.reshape(G * T if per_task else G, m, n)
            ops.adam_step(flat, g, m1.reshape(flat.shape), m2.reshape(flat.shape), scale,
                          repeat=T if per_task else 1, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step)
    return delta


def prepare_layers(taus: torch.Tensor, p: dict[str, Any], per_task: bool, mode: str):
    """lambdas, basis and the optimised Delta of a stack of layers."""
    G, T, m, n = taus.shape
    lam = lambdas(taus, float(p["eta"]))
    r = min(m, n)
    rank = int(r / T) if per_task else int(r / int(p["subspace"]))
    basis = shared_basis(taus, rank, mode)
    delta = optimize(taus, lam, basis, per_task=per_task, steps=int(p["steps"]), lr=float(p["lr"]),
                     beta1=float(p["beta1"]), beta2=float(p["beta2"]), eps=float(p["eps"]))
    return lam, delta


def masked(taus: torch.Tensor, delta: torch.Tensor, lo: list[float]) -> torch.Tensor:
    """(tau_i + Delta(_i)) * (|tau_i| >= lo_i): (G, T, m, n)."""
    thr = torch.tensor(lo, dtype=torch.float32, device=taus.device).reshape(1, -1, 1, 1)
    d = delta if delta.dim() == 4 else delta.unsqueeze(1)
    return (taus + d) * (taus.abs() >= thr)


def doge_ta_update(taus: torch.Tensor, lo: list[float], p: dict[str, Any], mode: str = "fast") -> torch.Tensor:
    """sum_i lambda_i ((tau_i + Delta) * M_i) for a stack of selected layers: (G, m, n) fp32."""
    lam, delta = prepare_layers(taus, p, False, mode)
    return torch.einsum("gt,gtmn->gmn", lam, masked(taus, delta, lo))


def doge_am_vectors(taus: torch.Tensor, lo: list[float], p: dict[str, Any], mode: str = "fast") -> torch.Tensor:
    """(tau_i + Delta_i) * M_i for a stack of selected layers: (G, T, m, n) fp32."""
    _, delta = prepare_layers(taus, p, True, mode)
    return masked(taus, delta, lo)
