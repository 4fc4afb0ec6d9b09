"""Shared Triton helpers (Philox4x32-10, magnitude keys, NaN-propagating max) and host-side utilities.

Mirrors the oracles of ``fastmerge/ops/`` (``philox.philox_uniform``, ``keys.abs_keys``) and
``csrc/include/fastmerge/philox.h`` bit for bit.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)
_TWO_M24 = tl.constexpr(5.9604644775390625e-08)  # 2^-24, exact in fp32

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1

# ----------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors of one shape: counter (c0, c1, c2, c3), key (k0, k1).

    Ten rounds, the key bumped by (W0, W1) before rounds 1..9; returns the four output words.
    """
    m0 = tl.full(c0.shape, _PHILOX_M0, tl.uint32)
    m1 = tl.full(c0.shape, _PHILOX_M1, tl.uint32)
    w0 = tl.full(c0.shape, _PHILOX_W0, tl.uint32)
    w1 = tl.full(c0.shape, _PHILOX_W1, tl.uint32)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def philox_group_words(g, s_lo, s_hi, k_lo, k_hi):
    """The four Philox words of group(s) g (int64 tensor, g = index >> 2) of the stream (seed, key).

    s_lo, s_hi, k_lo, k_hi: uint32 scalars (the 32-bit halves of seed and key).
    """
    zero = tl.zeros(g.shape, tl.uint32)
    c0 = g.to(tl.uint32)  # low 32 bits (truncation)
    c1 = (g >> 32).to(tl.uint32)
    return philox4x32_10(c0, c1, zero + k_lo, zero + k_hi, zero + s_lo, zero + s_hi)


@triton.jit
def _select_word(q, w0, w1, w2, w3):
    return tl.where(q == 0, w0, tl.where(q == 1, w1, tl.where(q == 2, w2, w3)))


@triton.jit
def philox_u01(g_row, col, s_lo, s_hi, k_lo, k_hi, PHASE: tl.constexpr):
    """Uniforms u = (word >> 8) * 2^-24 of a [G, 4] tile of consecutive element indices.

    Element (r, c) of the tile has index 4 * g_row[r] + c + PHASE, so the group of a row is g_row (and
    g_row + 1 for the columns with c + PHASE >= 4 when PHASE > 0). g_row: int64 [G, 1]; col: int32 [1, 4].
    Each Philox block is computed once per row (twice when PHASE > 0), not once per element.
    """
    q = col + PHASE
    a0, a1, a2, a3 = philox_group_words(g_row, s_lo, s_hi, k_lo, k_hi)
    w = _select_word(q & 3, a0, a1, a2, a3)
    if PHASE > 0:
        b0, b1, b2, b3 = philox_group_words(g_row + 1, s_lo, s_hi, k_lo, k_hi)
        w = tl.where(q >= 4, _select_word(q & 3, b0, b1, b2, b3), w)
    return (w >> 8).to(tl.float32) * _TWO_M24


@triton.jit
def abs_key(x):
    """Magnitude key bits(fp32(|x|)) as int32 in [0, 2^31)."""
    return x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def nan_max(m, v):
    """max(m, v) that propagates NaN like torch.amax (once NaN, stays NaN)."""
    return tl.where((v > m) | (v != v), v, m)


@triton.jit
def sign_f32(x):
    """torch.sign on fp32: +1, -1, 0 for zeros and NaN ((0 < x) - (x < 0))."""
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def load_expert(table_ptr, t: tl.constexpr, offs, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Load expert t (its address is entry t of the int64 pointer table) at offs, upcast to fp32."""
    ptr = tl.load(table_ptr + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


# ----------------------------------------------------------------------------------------------------------
# host helpers

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Launch options shared by every kernel: no FMA contraction, so that products are rounded before they are
# added, exactly as the reference (sign elections on weighted sums must be bit-exact).
LAUNCH_OPTS = {"enable_fp_fusion": False}


def tl_dtype(dtype: torch.dtype):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {dtype}; expected one of float32, float16, bfloat16") from None


def tile_size(T: int, max_block: int) -> int:
    """Elements per program for a kernel that reads T experts: max_block, halved while T tiles would need
    more than about 64 fp32 registers per thread at 4 warps (the compiler hoists the T loads), >= 256."""
    block = max_block
    while block > 256 and block * T > 64 * 128:
        block //= 2
    return block


def u32_halves(v: int) -> tuple[int, int]:
    """(lo, hi) 32-bit halves of v mod 2^64, each as a signed int32 value (bitcast to uint32 in-kernel)."""
    v = int(v) & _U64
    lo, hi = v & _U32, v >> 32
    return (lo - (1 << 32) if lo >= 1 << 31 else lo), (hi - (1 << 32) if hi >= 1 << 31 else hi)


def device_args(tensors, floats: torch.Tensor | None = None):
    """One host-to-device copy of the tensors' data pointers (int64) followed by ``floats`` (fp32, any
    shape, e.g. the per-task params). Returns (pointer table, fp32 floats or None, all pointers 16-byte
    aligned). On CUDA the staging buffer is pinned and the copy asynchronous, so no stream sync happens."""
    ptrs = [t.data_ptr() for t in tensors]
    device = tensors[0].device
    n_ptr = len(ptrs)
    flt = None if floats is None else floats.detach().to("cpu", torch.float32).reshape(-1)
    n_f64 = 0 if flt is None else (flt.numel() + 1) // 2
    host = torch.empty(n_ptr + n_f64, dtype=torch.int64, pin_memory=device.type == "cuda")
    host[:n_ptr] = torch.tensor(ptrs, dtype=torch.int64)
    if flt is not None:
        host[n_ptr:].view(torch.float32)[: flt.numel()] = flt
    dev = host.to(device, non_blocking=True)
    dev_floats = None if flt is None else dev[n_ptr:].view(torch.float32)
    return dev[:n_ptr], dev_floats, all(p % 16 == 0 for p in ptrs)


def on_device(device):
    """Context that makes ``device`` current for the launch (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def split_offset(offset: int) -> tuple[int, int]:
    """offset = off_al + phase with off_al a multiple of 4 and phase = offset & 3 (Philox group phase)."""
    offset = int(offset)
    phase = offset & 3
    return offset - phase, phase


def launch_tall(kernel, base, experts, lambdas, mtl, dest, *scalars) -> None:
    """Launch of the two TALL kernels (tall_masks, consensus_merge): (base, ptr table, lambdas, mtl, dest, n,
    *scalars)."""
    T = len(experts)
    n = experts[0].numel() if T else 0
    if n == 0:
        return
    table, lams, aligned = device_args(experts, lambdas)
    block = tile_size(T, 2048)
    with on_device(experts[0].device):
        kernel[(triton.cdiv(n, block),)](
            base if base is not None else experts[0],
            table,
            lams,
            mtl if mtl is not None else experts[0],
            dest,
            n,
            *scalars,
            T=T,
            DTYPE=tl_dtype(experts[0].dtype),
            ALIGNED=aligned,
            HAS_BASE=base is not None,
            HAS_MTL=mtl is not None,
            BLOCK=block,
            num_warps=4,
            **LAUNCH_OPTS,
        )


SEGMENT_BLOCK = 4096


def segment_blocks(offsets: torch.Tensor, device) -> tuple[torch.Tensor, int]:
    """The block table of the TTA kernels (tv_combine, tv_coef_grad): rows (segment, start, end) cutting each
    segment offsets[s]:offsets[s + 1] into blocks of at most SEGMENT_BLOCK elements, and the number of blocks."""
    off = offsets.tolist()
    rows = [(s, b, min(off[s + 1], b + SEGMENT_BLOCK)) for s in range(len(off) - 1)
            for b in range(off[s], off[s + 1], SEGMENT_BLOCK)]
    return torch.tensor(rows or [(0, 0, 0)], dtype=torch.int64, device=device), len(rows)
