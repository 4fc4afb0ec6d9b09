// ties_merge: fused trim / drop / elect / disjoint merge (fastmerge/ops/ties_merge.py), one pass over
// the experts with no T x N temporaries.
//
// Per element and task t (fp32, t = 0 .. T-1 in order, every operation rounded as the reference's tensor op):
//   d_t = expert_t - base, x_t = ((d_t * keep_t) * s_t), keep_t = [lo_t <= |d_t| < hi_t] [u_t >= p_t if p_t > 0]
//   v_t = w_t * x_t, e_t = weighted_elect ? v_t : x_t
//   s = sum_t e_t ("sum") or sum_t sign(e_t) ("count"); gamma = s == 0 ? zero_sign : sign(s)
//   agree_t = gamma > 0 ? e_t > 0 : e_t < 0   (all ones with elect "none")
// The merge needs agree_t, which depends on gamma, which depends on every task. Instead of a second pass
// over the experts, the kernel accumulates both candidates while streaming: acc+ with agree_t = (e_t > 0)
// and acc- with agree_t = (e_t < 0) (and likewise the count / weight denominators and the max), each in
// the reference's order and rounding, then keeps the one gamma selects. Bit-identical to the reference and
// each expert is read once; the price is a second set of accumulators in registers.
// Each thread takes 8 consecutive elements per step (16-byte loads when aligned) and prefetches the next
// expert's chunk while it processes the current one.
#pragma once

#include "common.cuh"

namespace fastmerge {
namespace cuda {

constexpr int kTiesThreads = 256;

enum ElectMode : int { kElectNone = 0, kElectSum = 1, kElectCount = 2 };
// Merge modes as template parameter; kMergeCountsOnly: no output, only the sign counts.
enum MergeMode : int { kMergeSum = 0, kMergeMean = 1, kMergeWMean = 2, kMergeMax = 3, kMergeCountsOnly = 4 };

struct TiesArgs {
  const void* experts[kMaxTasks];  // T pointers to n elements of Tin
  const void* base;                // nullptr: the experts are the task vectors
  void* out;                       // n elements of out_dtype (unused with kMergeCountsOnly)
  unsigned long long* counts;      // int64 [2] = [#s > 0, #s < 0], accumulated
  float w[kMaxTasks], lo[kMaxTasks], hi[kMaxTasks], p[kMaxTasks], s[kMaxTasks];
  int64_t n;
  uint64_t seed, key, offset;  // task t draws from stream (seed, key + t)
  int T;                       // 1 .. kMaxTasks
  int elect;                   // ElectMode
  int out_dtype;               // DType of out
  float zero_sign;             // fp32(zero_sign)
  float lam;                   // fp32(lam)
  bool weighted_elect;
  bool vec_in;   // every expert (and base) 16-byte aligned
  bool vec_out;  // out 16-byte aligned
};

template <typename T, int MERGE>
__global__ void __launch_bounds__(kTiesThreads, 2) ties_merge_kernel(const __grid_constant__ TiesArgs a) {
  constexpr bool kOut = MERGE != kMergeCountsOnly;
  const bool elect = a.elect != kElectNone;
  const bool has_base = a.base != nullptr;
  const int64_t n = a.n;
  unsigned long long npos = 0, nneg = 0;

  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  FM_FOR_EACH_CHUNK(c0, nchunks) {
    const int64_t i0 = (c0 + threadIdx.x) * kChunk;
    const uint64_t r0 = static_cast<uint64_t>(i0) + a.offset;
    float bv[kChunk];
    if (has_base) {
      load_chunk<T>(static_cast<const T*>(a.base), i0, n, a.vec_in, bv);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) bv[e] = 0.f;
    }
    // Election sum and the two candidate accumulators (+: agree = e > 0, -: agree = e < 0).
    // mean: agree counts, packed (+ in bits 0..15, - in bits 16..31; T <= 64); wmean: the denominators.
    float ssum[kChunk], accp[kChunk], accn[kChunk], auxp[kChunk], auxn[kChunk];
    uint32_t cnt[kChunk];
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      ssum[e] = accp[e] = accn[e] = auxp[e] = auxn[e] = 0.f;
      cnt[e] = 0u;
    }

    ExpertPipe<T, kPipeDepth<T>> pipe;
    pipe.init(a.experts, a.T, i0, n, a.vec_in);
#pragma unroll 1
    for (int t = 0; t < a.T; ++t) {
      float d[kChunk];
      unpack_chunk<T>(pipe.next(a.experts, t, a.T, i0, n, a.vec_in), d);
      const float w = a.w[t], lo = a.lo[t], hi = a.hi[t], p = a.p[t], sc = a.s[t];
      const bool drop = p > 0.f;
      uint32_t rw[kChunk];
      if (drop) philox_chunk(r0, a.seed, a.key + static_cast<uint64_t>(t), rw);
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        const float dt = has_base ? __fsub_rn(d[e], bv[e]) : d[e];
        const float ad = fabsf(dt);
        bool keep = ad >= lo && ad < hi;
        if (drop) keep = keep && fm_u01(rw[e]) >= p;
        const float x = __fmul_rn(__fmul_rn(dt, keep ? 1.f : 0.f), sc);
        const float v = __fmul_rn(w, x);
        const float ev = a.weighted_elect ? v : x;
        if (a.elect == kElectSum) {
          ssum[e] = __fadd_rn(ssum[e], ev);
        } else if (a.elect == kElectCount) {
          ssum[e] = __fadd_rn(ssum[e], sign_f(ev));  // small integers: exact in any order, as torch's sum
        }
        if constexpr (kOut) {
          const float fp = (!elect || ev > 0.f) ? 1.f : 0.f;  // agree_t if gamma > 0 (or no election)
          const float fn = ev < 0.f ? 1.f : 0.f;              // agree_t otherwise
          if constexpr (MERGE == kMergeMax) {
            accp[e] = nan_max(accp[e], fabsf(__fmul_rn(v, fp)));
            if (elect) accn[e] = nan_max(accn[e], fabsf(__fmul_rn(v, fn)));
          } else {
            accp[e] = __fadd_rn(accp[e], __fmul_rn(v, fp));
            if (elect) accn[e] = __fadd_rn(accn[e], __fmul_rn(v, fn));
          }
          if constexpr (MERGE == kMergeMean) {  // agree counts
            cnt[e] += (fp != 0.f ? 1u : 0u) | (fn != 0.f ? 0x10000u : 0u);
          } else if constexpr (MERGE == kMergeWMean) {  // den = sum_t w_t * agree_t
            auxp[e] = __fadd_rn(auxp[e], __fmul_rn(w, fp));
            if (elect) auxn[e] = __fadd_rn(auxn[e], __fmul_rn(w, fn));
          }
        }
      }
    }

    float res[kChunk];
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      float gamma = 1.f;
      bool pos = true;
      if (elect) {
        const float sv = ssum[e];
        gamma = sv == 0.f ? a.zero_sign : sign_f(sv);  // sign(NaN) == 0, as torch.sign on the CPU
        pos = gamma > 0.f;
        if (i0 + e < n) {
          npos += sv > 0.f ? 1u : 0u;
          nneg += sv < 0.f ? 1u : 0u;
        }
      }
      if constexpr (kOut) {
        float r = pos ? accp[e] : accn[e];
        if constexpr (MERGE == kMergeMean) {
          const uint32_t c = pos ? (cnt[e] & 0xFFFFu) : (cnt[e] >> 16);
          r = __fdiv_rn(r, static_cast<float>(c > 1u ? c : 1u));  // / float(max(count, 1))
        } else if constexpr (MERGE == kMergeWMean) {
          const float den = pos ? auxp[e] : auxn[e];
          r = __fdiv_rn(r, fabsf(den) < 1e-8f ? 1.f : den);  // fp32 compare, as torch's den.abs() < 1e-8
        } else if constexpr (MERGE == kMergeMax) {
          r = __fmul_rn(gamma, r);
        }
        r = __fmul_rn(a.lam, r);
        res[e] = has_base ? __fadd_rn(bv[e], r) : r;
      }
    }
    if constexpr (kOut) store_chunk_dyn(a.out, a.out_dtype, i0, n, a.vec_out, res);
  }
  if (elect) {  // uniform over the grid: all threads of the block take part in the reduction
    block_sum2(npos, nneg);
    if (threadIdx.x == 0) {
      if (npos) atomicAdd(a.counts + 0, npos);
      if (nneg) atomicAdd(a.counts + 1, nneg);
    }
  }
}

}  // namespace cuda
}  // namespace fastmerge
