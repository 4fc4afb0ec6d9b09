// gta_merge on the CPU: mergekit's generalised task arithmetic, rounding for rounding, in one pass.
// Semantics: fastmerge/ops/gta_merge.py (gta_merge_ref).
//
// mergekit computes every step as a whole-tensor op in the inputs' dtype: each product, quotient and sum is
// done in fp32 and rounded to the dtype (torch's CPU opmath), and a sum over the task dimension accumulates in
// fp32 from +0, task 0 first, and rounds once. Per element that is a short fixed sequence, done here for a
// block of elements at a time with the same roundings (round-to-nearest-even, as the c10 conversions), so the
// result is mergekit's to the bit without its (T, N) intermediates. fp32 with more than four tasks is not
// handled here (torch's fp32 sum over five or more rows is not a plain sequential sum); the Python side
// checks.
#include "common.h"

namespace fastmerge {

namespace {

template <typename T>
inline float rnd(float v) {
  return cpu::to_f32(cpu::from_f32<T>(v));
}
template <>
inline float rnd<float>(float v) {
  return v;
}

struct GtaArgs {
  std::vector<float> w, s;  // per task: weight and L1-rescale factor, exact values of the dtype
  bool consensus, normalize, scale_lam;
  float lam, divisor;  // divisor: the whole-tensor one (no consensus): round(sum w), 1 when |.| < 1e-8
};

template <typename T, typename O>
void gta_impl(const T* b, const std::vector<const T*>& xs, const std::vector<const bool*>& keep, const GtaArgs& A,
              O* out, int64_t n) {
  const int64_t T_ = static_cast<int64_t>(xs.size());
  const int64_t nblocks = (n + cpu::kBlock - 1) / cpu::kBlock;
  const int nt = cpu::threads_for(n * T_, int64_t(1) << 16);
#pragma omp parallel num_threads(nt)
  {
    cpu::Scratch<float> scratch(static_cast<size_t>(T_ * cpu::kBlock + 2 * cpu::kBlock));
    float* d = scratch.ptr();
    float* bf = d + T_ * cpu::kBlock;
    float* acc = bf + cpu::kBlock;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t i0 = blk * cpu::kBlock;
      const int64_t m = std::min<int64_t>(cpu::kBlock, n - i0);
      for (int64_t i = 0; i < m; ++i) bf[i] = cpu::to_f32(b[i0 + i]);
      for (int64_t t = 0; t < T_; ++t) {
        const T* x = xs[t] + i0;
        const bool* k = keep[t] ? keep[t] + i0 : nullptr;
        float* dt = d + t * cpu::kBlock;
        const float w = A.w[t], s = A.s[t];
        for (int64_t i = 0; i < m; ++i) {
          float v = rnd<T>(cpu::to_f32(x[i]) - bf[i]);
          if (k) v = k[i] ? v : v * 0.0f;  // delta * mask: -0 and NaN as the product gives them
          v = rnd<T>(v * s);
          dt[i] = rnd<T>(v * w);
        }
      }
      if (A.consensus) {
        float* div = acc;
        for (int64_t i = 0; i < m; ++i) {
          float vote = 0.0f;
          for (int64_t t = 0; t < T_; ++t) vote += d[t * cpu::kBlock + i];
          const bool pos = rnd<T>(vote) >= 0.0f;
          float mixed = 0.0f, dv = 0.0f;
          for (int64_t t = 0; t < T_; ++t) {
            const float v = d[t * cpu::kBlock + i];
            const bool agree = pos ? v > 0.0f : v < 0.0f;  // sign(v) == majority sign
            mixed += agree ? v : v * 0.0f;
            dv += agree ? A.w[t] : A.w[t] * 0.0f;
          }
          dv = rnd<T>(dv);
          div[i] = dv == 0.0f ? 1.0f : dv;
          d[i] = rnd<T>(mixed);  // task 0's row is done with: it holds the merged delta now
        }
      } else {
        for (int64_t i = 0; i < m; ++i) {
          float mixed = 0.0f;
          for (int64_t t = 0; t < T_; ++t) mixed += d[t * cpu::kBlock + i];
          d[i] = rnd<T>(mixed);
          acc[i] = A.divisor;
        }
      }
      O* o = out + i0;
      for (int64_t i = 0; i < m; ++i) {
        float v = d[i];
        if (A.normalize) v = rnd<T>(v / acc[i]);
        if (A.scale_lam) v = rnd<T>(v * A.lam);
        o[i] = cpu::from_f32<O>(rnd<T>(v + bf[i]));
      }
    }
  }
}

}  // namespace

void gta_merge_cpu(const at::Tensor& base, const std::vector<at::Tensor>& experts, const std::vector<at::Tensor>& keep,
                   const at::Tensor& params, bool consensus, bool normalize, double lam, at::Tensor& out) {
  const char* op = "gta_merge_cpu";
  const int64_t N = cpu::check_experts(base, experts, op);
  const int64_t T = static_cast<int64_t>(experts.size());
  TORCH_CHECK(T >= 1, op, ": needs at least one expert");
  TORCH_CHECK(keep.empty() || static_cast<int64_t>(keep.size()) == T, op, ": keep must be empty or one per expert");
  cpu::check_exact(params, at::kDouble, T * 2, op, "params");
  cpu::check_float3(out, op, "out");
  TORCH_CHECK(out.numel() == N, op, ": out has ", out.numel(), " elements, experts have ", N);
  TORCH_CHECK(base.scalar_type() != at::kFloat || T <= 4, op, ": float32 with more than 4 experts is not handled "
              "(torch sums five or more fp32 rows in another order; the Python op runs the oracle there)");
  std::vector<const bool*> kp(static_cast<size_t>(T), nullptr);
  for (size_t t = 0; t < keep.size(); ++t) {
    if (!keep[t].defined() || keep[t].numel() == 0) continue;
    cpu::check_exact(keep[t], at::kBool, N, op, "keep[t]");
    kp[t] = keep[t].data_ptr<bool>();
  }
  GtaArgs A;
  const double* prm = params.data_ptr<double>();
  float wsum = 0.0f;
  for (int64_t t = 0; t < T; ++t) {
    A.w.push_back(static_cast<float>(prm[2 * t]));
    A.s.push_back(static_cast<float>(prm[2 * t + 1]));
    wsum += A.w.back();
  }
  A.consensus = consensus;
  A.normalize = normalize;
  A.scale_lam = lam != 1.0;
  A.lam = static_cast<float>(lam);
  if (N == 0) return;
  FM_DISPATCH_FLOAT3(base.scalar_type(), op, [&] {
    using T_ = scalar_t;
    const float div = rnd<T_>(wsum);
    A.divisor = std::fabs(div) < rnd<T_>(1e-8f) ? 1.0f : div;  // torch compares in the dtype: 0 in fp16
    std::vector<const T_*> xs;
    for (const auto& e : experts) xs.push_back(e.data_ptr<T_>());
    const T_* b = base.data_ptr<T_>();
    FM_DISPATCH_FLOAT3(out.scalar_type(), op, [&] { gta_impl<T_, scalar_t>(b, xs, kp, A, out.data_ptr<scalar_t>(), N); });
  });
}

}  // namespace fastmerge
