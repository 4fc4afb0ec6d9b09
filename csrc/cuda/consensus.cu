// Launchers of the multi-expert kernels: ties_merge_cuda, tall_masks_cuda, consensus_merge_cuda,
// emr_elect_cuda. Per-task parameters (params, lambdas) are CPU tensors, read here and passed by value.
#include "kernels/emr.cuh"
#include "kernels/sign_consensus.cuh"
#include "kernels/tall.cuh"
#include "launch_utils.h"

// Entry points are defined with qualified names, so that a signature differing from the declaration in
// fastmerge/ops.h is a compile error (not a silent overload and a missing symbol at import).
using namespace fastmerge;
using namespace fastmerge::cuda;

namespace {

// Whether every expert (and base) is 16-byte aligned (then every 8-element chunk is).
bool experts_aligned(const OptTensor& base, const std::vector<at::Tensor>& experts) {
  bool ok = !base.has_value() || is_aligned(base->data_ptr(), 16);
  for (const at::Tensor& e : experts) ok = ok && is_aligned(e.data_ptr(), 16);
  return ok;
}

// The bool masks [T, n]: 8-byte stores need every row start t * n aligned.
bool masks_aligned(const at::Tensor& masks, int64_t n) { return is_aligned(masks.data_ptr(), 8) && n % 8 == 0; }

void check_masks(const at::Tensor& masks, int T, int64_t n, const at::Device& dev) {
  TORCH_CHECK(masks.defined() && masks.is_cuda() && masks.device() == dev,
              "masks: must be on the experts' CUDA device");
  TORCH_CHECK(masks.scalar_type() == at::kBool, "masks: dtype must be bool, got ", masks.scalar_type());
  TORCH_CHECK(masks.numel() == static_cast<int64_t>(T) * n && masks.is_contiguous(),
              "masks: must be a contiguous tensor of T * numel = ", static_cast<int64_t>(T) * n, " elements");
}

template <typename T>
void launch_tall(const TallArgs& a, cudaStream_t stream) {
  auto kernel = tall_kernel<T>;
  const int grid = grid_size(kernel, kTallThreads, 0, ceil_div(ceil_div(a.n, kChunk), kTallThreads));
  kernel<<<grid, kTallThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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

}  // namespace

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

  c10::cuda::CUDAGuard guard(e0.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(dtype_code(e0, "experts"), [&](auto tag) { launch_tall<typename decltype(tag)::type>(a, stream); });
}

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

  c10::cuda::CUDAGuard guard(e0.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(dtype_code(e0, "experts"), [&](auto tag) { launch_tall<typename decltype(tag)::type>(a, stream); });
}

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
