// tv_coef_grad on the CPU (test-time adaptation): the coefficient gradient <dL/dtheta, tau[t]> per segment s, in
// one pass. Semantics: fastmerge/ops/tv_coef_grad.py (tv_coef_grad_ref).
#include "common.h"

namespace fastmerge {

namespace {

template <typename T>
void coef_grad_impl(const float* grad, const T* taus, int64_t Tn, int64_t P, int64_t S,
                    const std::vector<cpu::Chunk>& ch, float* out) {
  const int64_t nc = static_cast<int64_t>(ch.size());
  std::vector<double> part(static_cast<size_t>(nc * Tn), 0.0);
  at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const cpu::Chunk k = ch[c];
      const float* __restrict g = grad + k.begin;
      const int64_t n = k.end - k.begin;
      for (int64_t t = 0; t < Tn; ++t) {
        const T* __restrict x = taus + t * P + k.begin;
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
          for (int l = 0; l < 8; ++l) acc[l] += g[i + l] * cpu::to_f32(x[i + l]);
        double sum = 0.0;
        for (int l = 0; l < 8; ++l) sum += acc[l];
        for (; i < n; ++i) sum += static_cast<double>(g[i]) * cpu::to_f32(x[i]);
        part[c * Tn + t] = sum;
      }
    }
  });
  std::vector<double> tot(static_cast<size_t>(Tn * S), 0.0);
  for (int64_t c = 0; c < nc; ++c)  // in chunk order: the same sums on every run and thread count
    for (int64_t t = 0; t < Tn; ++t) tot[t * S + ch[c].seg] += part[c * Tn + t];
  for (int64_t i = 0; i < Tn * S; ++i) out[i] = static_cast<float>(tot[i]);
}

}  // namespace

void tv_coef_grad_cpu(const at::Tensor& grad, const at::Tensor& taus, const at::Tensor& offsets, at::Tensor& out) {
  const int64_t Tn = taus.size(0), P = taus.size(1), S = offsets.numel() - 1;
  const auto ch = cpu::segment_chunks(offsets);
  FM_DISPATCH_FLOAT3(taus.scalar_type(), "tv_coef_grad_cpu", [&] {
    coef_grad_impl(grad.data_ptr<float>(), taus.data_ptr<scalar_t>(), Tn, P, S, ch, out.data_ptr<float>());
  });
}

}  // namespace fastmerge
