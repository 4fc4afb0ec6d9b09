"""adam_step: torch.optim.Adam's single-tensor update (no weight decay) of param slices with a gradient scale per
slice, fp32: one pass over param, grad, exp_avg and exp_avg_sq instead of Adam's six elementwise kernels (DOGE's
optimiser step).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from ._common import LAUNCH_OPTS, on_device


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
