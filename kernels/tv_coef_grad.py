"""tv_coef_grad (test-time adaptation): the gradient of tv_combine's coefficients, sum_{p in seg} grad[p] *
taus[t, p]. Each program owns a block of one segment (segment_blocks) and writes one partial sum per (block, task),
reduced per segment in block order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTS, SEGMENT_BLOCK, on_device, segment_blocks


@triton.jit
def _coef_grad_kernel(g_ptr, t_ptr, tab_ptr, part_ptr, T, P, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    start = tl.load(tab_ptr + blk * 3 + 1)
    end = tl.load(tab_ptr + blk * 3 + 2)
    offs = start + tl.arange(0, BLOCK)
    m = offs < end
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    for t in range(T):
        x = tl.load(t_ptr + t * P + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(part_ptr + blk * T + t, tl.sum(g * x, axis=0))


def tv_coef_grad(grad, taus, offsets, out) -> None:
    T, P = taus.shape
    tab, nb = segment_blocks(offsets, taus.device)
    out.zero_()
    if nb == 0 or T == 0:
        return
    part = torch.empty(nb, T, dtype=torch.float32, device=taus.device)
    with on_device(taus.device):
        _coef_grad_kernel[(nb,)](grad, taus, tab, part, T, P, BLOCK=SEGMENT_BLOCK, num_warps=8, **LAUNCH_OPTS)
    seg = tab[:, 0]
    tot = torch.zeros(out.shape[1], T, dtype=torch.float64, device=taus.device).index_add_(0, seg, part.double())
    out.copy_(tot.T)
