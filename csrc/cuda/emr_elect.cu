// Launcher of emr_elect_cuda: EMR-Merging's elect / mask / rescale statistics.
#include "kernels/emr_elect.cuh"
#include "launch_utils.h"

// Entry points are defined with qualified names, so that a signature differing from the declaration in
// fastmerge/ops.h is a compile error (not a silent overload and a missing symbol at import).
using namespace fastmerge;
using namespace fastmerge::cuda;

void fastmerge::emr_elect_cuda(const OptTensor& base, const std::vector<at::Tensor>& experts, at::Tensor& tau_uni,
                               at::Tensor& masks, at::Tensor& stats) {
  const int T = check_experts(base, experts);
  const at::Tensor& e0 = experts[0];
  const int64_t n = e0.numel();
  const int tau_dtype = check_float_tensor(tau_uni, "tau_uni", n, e0.device());
  check_masks(masks, T, n, e0.device());
  check_accumulator(stats, "stats", at::kDouble, static_cast<int64_t>(T) * 2, e0.device());
  if (n == 0) return;

  EmrArgs a{};
  for (int t = 0; t < T; ++t) a.experts[t] = experts[t].data_ptr();
  a.base = base.has_value() ? base->data_ptr() : nullptr;
  a.tau = tau_uni.data_ptr();
  a.tau_dtype = tau_dtype;
  a.masks = masks.data_ptr<bool>();
  a.stats = stats.data_ptr<double>();
  a.n = n;
  a.T = T;
  a.vec_in = experts_aligned(base, experts);
  a.vec_out = is_aligned(a.tau, 16);
  a.vec_masks = masks_aligned(masks, n);

  c10::cuda::CUDAGuard guard(e0.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(dtype_code(e0, "experts"), [&](auto tag) {
    using Tin = typename decltype(tag)::type;
    auto kernel = emr_elect_kernel<Tin>;
    const int grid = grid_size(kernel, kEmrThreads, 0, ceil_div(ceil_div(n, kChunk), kEmrThreads));
    kernel<<<grid, kEmrThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
