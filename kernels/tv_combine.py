"""tv_combine (test-time adaptation): theta = base + sum_t coef[t, seg] * taus[t] over flat parameters cut into
segments (one per tensor). Each program owns a block of one segment (segment_blocks: blocks never straddle
segments, so a block has one coefficient per task); it reads the T task-vector rows of its block once and writes
theta once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import LAUNCH_OPTS, SEGMENT_BLOCK, on_device, segment_blocks


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


def tv_combine(base, taus, coef, offsets, out) -> None:
    T, P = taus.shape
    tab, nb = segment_blocks(offsets, taus.device)
    if nb == 0:
        return
    with on_device(taus.device):
        _combine_kernel[(nb,)](base, taus, coef.to(taus.device), tab, out, T, P, coef.shape[1], BLOCK=SEGMENT_BLOCK,
                               num_warps=8, **LAUNCH_OPTS)
