// TALL masks and consensus merging (fastmerge/ops/tall_masks.py, consensus_merge.py):
//   d_t = expert_t - base, mtl = sum_t d_t (t in order, fp32) unless given,
//   m_t = |d_t| > lambda_t * |mtl - d_t|,
//   consensus: out = base + lam * (mtl * [sum_t m_t >= min_count]).
// One kernel for both: it writes the masks when `masks` is set and the merge when `out` is set. Without a
// given mtl each chunk of the experts is read twice (sum, then masks); the second read is issued right after
// the first by the same thread, so it is normally served by L1/L2.
#pragma once

#include "common.cuh"

namespace fastmerge {
namespace cuda {

constexpr int kTallThreads = 256;

struct TallArgs {
  const void* experts[kMaxTasks];  // T pointers to n elements of Tin
  const void* base;                // nullptr: the experts are the task vectors
  const void* mtl;                 // nullptr: mtl = sum_t d_t
  bool* masks;                     // bool [T, n] or nullptr
  void* out;                       // consensus output (out_dtype) or nullptr
  float lambdas[kMaxTasks];
  int64_t n;
  int64_t min_count;
  int T;
  int mtl_dtype, out_dtype;  // DType
  float lam;                 // fp32(lam)
  bool vec_in;               // experts and base 16-byte aligned
  bool vec_mtl, vec_out;     // 16-byte aligned
  bool vec_masks;            // masks 8-byte aligned and n % 8 == 0 (every row t * n + i0 8-byte aligned)
};

template <typename T>
__global__ void __launch_bounds__(kTallThreads) tall_kernel(const __grid_constant__ TallArgs a) {
  const bool has_base = a.base != nullptr;
  const int64_t n = a.n;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  FM_FOR_EACH_CHUNK(c0, nchunks) {
    const int64_t i0 = (c0 + threadIdx.x) * kChunk;
    float bv[kChunk], m[kChunk];
    if (has_base) {
      load_chunk<T>(static_cast<const T*>(a.base), i0, n, a.vec_in, bv);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) bv[e] = 0.f;
    }
    if (a.mtl != nullptr) {
      load_chunk_dyn(a.mtl, a.mtl_dtype, i0, n, a.vec_mtl, m);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) m[e] = 0.f;
      for_each_task<T>(a.experts, a.T, has_base, bv, i0, n, a.vec_in, [&](int, const float(&d)[kChunk]) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) m[e] = __fadd_rn(m[e], d[e]);
      });
    }
    int cnt[kChunk];
#pragma unroll
    for (int e = 0; e < kChunk; ++e) cnt[e] = 0;
    for_each_task<T>(a.experts, a.T, has_base, bv, i0, n, a.vec_in, [&](int t, const float(&d)[kChunk]) {
      const float lt = a.lambdas[t];
      bool mk[kChunk];
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        mk[e] = fabsf(d[e]) > __fmul_rn(lt, fabsf(__fsub_rn(m[e], d[e])));
        cnt[e] += mk[e] ? 1 : 0;
      }
      if (a.masks != nullptr) store_mask_chunk(a.masks + static_cast<int64_t>(t) * n, i0, n, a.vec_masks, mk);
    });
    if (a.out != nullptr) {
      float r[kChunk];
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        const float keep = cnt[e] >= a.min_count ? 1.f : 0.f;
        const float v = __fmul_rn(a.lam, __fmul_rn(m[e], keep));
        r[e] = has_base ? __fadd_rn(bv[e], v) : v;
      }
      store_chunk_dyn(a.out, a.out_dtype, i0, n, a.vec_out, r);
    }
  }
}

}  // namespace cuda
}  // namespace fastmerge
