"""orth_project: out = X - U (U^T X) for a stack of matrices, U (B, m, k) with k <= 128.

One program owns a block of BN columns of one matrix: it streams the column block once to accumulate
C = U^T X_blk (k x BN, fp32, in registers), then a second time to write X_blk - U C. C never goes to memory,
so the op costs two reads of X (the second mostly from L2) and one write, against three reads, one write
and the k x n intermediate for two cuBLAS GEMMs. For k > 128 the projection is compute-bound and the two
GEMMs (cuBLAS) are the better kernel, so the launcher uses them.

fp32 inputs are multiplied in IEEE fp32 (no TF32: Iso-CTS and DOGE feed the result to eigensolvers);
fp16/bf16 inputs use the tensor cores' native precision with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTS, on_device

MAX_K = 128


@triton.jit
def _orth_project_kernel(x_ptr, u_ptr, out_ptr, M, N, K,
                         sxb, sxm, sxn, sub, sum_, suk, sob, som, son,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    cmask = cols < N
    kmask = ks < K
    xb = x_ptr + b * sxb
    ub = u_ptr + b * sub
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rows = m0 + tl.arange(0, BM)
        rmask = rows < M
        x = tl.load(xb + rows[:, None] * sxm + cols[None, :] * sxn, mask=rmask[:, None] & cmask[None, :], other=0.0)
        u = tl.load(ub + rows[:, None] * sum_ + ks[None, :] * suk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(u.to(tl.float32)), x.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(u), x)
    ob = out_ptr + b * sob
    for m0 in range(0, M, BM):
        rows = m0 + tl.arange(0, BM)
        rmask = rows < M
        xm = rmask[:, None] & cmask[None, :]
        x = tl.load(xb + rows[:, None] * sxm + cols[None, :] * sxn, mask=xm, other=0.0).to(tl.float32)
        u = tl.load(ub + rows[:, None] * sum_ + ks[None, :] * suk, mask=rmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        y = x - tl.dot(u, acc, input_precision="ieee")
        tl.store(ob + rows[:, None] * som + cols[None, :] * son, y.to(out_ptr.dtype.element_ty), mask=xm)


def orth_project(x: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> None:
    """out (B, m, n) = x - u (u^T x); x (B, m, n), u (B, m, k), any strides."""
    B, M, N = x.shape
    K = u.shape[-1]
    if B == 0 or M == 0 or N == 0:
        return
    if K == 0:
        out.copy_(x)
        return
    if K > MAX_K:
        xf, uf = x.float(), u.float()
        out.copy_(torch.baddbmm(xf, uf, uf.mT @ xf, alpha=-1.0))
        return
    if u.dtype != x.dtype:
        u = u.to(x.dtype)
    bk = max(16, triton.next_power_of_2(K))
    bn = 64 if bk <= 64 else 32
    bm = 64 if bk <= 64 else 32
    grid = (triton.cdiv(N, bn), B)
    with on_device(x.device):
        _orth_project_kernel[grid](x, u, out, M, N, K, *x.stride(), *u.stride(), *out.stride(),
                                   BM=bm, BN=bn, BK=bk, IEEE=x.dtype == torch.float32, num_warps=4, **LAUNCH_OPTS)
