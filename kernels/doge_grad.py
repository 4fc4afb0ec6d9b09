"""doge_grad: DOGE's closed-form loss gradient (fp32), out[b, r] = -2 sum_j (a[b, j, r] - <taus[b, j, r], d[b, r]>)
taus[b, j, r]. One program per matrix row; when the row fits (n <= 8192) each task's row is loaded once and kept in
registers for both the dot product and the accumulation, otherwise the row is streamed in chunks twice.
"""

from __future__ import annotations

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
