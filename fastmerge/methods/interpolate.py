"""nearswap, model_stock, sce, ram, ramplus_tl and arcee_fusion: mergekit 0.1.5's methods that weigh the base
against the fine-tuned models per element, per filter or by task-vector statistics, op for op in the inputs'
dtype, so that they give mergekit's bytes (its whole-tensor ops round every intermediate; the same ops here
round the same way). sce's top-k variance mask is ops.order_window's replay of torch.topk (same tie order, no
sort)."""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .base import REQUIRED, SHARED, Method, Param, TensorCall
from .registry import register


def _nearswap(c: TensorCall) -> torch.Tensor:
    """Take the other model's value where it is within t of the base, interpolate towards the base as
    t / |base - other| where it is farther."""
    a, b = c.base, c.experts[0]
    weight = (c.shared["t"] / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return (weight * b + (1 - weight) * a).to(c.out_dtype)


def _model_stock(c: TensorCall) -> torch.Tensor:
    """Model Stock: the average of the fine-tuned models, pulled towards the base by t = k cos / (1 + (k-1) cos)
    with cos the mean pairwise cosine of their task vectors (per tensor, or per row with ``filter_wise``); the
    base where 1 + (k-1) cos vanishes."""
    w0, ws = c.base, c.experts
    shape = w0.shape
    if c.shared["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1:]:
            norms = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
            cos.append(((oa * ob).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    den = 1 + (k - 1) * cos_theta
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    (k * cos_theta) / torch.where(singular, torch.ones_like(den), den))
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape).to(c.out_dtype)


def _sce(c: TensorCall) -> torch.Tensor:
    """SCE: keep the elements whose task vectors vary most across the models (top select_topk of the nonzero
    variances), elect signs by sum, weight each model by its task vector's mean square."""
    base, experts = c.base, c.experts
    if not experts:
        return base.to(c.out_dtype)
    tvs = torch.stack([x - base for x in experts], dim=0)
    density = c.shared["select_topk"]
    if density < 1:
        if density <= 0:
            tvs = tvs * torch.zeros_like(tvs[0])
        else:
            var = torch.var(tvs, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * density)
            keep = ops.order_window(var, 0, k, topk=True) if k else torch.zeros_like(var, dtype=torch.bool)
            tvs = tvs * keep.to(tvs.dtype).unsqueeze(0)
    vote = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = tvs.sign() == vote
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
    w = w.reshape(-1, *([1] * (tvs.dim() - 1))) * erase
    merged = (tvs * w).sum(dim=0) / torch.sum(w, dim=0).clamp(min=1e-6)
    return (base + merged).to(c.out_dtype)


_QUANTILES = (0.25, 0.5, 0.75)


def _order_stats(x: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """The values at positions int(q * (n - 1)) of sorted(x) (NaN last, as torch.sort), as a tensor of x's dtype:
    on the CPU one multi-kth introselect (numpy.partition, every 16-bit value exact in fp32), 4x faster than a
    full sort at 16M elements; elsewhere the sort."""
    idx = (torch.tensor(qs) * (x.numel() - 1)).long()
    if x.device.type != "cpu":
        return torch.sort(x).values[idx.to(x.device)]
    part = np.partition(x.float().numpy(), idx.tolist())
    return torch.from_numpy(part[idx.numpy()]).to(x.dtype)


def _arcee_fusion(c: TensorCall) -> torch.Tensor:
    """Arcee Fusion: take the other model's value where its importance |delta| * KL(softmax rows) reaches
    median + 1.5 IQR of the importances, the base elsewhere. mergekit estimates the quartiles from 1M random
    samples above 1M elements (its global RNG: not reproducible); fastmerge takes the exact quartiles there."""
    base, other = c.base, c.experts[0]
    diff = (other - base).abs()
    p = torch.nn.functional.softmax(other, dim=-1) + 1e-8
    q = torch.nn.functional.softmax(base, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del diff, p, q
    q1, median, q3 = _order_stats(importance.reshape(-1), _QUANTILES)
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return (base + (other - base) * mask).to(c.out_dtype)


def _ram_vectors(c: TensorCall):
    """Task vectors (T, N), which entries count (|tau| > epsilon), how many models count per entry."""
    tv = torch.stack([x - c.base for x in c.experts], dim=0).view(len(c.experts), -1)
    nonzero = tv.abs() > c.shared["epsilon"]
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv, nonzero, counts, counts > 1, counts == 1


def _ram(c: TensorCall) -> torch.Tensor:
    """RAM: entries one model changes take its task vector, entries several change take their mean."""
    if not c.experts:
        return c.base.to(c.out_dtype)
    tv, nonzero, counts, overlap, unique = _ram_vectors(c)
    z = tv * nonzero
    merged = ((z * unique) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return (c.base + merged.reshape_as(c.base)).to(c.out_dtype)


def _ramplus_tl(c: TensorCall) -> torch.Tensor:
    """RAM+ (tensor-local): as RAM, the unique entries of each model scaled by 1 + r * min(rho, alpha), rho its
    shared/unique entry ratio in this tensor."""
    if not c.experts:
        return c.base.to(c.out_dtype)
    tv, nonzero, counts, overlap, unique = _ram_vectors(c)
    eps = c.shared["epsilon"]
    rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=eps)
    lam = 1 + c.shared["r"] * rho.clamp(min=0, max=c.shared["alpha"])
    z = tv * nonzero
    merged = ((z * unique * lam.unsqueeze(-1)) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return (c.base + merged.reshape_as(c.base)).to(c.out_dtype)


register(
    Method("nearswap", (Param("t", SHARED, float, REQUIRED),), _nearswap, min_inputs=2, max_inputs=2,
           doc="the other model where it is within t of the base, else interpolated towards the base"),
    Method("model_stock", (Param("filter_wise", SHARED, bool, False),), _model_stock, min_inputs=3,
           doc="Model Stock: the experts' average pulled towards the base by their task vectors' mean cosine"),
    Method("sce", (Param("int8_mask", SHARED, bool, False), Param("select_topk", SHARED, float, 1.0)), _sce,
           doc="SCE: select the highest-variance elements, elect signs, weight models by mean square"),
    Method("ram", (Param("epsilon", SHARED, float, 1e-5),), _ram,
           doc="RAM: unique changes kept, overlapping changes averaged"),
    Method("ramplus_tl", (Param("r", SHARED, float, 0.1), Param("alpha", SHARED, float, 0.2),
                          Param("epsilon", SHARED, float, 1e-5)), _ramplus_tl,
           doc="RAM+ (tensor-local): RAM with unique changes rescaled by the tensor's shared/unique ratio"),
    Method("arcee_fusion", (), _arcee_fusion, min_inputs=2, max_inputs=2,
           doc="the other model where its KL-weighted importance passes median + 1.5 IQR, else the base"),
)
