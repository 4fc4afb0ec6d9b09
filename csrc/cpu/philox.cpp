// Bulk Philox4x32-10 blocks for the CPU kernels (see PhiloxGroupsFn in common.h). The generator itself is
// fastmerge::philox4x32_10 (csrc/include/fastmerge/philox.h); this file only compiles the loop over
// consecutive blocks for several instruction sets, so that GCC vectorises it where the CPU allows (it needs
// 32-bit vector multiplies: SSE4.1 at least; AVX-512 adds 64-bit lanes, about 1.5x faster than AVX2).
#include "common.h"

#define FM_PHILOX_GROUPS_BODY                                                  \
  for (int64_t q = 0; q < ng; ++q) {                                           \
    const Philox4 r = philox4x32_10(g0 + static_cast<uint64_t>(q), seed, key); \
    words[4 * q + 0] = r.v[0];                                                 \
    words[4 * q + 1] = r.v[1];                                                 \
    words[4 * q + 2] = r.v[2];                                                 \
    words[4 * q + 3] = r.v[3];                                                 \
  }

namespace fastmerge {
namespace cpu {
namespace {

void philox_groups_base(uint64_t g0, int64_t ng, uint64_t seed, uint64_t key, uint32_t* __restrict words) {
  FM_PHILOX_GROUPS_BODY
}

#if FM_MULTI_ISA
__attribute__((target("avx2"))) void philox_groups_avx2(uint64_t g0, int64_t ng, uint64_t seed, uint64_t key,
                                                        uint32_t* __restrict words) {
  FM_PHILOX_GROUPS_BODY
}

__attribute__((target("avx2,avx512f,avx512vl,avx512dq,avx512bw,prefer-vector-width=512"))) void
philox_groups_avx512(uint64_t g0, int64_t ng, uint64_t seed, uint64_t key, uint32_t* __restrict words) {
  FM_PHILOX_GROUPS_BODY
}
#endif

}  // namespace

PhiloxGroupsFn philox_groups_fn(Isa isa) {
#if FM_MULTI_ISA
  if (isa == Isa::kAvx512) return philox_groups_avx512;
  if (isa == Isa::kAvx2) return philox_groups_avx2;
#else
  (void)isa;
#endif
  return philox_groups_base;
}

}  // namespace cpu
}  // namespace fastmerge
