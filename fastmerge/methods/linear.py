"""linear, slerp and passthrough: mergekit 0.1.5's maths, op for op, so that they give its bytes."""

from __future__ import annotations

import torch

from .base import INPUT, REQUIRED, SHARED, Method, Param, TensorCall
from .registry import register


def _linear(c: TensorCall) -> torch.Tensor:
    """mergekit's linear, op for op: an fp32 accumulator += x_i * w_i in config order (torch's addcmul), divided
    by the fp32 sum of the weights, rounded to the inputs' dtype: its bytes."""
    x0 = c.inputs[0]
    w = torch.tensor([p["weight"] for p in c.per_input], dtype=torch.float32)
    acc = torch.zeros_like(x0, dtype=torch.float32)
    for x, wi in zip(c.inputs, w.unbind(0), strict=True):
        acc.addcmul_(x, wi.to(x.device))
    if c.shared["normalize"]:
        acc.div_(w.sum().to(x0.device))
    return acc.to(x0.dtype).to(c.out_dtype)


def _passthrough(c: TensorCall) -> torch.Tensor:
    s = c.per_input[0].get("scale")
    x = c.inputs[0]
    return (x if s is None else x.float() * s).to(c.out_dtype)


_CHUNK = 1 << 20  # mergekit's slerp works through the flattened tensor in chunks of this many elements


def _slerp(c: TensorCall) -> torch.Tensor:
    """mergekit's slerp, op for op (its bytes): the flattened tensors' norms as norms of per-chunk norms, the
    normalised dot product as a sum of per-chunk sums, the angle and both coefficients as fp32 tensors (t rounded
    to fp32), each chunk's coef_a * x + coef_b * y rounded to the inputs' dtype; linear interpolation where the
    directions are (anti)parallel (|dot| > 0.9995). fp64 inputs work in fp64."""
    v0, v1 = c.base, c.experts[0]
    dt = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([float(c.shared["t"])], dtype=dt, device=a.device).reshape(-1, 1)
    n = a.shape[1]
    if n == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype).to(c.out_dtype)
    spans = [(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, i:j].to(dt), dim=1, keepdim=True)
                                                   for i, j in spans]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, i:j].to(dt), dim=1, keepdim=True)
                                                   for i, j in spans]), dim=0)
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    dot = torch.stack([(a[:, i:j].to(dt) / norm_a * (b[:, i:j].to(dt) / norm_b)).sum(dim=1, keepdim=True)
                       for i, j in spans]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    out = torch.empty_like(a)
    for i, j in spans:
        out[:, i:j] = coef_a * a[:, i:j].to(dt) + coef_b * b[:, i:j].to(dt)
    return out.reshape(v0.shape).to(c.out_dtype)


register(
    Method("linear", (Param("weight", INPUT, float), Param("normalize", SHARED, bool, True)), _linear,
           base="optional", doc="weighted average of the models"),
    Method("slerp", (Param("t", SHARED, float, REQUIRED, 0.0, 1.0),), _slerp, min_inputs=2, max_inputs=2,
           doc="spherical interpolation between the base (t=0) and one other model (t=1)"),
    Method("passthrough", (Param("scale", INPUT, float, None),), _passthrough, base="optional", max_inputs=1,
           doc="copy one model (optionally scaled)"),
)
