// Counter-based random numbers shared by the CPU and CUDA kernels (and mirrored by the Triton kernels and
// fastmerge/ops/philox.py::philox_uniform). Philox4x32-10, Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11. Torch-free so that nvcc can compile it on a machine without a CUDA torch.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline
#endif

namespace fastmerge {

struct Philox4 {
  uint32_t v[4];
};

FM_HD uint32_t fm_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four 32-bit words for group g = index >> 2 of the stream (seed, key).
FM_HD Philox4 philox4x32_10(uint64_t g, uint64_t seed, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(g >> 32);
  uint32_t c2 = static_cast<uint32_t>(key), c3 = static_cast<uint32_t>(key >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t hi0 = fm_mulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = fm_mulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Uniform in [0, 1) with 24 random bits: exact in fp32, so comparisons are identical on every backend.
FM_HD float fm_u01(uint32_t w) { return static_cast<float>(w >> 8) * (1.0f / 16777216.0f); }

// Uniform for one element index (computes a whole Philox block; loops over 4 elements should call
// philox4x32_10 once and use fm_u01 on each word).
FM_HD float fm_uniform_at(uint64_t index, uint64_t seed, uint64_t key) {
  const Philox4 r = philox4x32_10(index >> 2, seed, key);
  return fm_u01(r.v[index & 3]);
}

// Magnitude key: the bits of fp32(|x|); for non-negative floats integer order == numeric order.
FM_HD uint32_t fm_abs_key(float x) {
  union {
    float f;
    uint32_t u;
  } c;
  c.f = x;
  return c.u & 0x7FFFFFFFu;
}

}  // namespace fastmerge
