// Host entry points of the fastmerge extension. Semantics: fastmerge/ops/<op>.py (the oracles); the
// Python adapters in fastmerge/backends/ validate arguments, make inputs contiguous and allocate outputs,
// so these functions receive contiguous tensors of checked shapes and dtypes and only fill outputs.
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace fastmerge {

using OptTensor = c10::optional<at::Tensor>;

// ---- CPU (csrc/cpu) --------------------------------------------------------------------------------------
void abs_histogram_cpu(const at::Tensor& x, at::Tensor& hist, int64_t level, int64_t prefix);
void row_kth_largest_abs_cpu(const at::Tensor& x, int64_t k, at::Tensor& out);
void order_window_cpu(const at::Tensor& x, int64_t start, int64_t stop, bool descending, bool topk,
                      at::Tensor& out);
void prune_cpu(const at::Tensor& x, const at::Tensor& lo, const at::Tensor& hi, at::Tensor& out,
               at::Tensor& stats, double p, int64_t seed, int64_t key, int64_t offset, double scale);
void della_prune_cpu(const at::Tensor& x, at::Tensor& out, double density, double epsilon, int64_t seed,
                     int64_t key, bool rescale);
void ties_merge_cpu(const OptTensor& base, const std::vector<at::Tensor>& experts, const at::Tensor& params,
                    const OptTensor& out, at::Tensor& counts, int64_t seed, int64_t key, int64_t offset,
                    int64_t elect, int64_t merge, bool weighted_elect, double zero_sign, double lam);
void gta_merge_cpu(const at::Tensor& base, const std::vector<at::Tensor>& experts, const std::vector<at::Tensor>& keep,
                   const at::Tensor& params, bool consensus, bool normalize, double lam, at::Tensor& out);
void tall_masks_cpu(const OptTensor& base, const std::vector<at::Tensor>& experts, const at::Tensor& lambdas,
                    const OptTensor& mtl, at::Tensor& masks);
void consensus_merge_cpu(const OptTensor& base, const std::vector<at::Tensor>& experts,
                         const at::Tensor& lambdas, const OptTensor& mtl, int64_t min_count, double lam,
                         at::Tensor& out);
void emr_elect_cpu(const OptTensor& base, const std::vector<at::Tensor>& experts, at::Tensor& tau_uni,
                   at::Tensor& masks, at::Tensor& stats);
void doge_grad_cpu(const at::Tensor& taus, const at::Tensor& a, const at::Tensor& d, at::Tensor& out);
void tv_combine_cpu(const at::Tensor& base, const at::Tensor& taus, const at::Tensor& coef, const at::Tensor& offsets,
                    at::Tensor& out);
void tv_coef_grad_cpu(const at::Tensor& grad, const at::Tensor& taus, const at::Tensor& offsets, at::Tensor& out);
void adam_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                   const at::Tensor& scale, int64_t repeat, double lr, double beta1, double beta2, double eps,
                   int64_t step);

// ---- the SIGBUS guard of mapped input files (csrc/cpu/mapped_guard.cpp) ----------------------------------
int64_t mapped_guard_watch(int64_t address, int64_t length);
void mapped_guard_unwatch(int64_t slot);
std::tuple<int64_t, int64_t> mapped_guard_faults();

#ifdef FASTMERGE_WITH_CUDA
// ---- CUDA (csrc/cuda) ------------------------------------------------------------------------------------
void abs_histogram_cuda(const at::Tensor& x, at::Tensor& hist, int64_t level, int64_t prefix);
void row_kth_largest_abs_cuda(const at::Tensor& x, int64_t k, at::Tensor& out);
void prune_cuda(const at::Tensor& x, const at::Tensor& lo, const at::Tensor& hi, at::Tensor& out,
                at::Tensor& stats, double p, int64_t seed, int64_t key, int64_t offset, double scale);
void ties_merge_cuda(const OptTensor& base, const std::vector<at::Tensor>& experts, const at::Tensor& params,
                     const OptTensor& out, at::Tensor& counts, int64_t seed, int64_t key, int64_t offset,
                     int64_t elect, int64_t merge, bool weighted_elect, double zero_sign, double lam);
void tall_masks_cuda(const OptTensor& base, const std::vector<at::Tensor>& experts, const at::Tensor& lambdas,
                     const OptTensor& mtl, at::Tensor& masks);
void consensus_merge_cuda(const OptTensor& base, const std::vector<at::Tensor>& experts,
                          const at::Tensor& lambdas, const OptTensor& mtl, int64_t min_count, double lam,
                          at::Tensor& out);
void emr_elect_cuda(const OptTensor& base, const std::vector<at::Tensor>& experts, at::Tensor& tau_uni,
                    at::Tensor& masks, at::Tensor& stats);
#endif

}  // namespace fastmerge
