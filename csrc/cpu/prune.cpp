// prune on the CPU: magnitude band + DARE drop + rescale, with the L1 stats mergekit's rescaling needs.
// Semantics: fastmerge/ops/prune.py (prune_ref). The kernel is in prune.inc, compiled once per instruction-set
// variant (see common.h).
#include "common.h"

namespace fastmerge {
namespace cpu {

struct PruneArgs {
  const float* lo;
  const float* hi;
  int64_t row_len;  // numel / R
  bool drop;        // p > 0
  float p;          // fp32(p): torch compares the fp32 uniforms with the scalar converted to fp32
  uint64_t seed, key, offset;
  float scale;  // fp32(scale): `kept * scale` runs in fp32
  PhiloxGroupsFn philox;
};

}  // namespace cpu
}  // namespace fastmerge

#define FM_ISA_KERNELS "prune.inc"
#include "isa_variants.inc"

namespace fastmerge {

void prune_cpu(const at::Tensor& x, const at::Tensor& lo, const at::Tensor& hi, at::Tensor& out,
               at::Tensor& stats, double p, int64_t seed, int64_t key, int64_t offset, double scale) {
  const char* op = "prune_cpu";
  cpu::check_float3(x, op, "x");
  const int64_t n = x.numel();
  const int64_t rows = lo.numel();
  cpu::check_exact(lo, at::kFloat, rows, op, "lo");
  cpu::check_exact(hi, at::kFloat, rows, op, "hi");
  cpu::check_float3(out, op, "out");
  TORCH_CHECK(out.numel() == n, op, ": out has ", out.numel(), " elements, x has ", n);
  cpu::check_exact(stats, at::kDouble, 2, op, "stats");
  if (n == 0) return;
  TORCH_CHECK(rows >= 1 && n % rows == 0, op, ": lo.numel() = ", rows, " must divide x.numel() = ", n);
  cpu::PruneArgs a;
  a.lo = lo.data_ptr<float>();
  a.hi = hi.data_ptr<float>();
  a.row_len = n / rows;
  a.drop = p > 0;
  a.p = static_cast<float>(p);
  a.seed = static_cast<uint64_t>(seed);
  a.key = static_cast<uint64_t>(key);
  a.offset = static_cast<uint64_t>(offset);
  a.scale = static_cast<float>(scale);
  const cpu::Isa isa = cpu::isa();
  a.philox = cpu::philox_groups_fn(isa);
  double* st = stats.data_ptr<double>();
  void* o = out.data_ptr();
  const at::ScalarType odt = out.scalar_type();
  FM_DISPATCH_FLOAT3(x.scalar_type(), op,
                     [&] { FM_ISA_CALL(isa, prune_impl<scalar_t>, x.data_ptr<scalar_t>(), n, o, odt, a, st); });
}

}  // namespace fastmerge
