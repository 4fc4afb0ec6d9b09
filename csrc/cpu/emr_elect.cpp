// emr_elect on the CPU: EMR-Merging's elect / mask / rescale statistics in one pass. Semantics:
// fastmerge/ops/emr_elect.py (emr_elect_ref). The kernel is in emr_elect.inc, compiled once per instruction-set
// variant (see common.h).
#include "common.h"

#define FM_ISA_KERNELS "emr_elect.inc"
#include "isa_variants.inc"

namespace fastmerge {

void emr_elect_cpu(const OptTensor& base, const std::vector<at::Tensor>& experts, at::Tensor& tau_uni,
                   at::Tensor& masks, at::Tensor& stats) {
  const char* op = "emr_elect_cpu";
  const int64_t N = cpu::check_experts(base, experts, op);
  const int64_t T = static_cast<int64_t>(experts.size());
  cpu::check_float3(tau_uni, op, "tau_uni");
  TORCH_CHECK(tau_uni.numel() == N, op, ": tau_uni has ", tau_uni.numel(), " elements, experts have ", N);
  cpu::check_exact(masks, at::kBool, T * N, op, "masks");
  cpu::check_exact(stats, at::kDouble, T * 2, op, "stats");
  if (N == 0) return;
  void* o = tau_uni.data_ptr();
  const at::ScalarType odt = tau_uni.scalar_type();
  bool* mk = masks.data_ptr<bool>();
  double* st = stats.data_ptr<double>();
  const cpu::Isa isa = cpu::isa();
  const bool hb = cpu::has(base);
  FM_DISPATCH_FLOAT3(experts[0].scalar_type(), op, [&] {
    const scalar_t* b = hb ? base->data_ptr<scalar_t>() : nullptr;
    FM_ISA_CALL(isa, emr_impl<scalar_t>, b, cpu::expert_ptrs<scalar_t>(experts), N, o, odt, mk, st);
  });
}

}  // namespace fastmerge
