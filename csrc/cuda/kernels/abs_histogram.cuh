// abs_histogram: histograms of magnitude keys key = bits(fp32(|x|)) (31 significant bits), the two passes of
// the streaming exact top-k threshold (fastmerge/ops/abs_histogram.py).
//
// Scheme. The output has 65536 int64 bins, but a block cannot privatise 65536 32-bit counters (256 KiB of
// shared memory; an H100 block gets at most 227 KiB). Both levels fit in 128 KiB of shared memory:
//  * level 0 counts key >> 16. Keys are < 2^31, so only bins 0 .. 32767 can ever be hit: 32768 32-bit
//    counters = 128 KiB. A block counts at most 2^32 - 1 elements per launch (the launcher sizes the grid),
//    so the counters cannot overflow; each block flushes its non-zero bins with one int64 global atomic each.
//  * level 1 counts key & 0xFFFF over the keys with key >> 16 == prefix: all 65536 bins are possible, so
//    they are 16-bit counters packed two per 32-bit word (bin b in the low half of word b/2 when b is even,
//    in the high half when odd) = 128 KiB. A 16-bit counter overflows after 65535 increments, and a carry
//    would corrupt the neighbour bin, so the block counts the elements it has added since its last flush
//    and flushes (adds its counters to the global histogram and zeroes them) before the next step could
//    push that count past 65535. The level-1 filter usually keeps a tiny fraction of the elements, so a
//    block normally flushes once, at its end; in the worst case (every element matches) it flushes every
//    few steps, which costs a pass over 128 KiB of shared memory per ~50K elements.
// Shared atomics are warp-aggregated with __match_any_sync (lanes of a warp with the same bin add their
// count once, from one lane), so skewed inputs (pruned tensors: mostly zeros, i.e. bin 0) do not serialise
// 32 lanes on one address. One block of 1024 threads per SM (128 KiB leaves no room for a second); each
// thread loads 16 elements (64 or 32 bytes: 4 or 2 16-byte loads in flight) per step.
#pragma once

#include "common.cuh"

namespace fastmerge {
namespace cuda {

constexpr int kHistThreads = 1024;
constexpr int kHistPerThread = 2 * kChunk;                       // elements per thread per step
constexpr int kHistPerStep = kHistThreads * kHistPerThread;     // elements per block per step
constexpr int kHistWords = 32768;                                // shared 32-bit words (both levels)
constexpr size_t kHistSmemBytes = kHistWords * sizeof(uint32_t);  // 128 KiB of dynamic shared memory
// Level 1: flush when the elements added since the last flush exceed this, so that after one more step
// (at most kHistPerStep more) no 16-bit counter can exceed 65535.
constexpr uint32_t kHistFlushAt = 65535u - kHistPerStep;
static_assert(kHistPerStep < 65535, "a level-1 step must fit in a 16-bit counter");
// Level 0: most steps one block may take, so that no 32-bit counter can overflow (the launcher makes the
// grid large enough).
constexpr int64_t kHistMaxStepsLevel0 = (int64_t{1} << 32) / kHistPerStep - 1;

// Adds the shared counters to the global histogram and zeroes them. All threads must call it; it begins
// and ends with a barrier.
template <bool LEVEL1>
__device__ __forceinline__ void hist_flush(uint32_t* sh, unsigned long long* __restrict__ hist) {
  __syncthreads();
  for (int w = threadIdx.x; w < kHistWords; w += blockDim.x) {
    const uint32_t c = sh[w];
    if (c == 0u) continue;
    sh[w] = 0u;
    if constexpr (LEVEL1) {
      const uint32_t lo = c & 0xFFFFu, hi = c >> 16;
      if (lo) atomicAdd(hist + 2 * w, static_cast<unsigned long long>(lo));
      if (hi) atomicAdd(hist + 2 * w + 1, static_cast<unsigned long long>(hi));
    } else {
      atomicAdd(hist + w, static_cast<unsigned long long>(c));
    }
  }
  __syncthreads();
}

// x: n elements (16-byte aligned when vec). hist: int64 [65536] viewed as unsigned long long (accumulated).
// LEVEL1: only keys with key >> 16 == prefix (prefix < 32768) are counted. Launch with kHistThreads threads
// and kHistSmemBytes of dynamic shared memory.
template <typename T, bool LEVEL1>
__global__ void __launch_bounds__(kHistThreads)
    abs_histogram_kernel(const T* __restrict__ x, int64_t n, bool vec, uint32_t prefix,
                         unsigned long long* __restrict__ hist) {
  extern __shared__ uint32_t fm_hist_smem[];
  uint32_t* sh = fm_hist_smem;
  __shared__ uint32_t s_pending;  // level 1: elements added to sh since the last flush
  for (int w = threadIdx.x; w < kHistWords; w += blockDim.x) sh[w] = 0u;
  if (threadIdx.x == 0) s_pending = 0u;
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t nchunks = (n + kHistPerThread - 1) / kHistPerThread;  // 16-element chunks, one per thread
  FM_FOR_EACH_CHUNK(c0, nchunks) {
    if constexpr (LEVEL1) {
      __syncthreads();  // the previous step's updates of sh and s_pending are complete
      const uint32_t pending = s_pending;
      if (pending > kHistFlushAt) {  // block-uniform: every thread read the same value
        hist_flush<true>(sh, hist);  // its first barrier orders every read of s_pending before the reset
        if (threadIdx.x == 0) s_pending = 0u;
      }
      __syncthreads();  // the reset is visible before this step adds to s_pending
    }
    const int64_t i0 = (c0 + threadIdx.x) * kHistPerThread;
    float v[2][kChunk];
    load_chunk<T>(x, i0, n, vec, v[0]);
    load_chunk<T>(x, i0 + kChunk, n, vec, v[1]);
    uint32_t matched = 0;
#pragma unroll
    for (int e = 0; e < kHistPerThread; ++e) {
      const bool valid = i0 + e < n;
      const uint32_t key = fm_abs_key(v[e / kChunk][e % kChunk]);
      bool hit;
      uint32_t bin;
      if constexpr (LEVEL1) {
        hit = valid && (key >> 16) == prefix;
        bin = key & 0xFFFFu;
        if (!__any_sync(kFullMask, hit)) continue;  // warp-uniform; the common case at level 1
      } else {
        hit = valid;
        bin = key >> 16;
      }
      const uint32_t peers = __match_any_sync(kFullMask, hit ? bin : 0xFFFFFFFFu);
      if (hit && lane == __ffs(peers) - 1) {
        const uint32_t cnt = __popc(peers);
        if constexpr (LEVEL1) {
          atomicAdd(sh + (bin >> 1), cnt << (16 * (bin & 1u)));
        } else {
          atomicAdd(sh + bin, cnt);
        }
      }
      matched += hit ? 1u : 0u;
    }
    if constexpr (LEVEL1) {
      matched = warp_sum(matched);
      if (lane == 0 && matched) atomicAdd(&s_pending, matched);
    }
  }
  hist_flush<LEVEL1>(sh, hist);
}

// Fallback for devices whose blocks cannot have 128 KiB of shared memory (opt-in limit below it, e.g.
// sm_86/sm_89): the same loop with warp-aggregated int64 atomics straight into the global histogram.
template <typename T, bool LEVEL1>
__global__ void __launch_bounds__(256)
    abs_histogram_global_kernel(const T* __restrict__ x, int64_t n, bool vec, uint32_t prefix,
                                unsigned long long* __restrict__ hist) {
  const int lane = threadIdx.x & 31;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  FM_FOR_EACH_CHUNK(c0, nchunks) {
    const int64_t i0 = (c0 + threadIdx.x) * kChunk;
    float v[kChunk];
    load_chunk<T>(x, i0, n, vec, v);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      const uint32_t key = fm_abs_key(v[e]);
      const bool hit = i0 + e < n && (!LEVEL1 || (key >> 16) == prefix);
      const uint32_t bin = LEVEL1 ? (key & 0xFFFFu) : (key >> 16);
      if (!__any_sync(kFullMask, hit)) continue;
      const uint32_t peers = __match_any_sync(kFullMask, hit ? bin : 0xFFFFFFFFu);
      if (hit && lane == __ffs(peers) - 1) atomicAdd(hist + bin, static_cast<unsigned long long>(__popc(peers)));
    }
  }
}

}  // namespace cuda
}  // namespace fastmerge
