// tall_masks on the CPU: the TALL masks of the experts, from the kernel shared with consensus_merge (tall.cpp).
// Semantics: fastmerge/ops/tall_masks.py (tall_masks_ref).
#include "tall.h"

namespace fastmerge {

void tall_masks_cpu(const OptTensor& base, const std::vector<at::Tensor>& experts, const at::Tensor& lambdas,
                    const OptTensor& mtl, at::Tensor& masks) {
  const char* op = "tall_masks_cpu";
  const int64_t N = cpu::check_experts(base, experts, op);
  cpu::check_exact(masks, at::kBool, static_cast<int64_t>(experts.size()) * N, op, "masks");
  cpu::TallArgs A{};
  A.masks = N ? masks.data_ptr<bool>() : nullptr;
  cpu::run_tall(op, N, base, experts, lambdas, mtl, A);
}

}  // namespace fastmerge
