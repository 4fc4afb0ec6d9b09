// tv_combine on the CPU (test-time adaptation): the merged weights theta(lambda) = base + sum_t lambda[t, s] tau[t]
// from one stacked copy of the task vectors, in one pass. Semantics: fastmerge/ops/tv_combine.py (tv_combine_ref).
#include "common.h"

namespace fastmerge {

namespace {

template <typename T>
void combine_impl(const float* base, const T* taus, const float* coef, int64_t Tn, int64_t P, int64_t S,
                  const std::vector<cpu::Chunk>& ch, float* out) {
  at::parallel_for(0, static_cast<int64_t>(ch.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const cpu::Chunk k = ch[c];
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

}  // namespace

void tv_combine_cpu(const at::Tensor& base, const at::Tensor& taus, const at::Tensor& coef, const at::Tensor& offsets,
                    at::Tensor& out) {
  const int64_t Tn = taus.size(0), P = taus.size(1), S = offsets.numel() - 1;
  const auto ch = cpu::segment_chunks(offsets);
  FM_DISPATCH_FLOAT3(taus.scalar_type(), "tv_combine_cpu", [&] {
    combine_impl(base.data_ptr<float>(), taus.data_ptr<scalar_t>(), coef.data_ptr<float>(), Tn, P, S, ch,
                 out.data_ptr<float>());
  });
}

}  // namespace fastmerge
