// row_kth_largest_abs: the k-th largest |x| of every row (fastmerge/ops/row_kth_largest_abs.py), by a
// radix select on magnitude keys (bits of fp32(|x|); integer order == numeric order, NaN above +inf) over
// four 8-bit digits, most significant first. No sort.
//
// One block per row (grid-stride over rows). Pass p histograms digit p of the keys whose higher digits equal
// the digits chosen so far (256 shared counters, warp-aggregated atomics), then warp 0 finds the digit d
// holding the krem-th largest of them: (# with a larger digit) < krem <= (# with a digit >= d), and krem
// drops by the count above. After 4 passes the chosen digits are the key itself, so the result is exact
// (and bit-identical to topk's value, up to the payload of NaNs). Rows up to kSelectCacheMax columns keep
// their keys in shared memory after the first pass; longer rows are re-read (from L2) on each pass.
#pragma once

#include "common.cuh"

namespace fastmerge {
namespace cuda {

constexpr int kSelectThreads = 256;
constexpr int64_t kSelectCacheMax = 12288;  // 48 KiB of keys: no opt-in needed for the dynamic shared memory

// x: rows x cols (row-major, 16-byte aligned rows when vec). 1 <= k <= cols < 2^32. out: fp32 [rows].
// Dynamic shared memory: cols * 4 bytes when cache (cols <= kSelectCacheMax), else 0.
template <typename T>
__global__ void __launch_bounds__(kSelectThreads)
    row_kth_largest_abs_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t k, bool vec,
                               bool cache, float* __restrict__ out) {
  extern __shared__ uint32_t fm_select_keys[];
  __shared__ uint32_t s_hist[256];
  __shared__ uint32_t s_digit;
  __shared__ unsigned long long s_krem;
  const int lane = threadIdx.x & 31;
  const int64_t nchunks = (cols + kChunk - 1) / kChunk;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;
    uint32_t prefix = 0;                                    // digits chosen so far (lower bits zero)
    unsigned long long krem = static_cast<unsigned long long>(k);  // rank among the keys matching prefix
#pragma unroll 1
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      const uint32_t hi_mask = pass == 0 ? 0u : (0xFFFFFFFFu << (shift + 8));  // the digits already chosen
      for (int i = threadIdx.x; i < 256; i += blockDim.x) s_hist[i] = 0u;
      __syncthreads();
      for (int64_t c0 = 0; c0 < nchunks; c0 += blockDim.x) {  // block-uniform trip count
        const int64_t i0 = (c0 + threadIdx.x) * kChunk;
        uint32_t key[kChunk];
        if (cache && pass > 0) {
#pragma unroll
          for (int e = 0; e < kChunk; ++e) key[e] = i0 + e < cols ? fm_select_keys[i0 + e] : 0u;
        } else {
          float v[kChunk];
          load_chunk<T>(xr, i0, cols, vec, v);
#pragma unroll
          for (int e = 0; e < kChunk; ++e) {
            key[e] = fm_abs_key(v[e]);
            if (cache && i0 + e < cols) fm_select_keys[i0 + e] = key[e];
          }
        }
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          const bool hit = i0 + e < cols && (key[e] & hi_mask) == prefix;
          const uint32_t digit = (key[e] >> shift) & 0xFFu;
          const uint32_t peers = __match_any_sync(kFullMask, hit ? digit : 0xFFFFFFFFu);
          if (hit && lane == __ffs(peers) - 1) atomicAdd(s_hist + digit, static_cast<uint32_t>(__popc(peers)));
        }
      }
      __syncthreads();
      if (threadIdx.x < 32) {
        // Lane l owns digits 255-8l down to 248-8l; an inclusive scan over lanes gives, per lane, the number
        // of matching keys with a digit >= its lowest digit.
        uint32_t h[8];
        unsigned long long local = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          h[j] = s_hist[255 - 8 * lane - j];
          local += h[j];
        }
        unsigned long long incl = local;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const unsigned long long y = __shfl_up_sync(kFullMask, incl, off);
          if (lane >= off) incl += y;
        }
        // The total is >= krem (krem <= number of matching keys), so some lane holds the digit.
        const unsigned ballot = __ballot_sync(kFullMask, incl >= krem);
        if (ballot != 0u && lane == __ffs(ballot) - 1) {
          unsigned long long above = incl - local;  // matching keys with a digit above this lane's digits
          bool found = false;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (!found) {
              if (above + h[j] >= krem) {
                s_digit = static_cast<uint32_t>(255 - 8 * lane - j);
                s_krem = krem - above;
                found = true;
              } else {
                above += h[j];
              }
            }
          }
        }
      }
      __syncthreads();
      prefix |= s_digit << shift;
      krem = s_krem;
      // s_hist, s_digit, s_krem are next written after at least one more barrier (next pass / row).
    }
    if (threadIdx.x == 0) out[row] = __uint_as_float(prefix);
  }
}

}  // namespace cuda
}  // namespace fastmerge
