// Launcher of ties_merge_cuda: fused trim / drop / elect / disjoint merge. Per-task parameters (params) are a CPU
// tensor, read here and passed by value.
#include "kernels/ties_merge.cuh"
#include "launch_utils.h"

// Entry points are defined with qualified names, so that a signature differing from the declaration in
// fastmerge/ops.h is a compile error (not a silent overload and a missing symbol at import).
using namespace fastmerge;
using namespace fastmerge::cuda;

void fastmerge::ties_merge_cuda(const OptTensor& base, const std::vector<at::Tensor>& experts, const at::Tensor& params,
                                const OptTensor& out, at::Tensor& counts, int64_t seed, int64_t key, int64_t offset,
                                int64_t elect, int64_t merge, bool weighted_elect, double zero_sign, double lam) {
  const int T = check_experts(base, experts);
  const at::Tensor& e0 = experts[0];
  const int64_t n = e0.numel();
  TORCH_CHECK(elect >= kElectNone && elect <= kElectCount, "elect: must be 0 (none), 1 (sum) or 2 (count), got ",
              elect);
  TORCH_CHECK(merge >= kMergeSum && merge <= kMergeMax, "merge: must be 0 (sum), 1 (mean), 2 (wmean) or 3 (max), got ",
              merge);
  check_accumulator(counts, "counts", at::kLong, 2, e0.device());
  const float* prm = host_floats(params, "params", static_cast<int64_t>(T) * 5);
  TORCH_CHECK(params.dim() == 2 && params.size(1) == 5, "params: must have shape (T, 5)");
  TiesArgs a{};
  if (out.has_value()) {
    a.out_dtype = check_float_tensor(*out, "out", n, e0.device());
    a.out = out->data_ptr();
    a.vec_out = is_aligned(a.out, 16);
  }
  if (n == 0) return;
  if (!out.has_value() && elect == kElectNone) return;  // nothing to compute: no output, zero counts

  for (int t = 0; t < T; ++t) {
    a.experts[t] = experts[t].data_ptr();
    a.w[t] = prm[5 * t + 0];
    a.lo[t] = prm[5 * t + 1];
    a.hi[t] = prm[5 * t + 2];
    a.p[t] = prm[5 * t + 3];
    a.s[t] = prm[5 * t + 4];
  }
  a.base = base.has_value() ? base->data_ptr() : nullptr;
  a.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  a.n = n;
  a.seed = static_cast<uint64_t>(seed);
  a.key = static_cast<uint64_t>(key);
  a.offset = static_cast<uint64_t>(offset);
  a.T = T;
  a.elect = static_cast<int>(elect);
  a.zero_sign = static_cast<float>(zero_sign);  // torch.full_like(ssum, zero_sign): fp32
  a.lam = static_cast<float>(lam);              // lam * acc: fp32
  a.weighted_elect = weighted_elect;
  a.vec_in = experts_aligned(base, experts);
  const int m = out.has_value() ? static_cast<int>(merge) : static_cast<int>(kMergeCountsOnly);

  c10::cuda::CUDAGuard guard(e0.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(dtype_code(e0, "experts"), [&](auto tag) {
    using Tin = typename decltype(tag)::type;
    void (*kernel)(const TiesArgs) = nullptr;
    switch (m) {
      case kMergeSum:
        kernel = ties_merge_kernel<Tin, kMergeSum>;
        break;
      case kMergeMean:
        kernel = ties_merge_kernel<Tin, kMergeMean>;
        break;
      case kMergeWMean:
        kernel = ties_merge_kernel<Tin, kMergeWMean>;
        break;
      case kMergeMax:
        kernel = ties_merge_kernel<Tin, kMergeMax>;
        break;
      default:
        kernel = ties_merge_kernel<Tin, kMergeCountsOnly>;
        break;
    }
    const int grid = grid_size(kernel, kTiesThreads, 0, ceil_div(ceil_div(n, kChunk), kTiesThreads));
    kernel<<<grid, kTiesThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
