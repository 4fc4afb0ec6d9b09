"""multislerp, karcher and nuslerp: mergekit 0.1.5's interpolations on the hypersphere (barycentric slerp
through the tangent space at the weighted mean; the Riemannian (Karcher) mean of the unit directions; slerp of
two models' (task) vectors per row or flattened), op for op in the inputs' dtype with mergekit's fp32 norms,
so that they give its bytes."""

from __future__ import annotations

import torch

from .base import NONBASE, SHARED, Method, Param, TensorCall
from .registry import register


def _multislerp(c: TensorCall) -> torch.Tensor:
    entries, base = c.experts, c.base
    if len(entries) == 1:
        return entries[0].to(c.out_dtype)
    x = torch.stack(entries, dim=0)
    if base is not None:
        x -= base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor([p["weight"] for p in c.expert_params], dtype=x.dtype, device=x.device)
    if c.shared["normalize_weights"]:
        w = w / w.sum()
    eps = c.shared["eps"]
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] == 2:  # antipodal pair: mergekit falls back to the linear interpolation
            res = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
            return (res if base is None else res + base).to(c.out_dtype)
        raise ValueError("multislerp: the weighted sum of the unit task vectors is zero (antipodal inputs with "
                         "balancing weights); choose other weights")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tnorm = torch.norm(tangent) + eps
    res = mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)
    res = (res * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return (res if base is None else res + base).to(c.out_dtype)


def _karcher(c: TensorCall) -> torch.Tensor:
    """The Karcher mean of the models' unit directions (equal weights, at most ``max_iter`` steps of the
    exponential map until the tangent norm drops below ``tol``), scaled by their mean norm."""
    xs = list(c.inputs)
    if len(xs) == 1:
        return xs[0].to(c.out_dtype)
    max_iter, tol = c.shared["max_iter"], c.shared["tol"]
    alphas = [1.0 / len(xs)] * len(xs)
    nd = torch.float32
    norms, units = [], []
    for x in xs:
        n = torch.linalg.vector_norm(x.to(nd))
        norms.append(n)
        units.append(torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in xs).to(c.out_dtype)
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u, strict=True):
        mean += ai * ui
    mn = torch.linalg.vector_norm(mean.to(nd))
    mean = u[0].clone() if mn.item() < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        tn = torch.linalg.vector_norm(tangent.to(nd))
        if tn.item() < tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
        un = torch.linalg.vector_norm(mean.to(nd))
        if un.item() > tol:
            mean = (mean / un).to(mean.dtype)
    scale = sum(ai * n for ai, n in zip(alphas, norms, strict=True))
    return (scale * mean).to(c.out_dtype)


def _nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool,
                  eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(shape)


def _nuslerp(c: TensorCall) -> torch.Tensor:
    """slerp of the two non-base models (or of their task vectors, with a base) at t = w1 / (w0 + w1), per row
    (``nuslerp_row_wise``: per column of the weight), or of the flattened tensors (``nuslerp_flatten``)."""
    (x0, x1), base = c.experts, c.base
    w = [p["weight"] for p in c.expert_params]
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    dim = 0 if c.shared["nuslerp_row_wise"] else -1
    flatten = c.shared["nuslerp_flatten"]
    if base is not None:
        return (base + _nuslerp_pair(t, x0 - base, x1 - base, dim, flatten)).to(c.out_dtype)
    return _nuslerp_pair(t, x0, x1, dim, flatten).to(c.out_dtype)


register(
    Method("multislerp", (Param("weight", NONBASE, float), Param("normalize_weights", SHARED, bool, True),
                          Param("eps", SHARED, float, 1e-8)), _multislerp, base="optional",
           min_nonbase=1,
           doc="barycentric slerp of the (task) vectors through the tangent space at their weighted mean"),
    Method("karcher", (Param("max_iter", SHARED, int, 10, 0), Param("tol", SHARED, float, 1e-5)), _karcher,
           base="optional", doc="Karcher (Riemannian) mean of the models' directions, scaled by their mean norm"),
    Method("nuslerp", (Param("weight", NONBASE, float), Param("nuslerp_row_wise", SHARED, bool, False),
                       Param("nuslerp_flatten", SHARED, bool, True)), _nuslerp, base="optional",
           min_nonbase=2, max_nonbase=2, doc="slerp of two models (or their task vectors) at t = w1 / (w0 + w1)"),
)
