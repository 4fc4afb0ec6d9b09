// consensus_merge on the CPU: the multi-task vector where enough TALL masks are set, from the kernel shared with
// tall_masks (tall.cpp), no mask stored. Semantics: fastmerge/ops/consensus_merge.py (consensus_merge_ref).
#include "tall.h"

namespace fastmerge {

void consensus_merge_cpu(const OptTensor& base, const std::vector<at::Tensor>& experts,
                         const at::Tensor& lambdas, const OptTensor& mtl, int64_t min_count, double lam,
                         at::Tensor& out) {
  const char* op = "consensus_merge_cpu";
  const int64_t N = cpu::check_experts(base, experts, op);
  cpu::check_float3(out, op, "out");
  TORCH_CHECK(out.numel() == N, op, ": out has ", out.numel(), " elements, experts have ", N);
  cpu::TallArgs A{};
  A.out = N ? out.data_ptr() : nullptr;
  A.odt = out.scalar_type();
  A.min_count = min_count;
  A.lam_out = static_cast<float>(lam);
  cpu::run_tall(op, N, base, experts, lambdas, mtl, A);
}

}  // namespace fastmerge
