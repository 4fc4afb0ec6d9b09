"""Test-time adaptation on the GPU: theta = base + sum_t coef[t, seg] * taus[t] and the coefficient gradient
sum_{p in seg} grad[p] * taus[t, p], over flat parameters cut into segments (one per tensor).

Each program owns a block of one segment (a block table built on the host: blocks never straddle segments, so
a block has one coefficient per task). tv_combine reads the T task-vector rows of its block once and writes
theta once; tv_coef_grad writes one partial sum per (block, task), reduced per segment in block order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTS, on_device

BLOCK = 4096


def _blocks(offsets: torch.Tensor, device) -> torch.Tensor:
    off = offsets.tolist()
    rows = [(s, b, min(off[s + 1], b + BLOCK)) for s in range(len(off) - 1) for b in range(off[s], off[s + 1], BLOCK)]
    return torch.tensor(rows or [(0, 0, 0)], dtype=torch.int64, device=device), len(rows)


@triton.jit
def _combine_kernel(base_ptr, t_ptr, c_ptr, tab_ptr, o_ptr, T, P, S, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    seg = tl.load(tab_ptr + blk * 3)
    start = tl.load(tab_ptr + blk * 3 + 1)
    end = tl.load(tab_ptr + blk * 3 + 2)
    offs = start + tl.arange(0, BLOCK)
    m = offs < end
    acc = tl.load(base_ptr + offs, mask=m, other=0.0)
    for t in range(T):
        w = tl.load(c_ptr + t * S + seg)
        acc += w * tl.load(t_ptr + t * P + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + offs, acc, mask=m)


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


def tv_combine(base, taus, coef, offsets, out) -> None:
    T, P = taus.shape
    tab, nb = _blocks(offsets, taus.device)
    if nb == 0:
        return
    with on_device(taus.device):
        _combine_kernel[(nb,)](base, taus, coef.to(taus.device), tab, out, T, P, coef.shape[1], BLOCK=BLOCK,
                               num_warps=8, **LAUNCH_OPTS)


def tv_coef_grad(grad, taus, offsets, out) -> None:
    T, P = taus.shape
    tab, nb = _blocks(offsets, taus.device)
    out.zero_()
    if nb == 0 or T == 0:
        return
    part = torch.empty(nb, T, dtype=torch.float32, device=taus.device)
    with on_device(taus.device):
        _coef_grad_kernel[(nb,)](grad, taus, tab, part, T, P, BLOCK=BLOCK, num_warps=8, **LAUNCH_OPTS)
    seg = tab[:, 0]
    tot = torch.zeros(out.shape[1], T, dtype=torch.float64, device=taus.device).index_add_(0, seg, part.double())
    out.copy_(tot.T)
