"""The Triton kernels' Philox4x32-10 (kernels/_common.py) against the oracle every backend's random drops follow
(fastmerge/ops/philox.py); the C++ and CUDA generators are checked through the drops of prune and ties_merge."""

import os

import pytest
import torch
import triton_cases as tri

from fastmerge.ops.philox import philox_uniform

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from fastmerge._kernels._common import philox_u01, split_offset, u32_halves  # noqa: E402


@triton.jit(do_not_specialize=["off_al", "s_lo", "s_hi", "k_lo", "k_hi"])
def _u01_kernel(out_ptr, n, off_al, s_lo, s_hi, k_lo, k_hi, PHASE: tl.constexpr, BLOCK: tl.constexpr):
    G: tl.constexpr = BLOCK // 4
    start = tl.program_id(0).to(tl.int64) * BLOCK
    col = tl.arange(0, 4)[None, :]
    offs = start + tl.arange(0, G)[:, None] * 4 + col
    g_row = ((start + off_al.to(tl.int64)) >> 2) + tl.arange(0, G)[:, None].to(tl.int64)
    seed = (s_lo.to(tl.uint32, bitcast=True), s_hi.to(tl.uint32, bitcast=True))
    key = (k_lo.to(tl.uint32, bitcast=True), k_hi.to(tl.uint32, bitcast=True))
    u = philox_u01(g_row, col, seed[0], seed[1], key[0], key[1], PHASE)
    tl.store(out_ptr + offs, u, mask=offs < n)


@tri.test
@pytest.mark.parametrize(
    "seed,key,offset",
    [(0, 0, 0), (1, 2, 3), (-1, -1, 1), (2**32 + 5, 2**40 - 3, 2**33 + 2), (-(2**40), 7, 2**31 - 1), (12345, -7, 6)],
)
def test_triton_philox_matches_reference(seed, key, offset):
    n = 1001
    out = torch.empty(n, dtype=torch.float32, device=tri.DEV)
    off_al, phase = split_offset(offset)
    s_lo, s_hi = u32_halves(seed)
    k_lo, k_hi = u32_halves(key)
    _u01_kernel[(triton.cdiv(n, 512),)](out, n, off_al, s_lo, s_hi, k_lo, k_hi, PHASE=phase, BLOCK=512)
    tri.same(out, philox_uniform(n, seed, key, offset, tri.DEV))
