// Launcher of prune_cuda: magnitude band + DARE drop + rescale, with the L1 stats.
#include "kernels/prune.cuh"
#include "launch_utils.h"

// Entry points are defined with qualified names, so that a signature differing from the declaration in
// fastmerge/ops.h is a compile error (not a silent overload and a missing symbol at import).
using namespace fastmerge;
using namespace fastmerge::cuda;

void fastmerge::prune_cuda(const at::Tensor& x, const at::Tensor& lo, const at::Tensor& hi, at::Tensor& out,
                           at::Tensor& stats, double p, int64_t seed, int64_t key, int64_t offset, double scale) {
  TORCH_CHECK(x.is_cuda(), "x: must be a CUDA tensor");
  TORCH_CHECK(x.is_contiguous(), "x: must be contiguous");
  const int dt_in = dtype_code(x, "x");
  const int64_t n = x.numel();
  const int dt_out = check_float_tensor(out, "out", n, x.device());
  check_accumulator(stats, "stats", at::kDouble, 2, x.device());
  const int64_t rows = lo.numel();
  check_accumulator(lo, "lo", at::kFloat, rows, x.device());
  check_accumulator(hi, "hi", at::kFloat, rows, x.device());
  if (n == 0) return;
  TORCH_CHECK(rows >= 1 && n % rows == 0, "lo: numel (", rows, ") must divide x.numel() (", n, ")");

  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PruneArgs a{};
  a.x = x.data_ptr();
  a.out = out.data_ptr();
  a.lo = lo.data_ptr<float>();
  a.hi = hi.data_ptr<float>();
  a.stats = stats.data_ptr<double>();
  a.n = n;
  a.rows = rows;
  a.cols = n / rows;
  a.seed = static_cast<uint64_t>(seed);
  a.key = static_cast<uint64_t>(key);
  a.offset = static_cast<uint64_t>(offset);
  a.drop = p > 0.0;                    // the reference's `if p > 0` (in double)
  a.p = static_cast<float>(p);         // then `u >= p` compares in fp32
  a.scale = static_cast<float>(scale); // `kept * scale` multiplies in fp32
  a.vec_in = is_aligned(a.x, 16);
  a.vec_out = is_aligned(a.out, 16);

  dispatch_dtype(dt_in, [&](auto tin) {
    using Tin = typename decltype(tin)::type;
    dispatch_dtype(dt_out, [&](auto tout) {
      using Tout = typename decltype(tout)::type;
      auto kernel = prune_kernel<Tin, Tout>;
      const int grid = grid_size(kernel, kPruneThreads, 0, ceil_div(ceil_div(n, kChunk), kPruneThreads));
      kernel<<<grid, kPruneThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}
