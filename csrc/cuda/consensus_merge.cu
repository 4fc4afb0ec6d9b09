// Launcher of consensus_merge_cuda: the multi-task vector where enough TALL masks are set, from the kernel shared
// with tall_masks (tall.cu), no mask stored.
#include "tall.h"

// Entry points are defined with qualified names, so that a signature differing from the declaration in
// fastmerge/ops.h is a compile error (not a silent overload and a missing symbol at import).
using namespace fastmerge;
using namespace fastmerge::cuda;

void fastmerge::consensus_merge_cuda(const OptTensor& base, const std::vector<at::Tensor>& experts,
                                     const at::Tensor& lambdas, const OptTensor& mtl, int64_t min_count, double lam,
                                     at::Tensor& out) {
  const int T = check_experts(base, experts);
  const at::Tensor& e0 = experts[0];
  const int64_t n = e0.numel();
  const int out_dtype = check_float_tensor(out, "out", n, e0.device());
  TallArgs a = tall_args(base, experts, lambdas, mtl, T);
  if (n == 0) return;
  a.out = out.data_ptr();
  a.out_dtype = out_dtype;
  a.vec_out = is_aligned(a.out, 16);
  a.min_count = min_count;
  a.lam = static_cast<float>(lam);  // lam * (...): fp32
  run_tall(a, e0);
}
