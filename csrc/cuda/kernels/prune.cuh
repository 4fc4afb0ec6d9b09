// prune: magnitude band + random drop + rescale (magnitude prune, Breadcrumbs, DARE), with the L1 statistics
// of fastmerge/ops/prune.py:
//   keep = (lo_r <= |x| < hi_r) and (u >= p when p > 0),  out = (x * keep) * scale,
//   stats += [sum |x|, sum |x * keep|] (fp64).
// Memory-bound: each thread takes 8 consecutive elements per step (16-byte loads/stores when aligned, one or
// two per chunk), one Philox block per 4 elements, grid-stride over the tensor; the fp64 sums are reduced
// per block and added with one atomic per block and statistic.
#pragma once

#include "common.cuh"

namespace fastmerge {
namespace cuda {

constexpr int kPruneThreads = 256;

struct PruneArgs {
  const void* x;      // n elements of Tin, viewed as rows x cols
  void* out;          // n elements of Tout
  const float* lo;    // [rows], device
  const float* hi;    // [rows], device
  double* stats;      // [2], accumulated
  int64_t n;
  int64_t rows;       // >= 1
  int64_t cols;       // n / rows, >= 1
  uint64_t seed, key, offset;
  float p;            // fp32(p): torch compares the fp32 uniforms with the Python float in fp32
  float scale;        // fp32(scale), as torch's tensor * Python float
  bool drop;          // p > 0 (in double, as the reference's `if p > 0`)
  bool vec_in, vec_out;  // x / out 16-byte aligned
};

template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kPruneThreads) prune_kernel(const __grid_constant__ PruneArgs a) {
  const Tin* __restrict__ x = static_cast<const Tin*>(a.x);
  Tout* __restrict__ out = static_cast<Tout*>(a.out);
  double sum_abs = 0.0, sum_kept = 0.0;
  const int64_t n = a.n;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  FM_FOR_EACH_CHUNK(c0, nchunks) {
    const int64_t i0 = (c0 + threadIdx.x) * kChunk;
    float v[kChunk];
    load_chunk<Tin>(x, i0, n, a.vec_in, v);
    uint32_t rw[kChunk];
    if (a.drop) philox_chunk(static_cast<uint64_t>(i0) + a.offset, a.seed, a.key, rw);
    // Band of the row of each element; a chunk may straddle rows (or several, when cols < 8).
    int64_t row = 0, row_end = n;
    float lo, hi;
    if (a.rows == 1) {
      lo = __ldg(a.lo);
      hi = __ldg(a.hi);
    } else if (i0 < n) {
      row = i0 / a.cols;
      row_end = (row + 1) * a.cols;
      lo = __ldg(a.lo + row);
      hi = __ldg(a.hi + row);
    } else {
      lo = hi = 0.f;  // whole chunk past the end: nothing is stored or counted
    }
    float o[kChunk];
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      const int64_t i = i0 + e;
      if (i >= row_end && i < n) {  // only when rows > 1 (row_end == n otherwise)
        do {
          ++row;
          row_end += a.cols;
        } while (i >= row_end);
        lo = __ldg(a.lo + row);
        hi = __ldg(a.hi + row);
      }
      const float ax = fabsf(v[e]);
      bool keep = ax >= lo && ax < hi;
      if (a.drop) keep = keep && fm_u01(rw[e]) >= a.p;
      const float kept = __fmul_rn(v[e], keep ? 1.f : 0.f);
      o[e] = __fmul_rn(kept, a.scale);
      if (i < n) {
        sum_abs += static_cast<double>(ax);
        sum_kept += static_cast<double>(fabsf(kept));
      }
    }
    store_chunk<Tout>(out, i0, n, a.vec_out, o);
  }
  block_sum2(sum_abs, sum_kept);
  if (threadIdx.x == 0) {
    atomicAdd(a.stats + 0, sum_abs);
    atomicAdd(a.stats + 1, sum_kept);
  }
}

}  // namespace cuda
}  // namespace fastmerge
