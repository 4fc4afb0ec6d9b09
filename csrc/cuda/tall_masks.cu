// Launcher of tall_masks_cuda: the TALL masks, from the kernel shared with consensus_merge (tall.cu).
#include "tall.h"

// Entry points are defined with qualified names, so that a signature differing from the declaration in
// fastmerge/ops.h is a compile error (not a silent overload and a missing symbol at import).
using namespace fastmerge;
using namespace fastmerge::cuda;

void fastmerge::tall_masks_cuda(const OptTensor& base, const std::vector<at::Tensor>& experts,
                                const at::Tensor& lambdas, const OptTensor& mtl, at::Tensor& masks) {
  const int T = check_experts(base, experts);
  const at::Tensor& e0 = experts[0];
  const int64_t n = e0.numel();
  check_masks(masks, T, n, e0.device());
  TallArgs a = tall_args(base, experts, lambdas, mtl, T);
  if (n == 0) return;
  a.masks = masks.data_ptr<bool>();
  a.vec_masks = masks_aligned(masks, n);
  run_tall(a, e0);
}
