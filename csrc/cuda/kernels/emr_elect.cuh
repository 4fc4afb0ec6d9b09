// EMR-Merging's elect / mask / rescale statistics (fastmerge/ops/emr_elect.py):
//   d_t = expert_t - base, flag = sum_t d_t > 0 ? +1 : -1 (t in order, fp32; a zero or NaN sum gives -1),
//   agree_t = d_t * flag > 0, tau_uni = flag * max_t (|d_t| * agree_t) (NaN-propagating, like amax),
//   stats[t] += [sum |d_t|, sum |tau_uni| * agree_t] (fp64).
// Per chunk: pass A sums d_t (flag) and |d_t|, pass B (experts re-read right away, normally from L1/L2)
// computes agree_t, the masks and the max, pass C uses the agree bits kept in registers (T <= 64) for the
// second statistic. Per-task statistics are reduced per warp and accumulated in shared memory per warp,
// then added to global memory with one atomic per block and entry.
#pragma once

#include "common.cuh"

namespace fastmerge {
namespace cuda {

constexpr int kEmrThreads = 256;
constexpr int kEmrWarps = kEmrThreads / 32;

struct EmrArgs {
  const void* experts[kMaxTasks];  // T pointers to n elements of Tin
  const void* base;                // nullptr: the experts are the task vectors
  void* tau;                       // n elements of tau_dtype
  bool* masks;                     // bool [T, n]
  double* stats;                   // fp64 [T, 2], accumulated
  int64_t n;
  int T;
  int tau_dtype;  // DType
  bool vec_in;    // experts and base 16-byte aligned
  bool vec_out;   // tau 16-byte aligned
  bool vec_masks; // masks 8-byte aligned and n % 8 == 0
};

template <typename T>
__global__ void __launch_bounds__(kEmrThreads) emr_elect_kernel(const __grid_constant__ EmrArgs a) {
  __shared__ double s_part[kEmrWarps][2 * kMaxTasks];  // per warp: [t][0] sum |d_t|, [t][1] sum |uni| agree_t
  for (int i = threadIdx.x; i < kEmrWarps * 2 * kMaxTasks; i += blockDim.x) (&s_part[0][0])[i] = 0.0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool has_base = a.base != nullptr;
  const int64_t n = a.n;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  FM_FOR_EACH_CHUNK(c0, nchunks) {  // block-uniform: the warp reductions below see all 32 lanes
    const int64_t i0 = (c0 + threadIdx.x) * kChunk;
    float bv[kChunk], sum[kChunk];
#pragma unroll
    for (int e = 0; e < kChunk; ++e) bv[e] = sum[e] = 0.f;
    if (has_base) load_chunk<T>(static_cast<const T*>(a.base), i0, n, a.vec_in, bv);

    // A: election sum and sum |d_t|.
    for_each_task<T>(a.experts, a.T, has_base, bv, i0, n, a.vec_in, [&](int t, const float(&d)[kChunk]) {
      double l1 = 0.0;
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        sum[e] = __fadd_rn(sum[e], d[e]);
        if (i0 + e < n) l1 += static_cast<double>(fabsf(d[e]));
      }
      l1 = warp_sum(l1);
      if (lane == 0) s_part[warp][2 * t] += l1;
    });
    float flag[kChunk], mx[kChunk];
    unsigned long long bits[kChunk];
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      flag[e] = sum[e] > 0.f ? 1.f : -1.f;
      mx[e] = 0.f;
      bits[e] = 0ull;
    }

    // B: agree_t, masks, max_t |d_t| agree_t.
    for_each_task<T>(a.experts, a.T, has_base, bv, i0, n, a.vec_in, [&](int t, const float(&d)[kChunk]) {
      bool ag[kChunk];
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        ag[e] = __fmul_rn(d[e], flag[e]) > 0.f;
        mx[e] = nan_max(mx[e], __fmul_rn(fabsf(d[e]), ag[e] ? 1.f : 0.f));
        bits[e] |= static_cast<unsigned long long>(ag[e]) << t;
      }
      store_mask_chunk(a.masks + static_cast<int64_t>(t) * n, i0, n, a.vec_masks, ag);
    });
    float uni[kChunk];
#pragma unroll
    for (int e = 0; e < kChunk; ++e) uni[e] = __fmul_rn(flag[e], mx[e]);
    store_chunk_dyn(a.tau, a.tau_dtype, i0, n, a.vec_out, uni);

    // C: sum |tau_uni| * agree_t.
#pragma unroll 1
    for (int t = 0; t < a.T; ++t) {
      double l = 0.0;
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        const float ag = ((bits[e] >> t) & 1ull) ? 1.f : 0.f;
        if (i0 + e < n) l += static_cast<double>(__fmul_rn(fabsf(uni[e]), ag));
      }
      l = warp_sum(l);
      if (lane == 0) s_part[warp][2 * t + 1] += l;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * a.T; i += blockDim.x) {
    double tot = 0.0;
#pragma unroll
    for (int w = 0; w < kEmrWarps; ++w) tot += s_part[w][i];
    atomicAdd(a.stats + i, tot);
  }
}

}  // namespace cuda
}  // namespace fastmerge
