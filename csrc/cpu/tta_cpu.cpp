// Test-time adaptation on the CPU: the merged weights theta(lambda) = base + sum_t lambda[t, s] tau[t] from one
// stacked copy of the task vectors, and the coefficient gradient <dL/dtheta, tau[t]> per segment s, each in one
// pass. Semantics: fastmerge/reference.py (tv_combine, tv_coef_grad).
#include "common.h"

namespace fastmerge {

namespace {

struct Chunk {
  int64_t seg, begin, end;
};

// Segments (offsets[s]..offsets[s+1]) cut into chunks of at most kLen elements, never straddling a segment, so
// every chunk has one coefficient per task and its partial sums belong to one segment.
std::vector<Chunk> chunks_of(const at::Tensor& offsets) {
  constexpr int64_t kLen = 1 << 14;
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t S = offsets.numel() - 1;
  std::vector<Chunk> out;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t b = off[s]; b < off[s + 1]; b += kLen) out.push_back({s, b, std::min(off[s + 1], b + kLen)});
  return out;
}

template <typename T>
void combine_impl(const float* base, const T* taus, const float* coef, int64_t Tn, int64_t P, int64_t S,
                  const std::vector<Chunk>& ch, float* out) {
  at::parallel_for(0, static_cast<int64_t>(ch.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk k = ch[c];
      float* __restrict o = out + k.begin;
      const float* __restrict b = base + k.begin;
      const int64_t n = k.end - k.begin;
      std::copy(b, b + n, o);
      for (int64_t t = 0; t < Tn; ++t) {
        const float w = coef[t * S + k.seg];
        const T* __restrict x = taus + t * P + k.begin;
        for (int64_t i = 0; i < n; ++i) o[i] += w * cpu::to_f32(x[i]);
      }
    }
  });
}

template <typename T>
void coef_grad_impl(const float* grad, const T* taus, int64_t Tn, int64_t P, int64_t S, const std::vector<Chunk>& ch,
                    float* out) {
  const int64_t nc = static_cast<int64_t>(ch.size());
  std::vector<double> part(static_cast<size_t>(nc * Tn), 0.0);
  at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk k = ch[c];
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

void tv_combine_cpu(const at::Tensor& base, const at::Tensor& taus, const at::Tensor& coef, const at::Tensor& offsets,
                    at::Tensor& out) {
  const int64_t Tn = taus.size(0), P = taus.size(1), S = offsets.numel() - 1;
  const auto ch = chunks_of(offsets);
  FM_DISPATCH_FLOAT3(taus.scalar_type(), "tv_combine_cpu", [&] {
    combine_impl(base.data_ptr<float>(), taus.data_ptr<scalar_t>(), coef.data_ptr<float>(), Tn, P, S, ch,
                 out.data_ptr<float>());
  });
}

void tv_coef_grad_cpu(const at::Tensor& grad, const at::Tensor& taus, const at::Tensor& offsets, at::Tensor& out) {
  const int64_t Tn = taus.size(0), P = taus.size(1), S = offsets.numel() - 1;
  const auto ch = chunks_of(offsets);
  FM_DISPATCH_FLOAT3(taus.scalar_type(), "tv_coef_grad_cpu", [&] {
    coef_grad_impl(grad.data_ptr<float>(), taus.data_ptr<scalar_t>(), Tn, P, S, ch, out.data_ptr<float>());
  });
}

}  // namespace fastmerge
