// Sign-consensus merges on the CPU: ties_merge (fused trim / drop / elect / disjoint merge), TALL masks,
// consensus merging and EMR-Merging's election. Semantics: fastmerge/reference.py. The kernels are in
// consensus_kernels.inc, compiled once per instruction-set variant (see common.h).
#include "common.h"

namespace fastmerge {
namespace cpu {

struct TaskParams {
  float w, lo, hi, p, s;
  bool drop;     // p > 0: draw uniforms
  uint64_t key;  // key + t (mod 2^64)
};

struct TiesArgs {
  std::vector<TaskParams> task;
  uint64_t seed, offset;
  int elect, merge;
  bool weighted;
  float zero_sign, lam;
  float wsum;  // "none" + "wmean": 0 + w_0 * 1 + ... + w_{T-1} * 1 in fp32 (every task agrees everywhere)
  void* out;   // nullptr: counts only
  at::ScalarType odt;
  PhiloxGroupsFn philox;
};

enum { kElectNone = 0, kElectSum = 1, kElectCount = 2 };
enum { kMergeSum = 0, kMergeMean = 1, kMergeWMean = 2, kMergeMax = 3 };

struct TallArgs {
  const float* lam;  // (T,)
  const void* mtl;   // nullptr: mtl = sum_t delta_t
  at::ScalarType mtl_dt;
  bool* masks;  // (T, N), or nullptr (consensus)
  // consensus only
  void* out;  // nullptr (tall_masks)
  at::ScalarType odt;
  int64_t min_count;
  float lam_out;
};

}  // namespace cpu
}  // namespace fastmerge

#define FM_ISA_NS isa_base
#include "block_ops.inc"
#include "consensus_kernels.inc"
#undef FM_ISA_NS

#if FM_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2")
#define FM_ISA_NS isa_avx2
#include "block_ops.inc"
#include "consensus_kernels.inc"
#undef FM_ISA_NS
#pragma GCC pop_options
#endif

namespace fastmerge {

namespace {

using cpu::kElectNone;
using cpu::TallArgs;
using cpu::TaskParams;
using cpu::TiesArgs;

template <typename T>
std::vector<const T*> expert_ptrs(const std::vector<at::Tensor>& experts) {
  std::vector<const T*> v;
  v.reserve(experts.size());
  for (const auto& e : experts) v.push_back(e.data_ptr<T>());
  return v;
}

}  // namespace

void ties_merge_cpu(const OptTensor& base, const std::vector<at::Tensor>& experts, const at::Tensor& params,
                    const OptTensor& out, at::Tensor& counts, int64_t seed, int64_t key, int64_t offset,
                    int64_t elect, int64_t merge, bool weighted_elect, double zero_sign, double lam) {
  const char* op = "ties_merge_cpu";
  const int64_t N = cpu::check_experts(base, experts, op);
  const int64_t T = static_cast<int64_t>(experts.size());
  cpu::check_exact(params, at::kFloat, T * 5, op, "params");
  cpu::check_exact(counts, at::kLong, 2, op, "counts");
  TORCH_CHECK(elect >= 0 && elect <= 2, op, ": elect must be 0 (none), 1 (sum) or 2 (count), got ", elect);
  TORCH_CHECK(merge >= 0 && merge <= 3, op, ": merge must be 0 (sum), 1 (mean), 2 (wmean) or 3 (max), got ",
              merge);
  const bool want_out = cpu::has(out);
  if (want_out) {
    cpu::check_float3(*out, op, "out");
    TORCH_CHECK(out->numel() == N, op, ": out has ", out->numel(), " elements, experts have ", N);
  }
  if (N == 0 || (!want_out && elect == kElectNone)) return;
  TiesArgs A;
  const float* prm = params.data_ptr<float>();
  A.task.resize(static_cast<size_t>(T));
  float wsum = 0.0f;
  for (int64_t t = 0; t < T; ++t) {
    TaskParams& tp = A.task[t];
    tp.w = prm[5 * t + 0];
    tp.lo = prm[5 * t + 1];
    tp.hi = prm[5 * t + 2];
    tp.p = prm[5 * t + 3];
    tp.s = prm[5 * t + 4];
    tp.drop = tp.p > 0.0f;
    tp.key = static_cast<uint64_t>(key) + static_cast<uint64_t>(t);
    wsum = wsum + tp.w * 1.0f;
  }
  A.seed = static_cast<uint64_t>(seed);
  A.offset = static_cast<uint64_t>(offset);
  A.elect = static_cast<int>(elect);
  A.merge = static_cast<int>(merge);
  A.weighted = weighted_elect;
  A.zero_sign = static_cast<float>(zero_sign);
  A.lam = static_cast<float>(lam);
  A.wsum = wsum;
  A.out = want_out ? out->data_ptr() : nullptr;
  A.odt = want_out ? out->scalar_type() : at::kFloat;
  const cpu::Isa isa = cpu::isa();
  A.philox = cpu::philox_groups_fn(isa);
  int64_t* c = counts.data_ptr<int64_t>();
  const bool hb = cpu::has(base);
  FM_DISPATCH_FLOAT3(experts[0].scalar_type(), op, [&] {
    const scalar_t* b = hb ? base->data_ptr<scalar_t>() : nullptr;
    FM_ISA_CALL(isa, ties_impl<scalar_t>, b, expert_ptrs<scalar_t>(experts), N, A, c);
  });
}

namespace {

// Checks and arguments shared by the two TALL entry points; runs the kernel (masks and/or merged out).
// N: the element count the caller got from cpu::check_experts.
void run_tall(const char* op, int64_t N, const OptTensor& base, const std::vector<at::Tensor>& experts,
              const at::Tensor& lambdas, const OptTensor& mtl, TallArgs A) {
  const int64_t T = static_cast<int64_t>(experts.size());
  cpu::check_exact(lambdas, at::kFloat, T, op, "lambdas");
  if (cpu::has(mtl)) {
    cpu::check_float3(*mtl, op, "mtl");
    TORCH_CHECK(mtl->numel() == N, op, ": mtl has ", mtl->numel(), " elements, experts have ", N);
  }
  if (N == 0) return;
  A.lam = lambdas.data_ptr<float>();
  A.mtl = cpu::has(mtl) ? mtl->data_ptr() : nullptr;
  A.mtl_dt = cpu::has(mtl) ? mtl->scalar_type() : at::kFloat;
  const cpu::Isa isa = cpu::isa();
  const bool hb = cpu::has(base);
  FM_DISPATCH_FLOAT3(experts[0].scalar_type(), op, [&] {
    const scalar_t* b = hb ? base->data_ptr<scalar_t>() : nullptr;
    FM_ISA_CALL(isa, tall_impl<scalar_t>, b, expert_ptrs<scalar_t>(experts), N, A);
  });
}

}  // namespace

void tall_masks_cpu(const OptTensor& base, const std::vector<at::Tensor>& experts, const at::Tensor& lambdas,
                    const OptTensor& mtl, at::Tensor& masks) {
  const char* op = "tall_masks_cpu";
  const int64_t N = cpu::check_experts(base, experts, op);
  cpu::check_exact(masks, at::kBool, static_cast<int64_t>(experts.size()) * N, op, "masks");
  TallArgs A{};
  A.masks = N ? masks.data_ptr<bool>() : nullptr;
  run_tall(op, N, base, experts, lambdas, mtl, A);
}

void consensus_merge_cpu(const OptTensor& base, const std::vector<at::Tensor>& experts,
                         const at::Tensor& lambdas, const OptTensor& mtl, int64_t min_count, double lam,
                         at::Tensor& out) {
  const char* op = "consensus_merge_cpu";
  const int64_t N = cpu::check_experts(base, experts, op);
  cpu::check_float3(out, op, "out");
  TORCH_CHECK(out.numel() == N, op, ": out has ", out.numel(), " elements, experts have ", N);
  TallArgs A{};
  A.out = N ? out.data_ptr() : nullptr;
  A.odt = out.scalar_type();
  A.min_count = min_count;
  A.lam_out = static_cast<float>(lam);
  run_tall(op, N, base, experts, lambdas, mtl, A);
}

void emr_elect_cpu(const OptTensor& base, const std::vector<at::Tensor>& experts, at::Tensor& tau_uni,
                   at::Tensor& masks, at::Tensor& stats) {
  const char* op = "emr_elect_cpu";
  const int64_t N = cpu::check_experts(base, experts, op);
  const int64_t T = static_cast<int64_t>(experts.size());
  cpu::check_float3(tau_uni, op, "tau_uni");
  TORCH_CHECK(tau_uni.numel() == N, op, ": tau_uni has ", tau_uni.numel(), " elements, experts have ", N);
  cpu::check_exact(masks, at::kBool, T * N, op, "masks");
  cpu::check_exact(stats, at::kDouble, T * 2, op, "stats");
  if (N == 0) return;
  void* o = tau_uni.data_ptr();
  const at::ScalarType odt = tau_uni.scalar_type();
  bool* mk = masks.data_ptr<bool>();
  double* st = stats.data_ptr<double>();
  const cpu::Isa isa = cpu::isa();
  const bool hb = cpu::has(base);
  FM_DISPATCH_FLOAT3(experts[0].scalar_type(), op, [&] {
    const scalar_t* b = hb ? base->data_ptr<scalar_t>() : nullptr;
    FM_ISA_CALL(isa, emr_impl<scalar_t>, b, expert_ptrs<scalar_t>(experts), N, o, odt, mk, st);
  });
}

}  // namespace fastmerge
