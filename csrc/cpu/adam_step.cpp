// adam_step on the CPU (fp32): a fused Adam update with one gradient scale per slice (DOGE's optimiser step).
// Semantics: fastmerge/ops/adam_step.py (adam_step_ref).
#include "common.h"

// sqrt sets no errno here (IEEE results unchanged), so the Adam loop's square roots vectorise
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-math-errno")
#endif

namespace fastmerge {

namespace {

void adam_range(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                int64_t n, float s, float w1, float b2, float w2, float step_size, float bc2_sqrt, float e) {
  if (w1 < 0.5f) {
    for (int64_t i = 0; i < n; ++i) {
      const float gi = s * g[i];
      const float mi = m[i] + w1 * (gi - m[i]);
      const float vi = v[i] * b2 + w2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      p[i] = p[i] + (-step_size) * (mi / (std::sqrt(vi) / bc2_sqrt + e));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float gi = s * g[i];
      const float mi = gi - (gi - m[i]) * (1.0f - w1);
      const float vi = v[i] * b2 + w2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      p[i] = p[i] + (-step_size) * (mi / (std::sqrt(vi) / bc2_sqrt + e));
    }
  }
}

}  // namespace

// PyTorch's Adam (single-tensor path, no weight decay, no amsgrad) on the S slices of param (S, inner), slice
// s taking the gradient scale[s] * grad[s / repeat] (grad: S / repeat slices):
// m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
void adam_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                   const at::Tensor& scale, int64_t repeat, double lr, double beta1, double beta2, double eps,
                   int64_t step) {
  const int64_t n = param.numel();
  const int64_t S = scale.numel();
  if (n == 0 || S == 0) return;
  const int64_t inner = n / S;
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const float* s = scale.data_ptr<float>();
  const float w1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2);
  const float w2 = static_cast<float>(1.0 - beta2);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const float step_size = static_cast<float>(lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float e = static_cast<float>(eps);
  constexpr int64_t kChunk = 1 << 14;
  const int64_t per = (inner + kChunk - 1) / kChunk;  // chunks per slice: no division per element
  at::parallel_for(0, S * per, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t sl = c / per, lo = (c % per) * kChunk, len = std::min(kChunk, inner - lo);
      const int64_t off = sl * inner + lo;
      adam_range(p + off, g + (sl / repeat) * inner + lo, m + off, v + off, len, s[sl], w1, b2, w2, step_size,
                 bc2_sqrt, e);
    }
  });
}

}  // namespace fastmerge
