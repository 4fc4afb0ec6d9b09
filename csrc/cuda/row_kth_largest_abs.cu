// Launcher of row_kth_largest_abs_cuda: the k-th largest |x| of every row by radix select.
#include <limits>

#include "kernels/row_kth_largest_abs.cuh"
#include "launch_utils.h"

// Entry points are defined with qualified names, so that a signature differing from the declaration in
// fastmerge/ops.h is a compile error (not a silent overload and a missing symbol at import).
using namespace fastmerge;
using namespace fastmerge::cuda;

void fastmerge::row_kth_largest_abs_cuda(const at::Tensor& x, int64_t k, at::Tensor& out) {
  TORCH_CHECK(x.is_cuda(), "x: must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "x: must be 2-D (rows, cols), got ", x.dim(), " dimensions");
  TORCH_CHECK(x.is_contiguous(), "x: must be contiguous");
  const int dt = dtype_code(x, "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(k >= 0 && k <= cols, "k: must be in [0, ", cols, "], got ", k);
  check_accumulator(out, "out", at::kFloat, rows, x.device());
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  if (k == 0) {  // keep nothing
    out.fill_(std::numeric_limits<float>::infinity());
    return;
  }
  TORCH_CHECK(cols <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()),
              "x: rows longer than 2^32 - 1 are not supported");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool cache = cols <= kSelectCacheMax;
  const size_t smem = cache ? static_cast<size_t>(cols) * sizeof(uint32_t) : 0;
  const bool vec = is_aligned(x.data_ptr(), 16) && (cols * static_cast<int64_t>(x.element_size())) % 16 == 0;
  float* o = out.data_ptr<float>();
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = row_kth_largest_abs_kernel<T>;
    const int grid = grid_size(kernel, kSelectThreads, smem, rows);
    kernel<<<grid, kSelectThreads, smem, stream>>>(static_cast<const T*>(x.data_ptr()), rows, cols, k, vec, cache,
                                                   o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
