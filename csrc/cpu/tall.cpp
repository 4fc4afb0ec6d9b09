// The TALL kernel on the CPU, shared by tall_masks and consensus_merge (tall.h). The kernel is in tall.inc,
// compiled once per instruction-set variant (see common.h).
#include "tall.h"

#define FM_ISA_KERNELS "tall.inc"
#include "isa_variants.inc"

namespace fastmerge {
namespace cpu {

void run_tall(const char* op, int64_t N, const OptTensor& base, const std::vector<at::Tensor>& experts,
              const at::Tensor& lambdas, const OptTensor& mtl, TallArgs A) {
  const int64_t T = static_cast<int64_t>(experts.size());
  check_exact(lambdas, at::kFloat, T, op, "lambdas");
  if (has(mtl)) {
    check_float3(*mtl, op, "mtl");
    TORCH_CHECK(mtl->numel() == N, op, ": mtl has ", mtl->numel(), " elements, experts have ", N);
  }
  if (N == 0) return;
  A.lam = lambdas.data_ptr<float>();
  A.mtl = has(mtl) ? mtl->data_ptr() : nullptr;
  A.mtl_dt = has(mtl) ? mtl->scalar_type() : at::kFloat;
  const Isa isa = cpu::isa();
  const bool hb = has(base);
  FM_DISPATCH_FLOAT3(experts[0].scalar_type(), op, [&] {
    const scalar_t* b = hb ? base->data_ptr<scalar_t>() : nullptr;
    FM_ISA_CALL(isa, tall_impl<scalar_t>, b, expert_ptrs<scalar_t>(experts), N, A);
  });
}

}  // namespace cpu
}  // namespace fastmerge
