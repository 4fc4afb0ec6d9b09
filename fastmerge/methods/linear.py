"""linear, slerp and passthrough: mergekit 0.1.5's maths. linear gives its bytes (its fp32 accumulation, op for
op); slerp is its fp32 formula on the weighted-sum kernel, within one rounding of it."""

from __future__ import annotations

import math

import torch

from .. import ops
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


def _slerp(c: TensorCall) -> torch.Tensor:
    """mergekit's slerp of the whole flattened tensor: base at t=0, the other model at t=1 (fp32 maths)."""
    t = float(c.shared["t"])
    v0, v1 = c.base, c.experts[0]
    a, b = v0.reshape(-1).float(), v1.reshape(-1).float()
    if a.numel() == 0:
        return v0.to(c.out_dtype)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > 1e-8 else torch.ones_like(na)
    nb = nb if nb > 1e-8 else torch.ones_like(nb)
    dot = float(torch.dot(a / na, b / nb).clamp(-1, 1))
    if abs(dot) > 0.9995:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        st = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / st, math.sin(t * theta) / st
    return ops.weighted_sum([v0, v1], [ca, cb], out_dtype=c.out_dtype)


register(
    Method("linear", (Param("weight", INPUT, float), Param("normalize", SHARED, bool, True)), _linear,
           base="optional", doc="weighted average of the models"),
    Method("slerp", (Param("t", SHARED, float, REQUIRED, 0.0, 1.0),), _slerp, min_inputs=2, max_inputs=2,
           doc="spherical interpolation between the base (t=0) and one other model (t=1)"),
    Method("passthrough", (Param("scale", INPUT, float, None),), _passthrough, base="optional", max_inputs=1,
           doc="copy one model (optionally scaled)"),
)
