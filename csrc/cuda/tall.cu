// The TALL kernel's launch, shared by tall_masks_cuda and consensus_merge_cuda (tall.h).
#include "tall.h"

namespace fastmerge {
namespace cuda {

namespace {

template <typename T>
void launch_tall(const TallArgs& a, cudaStream_t stream) {
  auto kernel = tall_kernel<T>;
  const int grid = grid_size(kernel, kTallThreads, 0, ceil_div(ceil_div(a.n, kChunk), kTallThreads));
  kernel<<<grid, kTallThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Shared by tall_masks_cuda and consensus_merge_cuda: everything but the outputs.
TallArgs tall_args(const OptTensor& base, const std::vector<at::Tensor>& experts, const at::Tensor& lambdas,
                   const OptTensor& mtl, int T) {
  const int64_t n = experts[0].numel();
  const float* lam = host_floats(lambdas, "lambdas", T);
  TallArgs a{};
  for (int t = 0; t < T; ++t) {
    a.experts[t] = experts[t].data_ptr();
    a.lambdas[t] = lam[t];
  }
  a.base = base.has_value() ? base->data_ptr() : nullptr;
  a.n = n;
  a.T = T;
  a.vec_in = experts_aligned(base, experts);
  if (mtl.has_value()) {
    a.mtl_dtype = check_float_tensor(*mtl, "mtl", n, experts[0].device());
    a.mtl = mtl->data_ptr();
    a.vec_mtl = is_aligned(a.mtl, 16);
  }
  return a;
}

void run_tall(const TallArgs& a, const at::Tensor& e0) {
  c10::cuda::CUDAGuard guard(e0.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(dtype_code(e0, "experts"), [&](auto tag) { launch_tall<typename decltype(tag)::type>(a, stream); });
}

}  // namespace cuda
}  // namespace fastmerge
