// Device helpers shared by the fastmerge CUDA kernels: element types, 8-element chunk loads/stores (16-byte
// vectors when aligned, scalar otherwise), Philox words for a chunk, NaN-propagating max, reductions.
// Torch-free: raw pointers only, so every kernel header compiles with plain nvcc.
//
// Numerics (the contract is the oracles, fastmerge/ops/<op>.py):
//  * inputs are widened to fp32 exactly (half: __half2float, bf16: bits << 16);
//  * every fp32 operation that mirrors a reference tensor op is written with the explicit round-to-nearest
//    intrinsics __fadd_rn / __fsub_rn / __fmul_rn / __fdiv_rn. nvcc contracts a*b+c into an FMA by default
//    (-fmad=true) and would then round once instead of twice; the _rn intrinsics are never contracted, so the
//    results are bit-identical to torch's elementwise ops, including signs, -0.0, inf*0 = NaN and NaN
//    propagation. Masks multiply as in the reference (x * 1.0f or x * 0.0f), never as selects;
//  * outputs are rounded to nearest even (__float2half_rn, __float2bfloat16_rn), like torch's .to(dtype).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fastmerge/philox.h"

namespace fastmerge {
namespace cuda {

// Most tasks (experts) one launch takes: their pointers and per-task parameters travel in the kernel
// parameter block (by value, see the *Args structs), so this bounds its size (< 4 KiB).
constexpr int kMaxTasks = 64;
// Elements one thread handles per loop iteration in the elementwise kernels: 8 = one 16-byte vector of a
// 16-bit type, two of fp32, and two Philox blocks.
constexpr int kChunk = 8;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Runtime dtype codes (for outputs / secondary inputs whose type is not a template parameter).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr int value = kFloat32;
};
template <>
struct DTypeOf<__half> {
  static constexpr int value = kFloat16;
};
template <>
struct DTypeOf<__nv_bfloat16> {
  static constexpr int value = kBFloat16;
};

// ---- conversions ----------------------------------------------------------------------------------------

// Raw storage bits of one element -> fp32 (exact).
template <typename T>
__device__ __forceinline__ float bits_to_float(uint32_t b) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(b);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "element type must be float, __half or __nv_bfloat16");
    return __uint_as_float(b << 16);  // bf16 is the upper half of an fp32
  }
}

// fp32 -> raw storage bits of one element, rounded to nearest even.
template <typename T>
__device__ __forceinline__ uint32_t float_to_bits(float f) {
  if constexpr (std::is_same_v<T, float>) {
    return __float_as_uint(f);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half_as_ushort(__float2half_rn(f));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "element type must be float, __half or __nv_bfloat16");
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
}

// Raw bits of p[i] (16-bit types zero-extended).
template <typename T>
__device__ __forceinline__ uint32_t load_bits(const T* p, int64_t i) {
  if constexpr (sizeof(T) == 4) {
    return __ldg(reinterpret_cast<const unsigned int*>(p) + i);
  } else {
    return __ldg(reinterpret_cast<const unsigned short*>(p) + i);
  }
}

template <typename T>
__device__ __forceinline__ void store_bits(T* p, int64_t i, uint32_t b) {
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<unsigned int*>(p)[i] = b;
  } else {
    reinterpret_cast<unsigned short*>(p)[i] = static_cast<unsigned short>(b);
  }
}

// ---- 8-element chunks -----------------------------------------------------------------------------------

// Raw bits of kChunk consecutive elements: 8 words for fp32, 4 words (two elements each, element 2j in the
// low half: little endian) for 16-bit types. Kept raw so that a prefetched chunk costs 4 or 8 registers.
template <typename T>
struct RawChunk {
  static constexpr int kWords = kChunk * static_cast<int>(sizeof(T)) / 4;
  static_assert(kWords == 4 || kWords == 8, "element type must be 2 or 4 bytes");
  uint32_t w[kWords];
};

// Elements i0 .. i0+7 of p; elements at or past n read as +0.0. `vec`: p is 16-byte aligned (i0 is always a
// multiple of 8, so p + i0 then is too); a full chunk is then read with 16-byte loads.
template <typename T>
__device__ __forceinline__ RawChunk<T> load_raw_chunk(const T* __restrict__ p, int64_t i0, int64_t n, bool vec) {
  RawChunk<T> r;
  if (vec && i0 + kChunk <= n) {
    const uint4* q = reinterpret_cast<const uint4*>(p + i0);
#pragma unroll
    for (int j = 0; j < RawChunk<T>::kWords / 4; ++j) {
      const uint4 u = __ldg(q + j);
      r.w[4 * j + 0] = u.x;
      r.w[4 * j + 1] = u.y;
      r.w[4 * j + 2] = u.z;
      r.w[4 * j + 3] = u.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < RawChunk<T>::kWords; ++j) r.w[j] = 0u;
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      if (i0 + e < n) {
        const uint32_t b = load_bits(p, i0 + e);
        if constexpr (sizeof(T) == 4) {
          r.w[e] = b;
        } else {
          r.w[e >> 1] |= b << (16 * (e & 1));
        }
      }
    }
  }
  return r;
}

template <typename T>
__device__ __forceinline__ void unpack_chunk(const RawChunk<T>& r, float (&v)[kChunk]) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    if constexpr (sizeof(T) == 4) {
      v[e] = bits_to_float<T>(r.w[e]);
    } else {
      v[e] = bits_to_float<T>((r.w[e >> 1] >> (16 * (e & 1))) & 0xFFFFu);
    }
  }
}

template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int64_t i0, int64_t n, bool vec,
                                           float (&v)[kChunk]) {
  unpack_chunk<T>(load_raw_chunk<T>(p, i0, n, vec), v);
}

// Same with the element type given at run time (warp-uniform branch).
__device__ __forceinline__ void load_chunk_dyn(const void* p, int dtype, int64_t i0, int64_t n, bool vec,
                                               float (&v)[kChunk]) {
  switch (dtype) {
    case kFloat16:
      load_chunk<__half>(static_cast<const __half*>(p), i0, n, vec, v);
      break;
    case kBFloat16:
      load_chunk<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(p), i0, n, vec, v);
      break;
    default:
      load_chunk<float>(static_cast<const float*>(p), i0, n, vec, v);
      break;
  }
}

// p[i0 + e] = v[e] rounded to T, for i0 + e < n. `vec`: p is 16-byte aligned.
template <typename T>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, int64_t i0, int64_t n, bool vec,
                                            const float (&v)[kChunk]) {
  uint32_t b[kChunk];
#pragma unroll
  for (int e = 0; e < kChunk; ++e) b[e] = float_to_bits<T>(v[e]);
  if (vec && i0 + kChunk <= n) {
    uint4* q = reinterpret_cast<uint4*>(p + i0);
    if constexpr (sizeof(T) == 4) {
      q[0] = make_uint4(b[0], b[1], b[2], b[3]);
      q[1] = make_uint4(b[4], b[5], b[6], b[7]);
    } else {
      q[0] = make_uint4(b[0] | (b[1] << 16), b[2] | (b[3] << 16), b[4] | (b[5] << 16), b[6] | (b[7] << 16));
    }
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      if (i0 + e < n) store_bits(p, i0 + e, b[e]);
    }
  }
}

__device__ __forceinline__ void store_chunk_dyn(void* p, int dtype, int64_t i0, int64_t n, bool vec,
                                                const float (&v)[kChunk]) {
  switch (dtype) {
    case kFloat16:
      store_chunk<__half>(static_cast<__half*>(p), i0, n, vec, v);
      break;
    case kBFloat16:
      store_chunk<__nv_bfloat16>(static_cast<__nv_bfloat16*>(p), i0, n, vec, v);
      break;
    default:
      store_chunk<float>(static_cast<float*>(p), i0, n, vec, v);
      break;
  }
}

// Bool masks (one byte each, 0 or 1): p[i0 + e] = m[e] for i0 + e < n. `vec`: p + i0 is 8-byte aligned.
__device__ __forceinline__ void store_mask_chunk(bool* __restrict__ p, int64_t i0, int64_t n, bool vec,
                                                 const bool (&m)[kChunk]) {
  if (vec && i0 + kChunk <= n) {
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      lo |= static_cast<uint32_t>(m[e]) << (8 * e);
      hi |= static_cast<uint32_t>(m[e + 4]) << (8 * e);
    }
    *reinterpret_cast<uint2*>(p + i0) = make_uint2(lo, hi);
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      if (i0 + e < n) p[i0 + e] = m[e];
    }
  }
}

// Software pipeline over the experts' chunks: keeps the loads of the next D tasks in flight while task t is
// processed (D raw chunks = 4*D or 8*D registers), so that a thread has several 16-byte loads outstanding.
// `experts` points into a __grid_constant__ kernel parameter.
template <typename T, int D>
struct ExpertPipe {
  RawChunk<T> buf[D];

  __device__ __forceinline__ void init(const void* const* experts, int ntasks, int64_t i0, int64_t n, bool vec) {
#pragma unroll
    for (int j = 0; j < D; ++j) {
#pragma unroll
      for (int k = 0; k < RawChunk<T>::kWords; ++k) buf[j].w[k] = 0u;
      if (j < ntasks) buf[j] = load_raw_chunk<T>(static_cast<const T*>(experts[j]), i0, n, vec);
    }
  }

  // The chunk of task t (calls must come in order t = 0, 1, ...); issues the load of task t + D.
  __device__ __forceinline__ RawChunk<T> next(const void* const* experts, int t, int ntasks, int64_t i0, int64_t n,
                                              bool vec) {
    const RawChunk<T> cur = buf[0];
#pragma unroll
    for (int j = 0; j + 1 < D; ++j) buf[j] = buf[j + 1];
    if (t + D < ntasks) buf[D - 1] = load_raw_chunk<T>(static_cast<const T*>(experts[t + D]), i0, n, vec);
    return cur;
  }
};

// Prefetch depth: about 48-64 bytes of loads in flight per thread.
template <typename T>
constexpr int kPipeDepth = sizeof(T) == 4 ? 2 : 3;

// Task-vector chunks of every task: calls f(t, d) for t = 0 .. ntasks-1 in order, with d[e] = fp32(expert_t
// [i0 + e]) - fp32(base[i0 + e]) (just the expert without base).
template <typename T, typename F>
__device__ __forceinline__ void for_each_task(const void* const* experts, int ntasks, bool has_base,
                                              const float (&bv)[kChunk], int64_t i0, int64_t n, bool vec, F&& f) {
  ExpertPipe<T, kPipeDepth<T>> pipe;
  pipe.init(experts, ntasks, i0, n, vec);
#pragma unroll 1
  for (int t = 0; t < ntasks; ++t) {
    float d[kChunk];
    unpack_chunk<T>(pipe.next(experts, t, ntasks, i0, n, vec), d);
    if (has_base) {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) d[e] = __fsub_rn(d[e], bv[e]);
    }
    f(t, d);
  }
}

// ---- random numbers -------------------------------------------------------------------------------------

// Philox words of the 8 consecutive stream indices r0 .. r0+7: w[e] = word (r0+e)&3 of block (r0+e)>>2,
// i.e. fm_uniform_at(r0 + e, seed, key) == fm_u01(w[e]). Two Philox blocks when r0 % 4 == 0 (the usual
// case: offsets are multiples of 4), three otherwise. r0 % 4 is uniform over a launch, so the branch is too.
__device__ __forceinline__ void philox_chunk(uint64_t r0, uint64_t seed, uint64_t key, uint32_t (&w)[kChunk]) {
  const uint64_t g = r0 >> 2;
  const uint32_t sh = static_cast<uint32_t>(r0 & 3u);
  const Philox4 a = philox4x32_10(g, seed, key);
  const Philox4 b = philox4x32_10(g + 1, seed, key);
  if (sh == 0) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      w[e] = a.v[e];
      w[e + 4] = b.v[e];
    }
  } else {
    const Philox4 c = philox4x32_10(g + 2, seed, key);
    const uint32_t all[12] = {a.v[0], a.v[1], a.v[2], a.v[3], b.v[0], b.v[1],
                              b.v[2], b.v[3], c.v[0], c.v[1], c.v[2], c.v[3]};
#pragma unroll
    for (int e = 0; e < kChunk; ++e) w[e] = sh == 1 ? all[e + 1] : (sh == 2 ? all[e + 2] : all[e + 3]);
  }
}

// ---- small math -----------------------------------------------------------------------------------------

// max(m, v) propagating NaN like torch.amax (v >= 0 or NaN here).
__device__ __forceinline__ float nan_max(float m, float v) { return (v > m || v != v) ? v : m; }

// torch.sign for fp32: -1, 0 or +1, and 0 for NaN (CPU torch computes (0 < x) - (x < 0)).
__device__ __forceinline__ float sign_f(float x) {
  return static_cast<float>(static_cast<int>(x > 0.f) - static_cast<int>(x < 0.f));
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Sums of a and b over the block; the result is valid in thread 0. Every thread of the block must call it
// (no early returns before it). blockDim.x must be a multiple of 32.
template <typename V>
__device__ __forceinline__ void block_sum2(V& a, V& b) {
  __shared__ V sa[32], sb[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // earlier users of sa/sb are done
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < nwarps ? sa[lane] : V(0);
    b = lane < nwarps ? sb[lane] : V(0);
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

// The loop over chunks shared by the elementwise kernels: block-uniform trip count (so warp collectives and
// __syncthreads may be used inside), thread `threadIdx.x` of each step takes chunk c0 + threadIdx.x, which
// may be past the end (its loads then read zeros and its stores/counts are masked by i < n).
#define FM_FOR_EACH_CHUNK(c0, nchunks)                                                             \
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * blockDim.x; c0 < (nchunks);                 \
       c0 += static_cast<int64_t>(gridDim.x) * blockDim.x)

}  // namespace cuda
}  // namespace fastmerge
