"""DOGE's optimisation step on the GPU (fp32): the closed-form loss gradient and a fused Adam update.

doge_grad: out[b, r] = -2 sum_j (a[b, j, r] - <taus[b, j, r], d[b, r]>) taus[b, j, r]. One program per matrix
row; when the row fits (n <= 8192) each task's row is loaded once and kept in registers for both the dot product
and the accumulation, otherwise the row is streamed in chunks twice.

adam_step: torch.optim.Adam's single-tensor update (no weight decay) of param slices with a gradient scale per
slice (one pass over param, grad, exp_avg and exp_avg_sq instead of Adam's six elementwise kernels).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTS, on_device

_ONE_CHUNK = 8192


@triton.jit
def _doge_grad_row_kernel(t_ptr, a_ptr, d_ptr, o_ptr, T, M, N, BN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // M
    r = row % M
    cols = tl.arange(0, BN)
    cm = cols < N
    dv = tl.load(d_ptr + row * N + cols, mask=cm, other=0.0)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for j in range(T):
        base = ((b * T + j) * M + r) * N
        tv = tl.load(t_ptr + base + cols, mask=cm, other=0.0)
        dot = tl.sum(tv * dv, axis=0)
        coef = -2.0 * (tl.load(a_ptr + (b * T + j) * M + r) - dot)
        acc += coef * tv
    tl.store(o_ptr + row * N + cols, acc, mask=cm)


@triton.jit
def _doge_grad_chunked_kernel(t_ptr, a_ptr, d_ptr, o_ptr, T, M, N, BN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // M
    r = row % M
    offs = tl.arange(0, BN)
    for j in range(T):
        base = ((b * T + j) * M + r) * N
        dot = tl.zeros((BN,), dtype=tl.float32)
        for c0 in range(0, N, BN):
            cols = c0 + offs
            cm = cols < N
            dot += tl.load(t_ptr + base + cols, mask=cm, other=0.0) * tl.load(d_ptr + row * N + cols, mask=cm,
                                                                               other=0.0)
        coef = -2.0 * (tl.load(a_ptr + (b * T + j) * M + r) - tl.sum(dot, axis=0))
        for c0 in range(0, N, BN):
            cols = c0 + offs
            cm = cols < N
            tv = tl.load(t_ptr + base + cols, mask=cm, other=0.0)
            if j == 0:
                prev = tl.zeros((BN,), dtype=tl.float32)
            else:
                prev = tl.load(o_ptr + row * N + cols, mask=cm, other=0.0)
            tl.store(o_ptr + row * N + cols, prev + coef * tv, mask=cm)


def doge_grad(taus: torch.Tensor, a: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> None:
    B, T, M, N = taus.shape
    if B * M == 0 or N == 0:
        return
    if T == 0:
        out.zero_()
        return
    with on_device(taus.device):
        if N <= _ONE_CHUNK:
            bn = max(16, triton.next_power_of_2(N))
            _doge_grad_row_kernel[(B * M,)](taus, a, d, out, T, M, N, BN=bn, num_warps=4 if bn <= 2048 else 8,
                                            **LAUNCH_OPTS)
        else:
            _doge_grad_chunked_kernel[(B * M,)](taus, a, d, out, T, M, N, BN=2048, num_warps=8, **LAUNCH_OPTS)


@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, n, inner, repeat, w1, b2, w2, step_size, bc2_sqrt, eps,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    sl = offs // inner
    gi = tl.load(s_ptr + sl, mask=mask, other=0.0) * tl.load(g_ptr + (sl // repeat) * inner + (offs - sl * inner),
                                                             mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    if w1 < 0.5:
        m = m + w1 * (gi - m)
    else:
        m = gi - (gi - m) * (1.0 - w1)
    v = v * b2 + w2 * gi * gi
    p = p + (-step_size) * (m / (tl.sqrt_rn(v) / bc2_sqrt + eps))
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, p, mask=mask)


def adam_step(param, grad, exp_avg, exp_avg_sq, scale, repeat, lr, beta1, beta2, eps, step) -> None:
    n = param.numel()
    S = scale.numel()
    if n == 0 or S == 0:
        return
    inner = n // S
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    block = 1024
    with on_device(param.device):
        _adam_kernel[(triton.cdiv(n, block),)](param, grad, exp_avg, exp_avg_sq, scale, n, inner, int(repeat),
                                               float(1.0 - beta1), float(beta2), float(1.0 - beta2),
                                               float(lr / bc1), float(math.sqrt(bc2)), float(eps), BLOCK=block,
                                               num_warps=4, **LAUNCH_OPTS)
