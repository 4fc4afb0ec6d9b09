// Launcher of abs_histogram_cuda: the magnitude-key histogram of the streaming exact top-k threshold.
#include <limits>

#include "kernels/abs_histogram.cuh"
#include "launch_utils.h"

// Entry points are defined with qualified names, so that a signature differing from the declaration in
// fastmerge/ops.h is a compile error (not a silent overload and a missing symbol at import).
using namespace fastmerge;
using namespace fastmerge::cuda;

void fastmerge::abs_histogram_cuda(const at::Tensor& x, at::Tensor& hist, int64_t level, int64_t prefix) {
  TORCH_CHECK(level == 0 || level == 1, "level: must be 0 or 1, got ", level);
  TORCH_CHECK(x.is_cuda(), "x: must be a CUDA tensor");
  TORCH_CHECK(x.is_contiguous(), "x: must be contiguous");
  const int dt = dtype_code(x, "x");
  check_accumulator(hist, "hist", at::kLong, 65536, x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  // Keys are < 2^31, so key >> 16 < 32768: a level-1 prefix outside [0, 32768) matches nothing.
  if (level == 1 && (prefix < 0 || prefix >= 32768)) return;

  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, current_device()));
  // The shared histogram needs 128 KiB plus a few static bytes and the 1 KiB the runtime reserves.
  const bool shared_hist = smem_optin >= static_cast<int>(kHistSmemBytes) + 1024;
  const bool vec = is_aligned(x.data_ptr(), 16);
  auto* h = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  const uint32_t pfx = static_cast<uint32_t>(level == 1 ? prefix : 0);

  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xp = static_cast<const T*>(x.data_ptr());
    if (shared_hist) {
      auto kernel = level == 1 ? abs_histogram_kernel<T, true> : abs_histogram_kernel<T, false>;
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kHistSmemBytes)));
      // One block per SM (128 KiB each), no more blocks than 1024-thread steps of work; at level 0 at least
      // enough blocks that none takes more than kHistMaxStepsLevel0 steps (its 32-bit counters stay exact).
      const int64_t nchunks = ceil_div(n, kHistPerThread);
      int64_t blocks = std::min<int64_t>(sm_count(), ceil_div(nchunks, kHistThreads));
      blocks = std::max<int64_t>(blocks, ceil_div(nchunks, kHistThreads * kHistMaxStepsLevel0));
      TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "x: too many elements");
      kernel<<<static_cast<unsigned>(blocks), kHistThreads, kHistSmemBytes, stream>>>(xp, n, vec, pfx, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      auto kernel = level == 1 ? abs_histogram_global_kernel<T, true> : abs_histogram_global_kernel<T, false>;
      const int grid = grid_size(kernel, 256, 0, ceil_div(ceil_div(n, kChunk), 256));
      kernel<<<grid, 256, 0, stream>>>(xp, n, vec, pfx, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}
