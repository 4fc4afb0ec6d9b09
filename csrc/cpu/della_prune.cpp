// della_prune on the CPU: DELLA's MagPrune, a drop whose keep probability rises with the magnitude's rank in its
// row. Semantics: fastmerge/ops/della_prune.py (della_prune_ref). The kernel is in della_prune.inc, compiled once
// per instruction-set variant (see common.h).
#include "common.h"

namespace fastmerge {
namespace cpu {

struct DellaArgs {
  float base_prob;  // fp32(density - epsilon): the double scalar is converted to fp32 by torch's add
  float two_eps;    // fp32(2 * epsilon): likewise for the multiplication
  float denom;      // fp32(n - 1)
  uint64_t seed, key;
  bool rescale;
  PhiloxGroupsFn philox;
};

// Ranks (0-based positions in the ascending stable order of the keys) of keys[0, n) by a stable LSD radix
// sort of (key, index) pairs with 8-bit digits; passes whose digit is constant are skipped. k0 holds the
// keys on entry; k0, k1, i0, i1 are all scratch afterwards; rank (which may be k0 or k1, not i0 or i1)
// receives the result.
inline void stable_ranks(uint32_t* k0, uint32_t* k1, uint32_t* i0, uint32_t* i1,
                         uint32_t* rank, int64_t n) {
  uint32_t cnt[4][256];
  std::memset(cnt, 0, sizeof cnt);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t v = k0[i];
    ++cnt[0][v & 0xFFu];
    ++cnt[1][(v >> 8) & 0xFFu];
    ++cnt[2][(v >> 16) & 0xFFu];
    ++cnt[3][v >> 24];
    i0[i] = static_cast<uint32_t>(i);
  }
  for (int pass = 0; pass < 4; ++pass) {
    uint32_t* c = cnt[pass];
    const int shift = 8 * pass;
    if (c[(k0[0] >> shift) & 0xFFu] == static_cast<uint32_t>(n)) continue;  // one digit value: no-op pass
    uint32_t sum = 0;
    for (int d = 0; d < 256; ++d) {
      const uint32_t cd = c[d];
      c[d] = sum;
      sum += cd;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t v = k0[i];
      const uint32_t pos = c[(v >> shift) & 0xFFu]++;
      k1[pos] = v;
      i1[pos] = i0[i];
    }
    std::swap(k0, k1);
    std::swap(i0, i1);
  }
  for (int64_t i = 0; i < n; ++i) rank[i0[i]] = static_cast<uint32_t>(i);
}

}  // namespace cpu
}  // namespace fastmerge

#define FM_ISA_KERNELS "della_prune.inc"
#include "isa_variants.inc"

namespace fastmerge {

void della_prune_cpu(const at::Tensor& x, at::Tensor& out, double density, double epsilon, int64_t seed,
                     int64_t key, bool rescale) {
  const char* op = "della_prune_cpu";
  cpu::check_float3(x, op, "x");
  cpu::check_float3(out, op, "out");
  const int64_t numel = x.numel();
  TORCH_CHECK(out.numel() == numel, op, ": out has ", out.numel(), " elements, x has ", numel);
  if (numel == 0) return;
  const int64_t n = x.dim() ? x.size(-1) : 1;
  const int64_t rows = numel / n;
  TORCH_CHECK(n < (int64_t(1) << 32), op, ": rows of 2^32 or more elements are not supported, got ", n);
  cpu::DellaArgs a;
  a.base_prob = static_cast<float>(density - epsilon);
  a.two_eps = static_cast<float>(2 * epsilon);
  a.denom = static_cast<float>(n - 1);
  a.seed = static_cast<uint64_t>(seed);
  a.key = static_cast<uint64_t>(key);
  a.rescale = rescale;
  const cpu::Isa isa = cpu::isa();
  a.philox = cpu::philox_groups_fn(isa);
  void* o = out.data_ptr();
  const at::ScalarType odt = out.scalar_type();
  FM_DISPATCH_FLOAT3(x.scalar_type(), op,
                     [&] { FM_ISA_CALL(isa, della_impl<scalar_t>, x.data_ptr<scalar_t>(), rows, n, o, odt, a); });
}

}  // namespace fastmerge
