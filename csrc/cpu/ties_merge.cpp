// ties_merge on the CPU: fused trim / drop / elect / disjoint merge in one pass over the experts. Semantics:
// fastmerge/ops/ties_merge.py (ties_merge_ref). The kernels are in ties_merge.inc, compiled once per
// instruction-set variant (see common.h).
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

}  // namespace cpu
}  // namespace fastmerge

#define FM_ISA_KERNELS "ties_merge.inc"
#include "isa_variants.inc"

namespace fastmerge {

using cpu::kElectNone;
using cpu::TaskParams;
using cpu::TiesArgs;

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
    FM_ISA_CALL(isa, ties_impl<scalar_t>, b, cpu::expert_ptrs<scalar_t>(experts), N, A, c);
  });
}

}  // namespace fastmerge
