"""ties_merge: fused trim / drop / elect / disjoint merge (TIES, DARE-TIES, Breadcrumbs-TIES, TA, linear).

One pass over the experts with O(1) registers in T: the merge is accumulated twice, once for the elements
agreeing with a positive sign (e_t > 0) and once for a negative one (e_t < 0), each in task order exactly as
the reference sums ``v_t * agree_t``; the elected sign then picks one of the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LAUNCH_OPTS,
    device_args,
    load_expert,
    nan_max,
    on_device,
    philox_u01,
    sign_f32,
    split_offset,
    tile_size,
    tl_dtype,
    u32_halves,
)


@triton.jit(do_not_specialize=["off_al", "s_lo", "s_hi", "k_lo", "k_hi"])
def _ties_merge_kernel(
    base_ptr,
    table_ptr,
    prm_ptr,
    out_ptr,
    counts_ptr,
    n,
    zero_sign,
    lam,
    off_al,
    s_lo,
    s_hi,
    k_lo,
    k_hi,
    T: tl.constexpr,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_BASE: tl.constexpr,
    HAS_OUT: tl.constexpr,
    ELECT: tl.constexpr,
    MERGE: tl.constexpr,
    WELECT: tl.constexpr,
    DROP_MASK: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per element, for t = 0..T-1 in order (fp32), with (w, lo, hi, p, s) = params[t]:
      d_t = expert_t - base;  x_t = d_t * [lo <= |d_t| < hi] * [u_t >= p] * s  (u_t: Philox, key + t)
      e_t = w * x_t if WELECT else x_t;  v_t = w * x_t
    ELECT 1: S = sum_t e_t; 2: S = sum_t sign(e_t); gamma = sign(S), zero_sign where S == 0;
    agree_t = (e_t > 0) if gamma > 0 else (e_t < 0) (ELECT 0: agree_t = 1, gamma = 1).
    MERGE 0: sum_t v_t agree_t; 1: that / max(sum_t agree_t, 1); 2: that / D, D = sum_t w agree_t (1 where
    |D| < 1e-8); 3: gamma * max_t |v_t agree_t|.  out = base + lam * merged;  counts += [#S > 0, #S < 0]."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    if DROP_MASK != 0:
        # [BLOCK / 4, 4] tile: one row per Philox group, so each block of 4 words is computed once
        G: tl.constexpr = BLOCK // 4
        col = tl.arange(0, 4)[None, :]
        offs = start + tl.arange(0, G)[:, None] * 4 + col
        g_row = ((start + off_al.to(tl.int64)) >> 2) + tl.arange(0, G)[:, None].to(tl.int64)
        s_lo_u = s_lo.to(tl.uint32, bitcast=True)
        s_hi_u = s_hi.to(tl.uint32, bitcast=True)
        k_lo_u = k_lo.to(tl.uint32, bitcast=True)
        k_hi_u = k_hi.to(tl.uint32, bitcast=True)
    else:
        offs = start + tl.arange(0, BLOCK)
    m = offs < n
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=m, other=0.0).to(tl.float32)
    zero = tl.zeros(offs.shape, tl.float32)
    ssum = zero
    # accumulators for gamma > 0 (suffix p) and gamma <= 0 (suffix n); without election only the p ones
    acc_p = zero
    acc_n = zero
    cnt_p = zero
    cnt_n = zero
    den_p = zero
    den_n = zero
    for t in tl.static_range(T):
        d = load_expert(table_ptr, t, offs, m, DTYPE, ALIGNED)
        if HAS_BASE:
            d = d - b
        w = tl.load(prm_ptr + 5 * t)
        lo = tl.load(prm_ptr + 5 * t + 1)
        hi = tl.load(prm_ptr + 5 * t + 2)
        sc = tl.load(prm_ptr + 5 * t + 4)
        a = tl.abs(d)
        x = d * ((a >= lo) & (a < hi)).to(tl.float32)
        if (DROP_MASK >> t) & 1:
            p = tl.load(prm_ptr + 5 * t + 3)
            # stream key + t (mod 2^64): add t to the low word with carry into the high word
            kl = k_lo_u + t
            kh = k_hi_u + (kl < k_lo_u).to(tl.uint32)
            u = philox_u01(g_row, col, s_lo_u, s_hi_u, kl, kh, PHASE)
            x = x * (u >= p).to(tl.float32)
        x = x * sc
        v = w * x
        if WELECT:
            e = v
        else:
            e = x
        if ELECT == 1:
            ssum = ssum + e
        elif ELECT == 2:
            ssum = ssum + sign_f32(e)
        if HAS_OUT:
            if ELECT == 0:
                if MERGE == 3:
                    acc_p = nan_max(acc_p, tl.abs(v))
                else:
                    acc_p = acc_p + v
                    if MERGE == 1:
                        cnt_p = cnt_p + 1.0
                    elif MERGE == 2:
                        den_p = den_p + w
            else:
                pos = (e > 0).to(tl.float32)
                neg = (e < 0).to(tl.float32)
                if MERGE == 3:
                    acc_p = nan_max(acc_p, tl.abs(v * pos))
                    acc_n = nan_max(acc_n, tl.abs(v * neg))
                else:
                    acc_p = acc_p + v * pos
                    acc_n = acc_n + v * neg
                    if MERGE == 1:
                        cnt_p = cnt_p + pos
                        cnt_n = cnt_n + neg
                    elif MERGE == 2:
                        den_p = den_p + w * pos
                        den_n = den_n + w * neg
    if ELECT != 0:
        n_pos = tl.sum(((ssum > 0) & m).to(tl.int32)).to(tl.int64)
        n_neg = tl.sum(((ssum < 0) & m).to(tl.int32)).to(tl.int64)
        tl.atomic_add(counts_ptr, n_pos, sem="relaxed")
        tl.atomic_add(counts_ptr + 1, n_neg, sem="relaxed")
    if HAS_OUT:
        if ELECT == 0:
            gamma = zero + 1.0
            acc = acc_p
            cnt = cnt_p
            den = den_p
        else:
            gamma = tl.where(ssum == 0, zero_sign, sign_f32(ssum))
            sel = gamma > 0
            acc = tl.where(sel, acc_p, acc_n)
            cnt = tl.where(sel, cnt_p, cnt_n)
            den = tl.where(sel, den_p, den_n)
        if MERGE == 1:
            acc = tl.div_rn(acc, tl.maximum(cnt, 1.0))  # IEEE division, as torch
        elif MERGE == 2:
            acc = tl.div_rn(acc, tl.where(tl.abs(den) < 1e-8, 1.0, den))
        elif MERGE == 3:
            acc = gamma * acc
        res = lam * acc
        if HAS_BASE:
            res = b + res
        tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=m)


def ties_merge(
    base, experts, params, out, counts, seed, key, offset, elect, merge, weighted_elect, zero_sign, lam
) -> None:
    """Fill out (may be None) with the TIES-family merge and add [#S > 0, #S < 0] to counts (int64, 2)."""
    elect, merge = int(elect), int(merge)
    if elect not in (0, 1, 2):
        raise ValueError(f"elect must be 0, 1 or 2, got {elect}")
    if merge not in (0, 1, 2, 3):
        raise ValueError(f"merge must be 0..3, got {merge}")
    T = len(experts)
    n = experts[0].numel() if T else 0
    if n == 0 or (out is None and elect == 0):
        return
    prm_cpu = params.detach().to("cpu", torch.float32).reshape(T, 5)
    drop_mask = 0
    for t, pt in enumerate(prm_cpu[:, 3].tolist()):
        if pt > 0:  # as the reference: NaN or p <= 0 never drops
            drop_mask |= 1 << t
    table, prm, aligned = device_args(experts, prm_cpu)
    off_al, phase = split_offset(offset)
    s_lo, s_hi = u32_halves(seed)
    k_lo, k_hi = u32_halves(key)
    block = tile_size(T, 1024)
    grid = (triton.cdiv(n, block),)
    with on_device(experts[0].device):
        _ties_merge_kernel[grid](
            base if base is not None else experts[0],
            table,
            prm,
            out if out is not None else experts[0],
            counts,
            n,
            float(zero_sign),
            float(lam),
            off_al,
            s_lo,
            s_hi,
            k_lo,
            k_hi,
            T=T,
            DTYPE=tl_dtype(experts[0].dtype),
            ALIGNED=aligned,
            HAS_BASE=base is not None,
            HAS_OUT=out is not None,
            ELECT=elect,
            MERGE=merge,
            WELECT=bool(weighted_elect),
            DROP_MASK=drop_mask,
            PHASE=phase if drop_mask else 0,
            BLOCK=block,
            num_warps=4,
            **LAUNCH_OPTS,
        )
