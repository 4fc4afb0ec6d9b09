// doge_grad on the CPU (fp32): the closed-form gradient of DOGE's row-wise loss. Semantics:
// fastmerge/ops/doge_grad.py (doge_grad_ref).
#include "common.h"

namespace fastmerge {

namespace {

// <x, y> over n floats in fp32 with 8 interleaved partial sums, added in a fixed order: vectorisable without
// reassociation flags, and the same result on every run and thread count.
inline float dot8(const float* __restrict x, const float* __restrict y, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int l = 0; l < 8; ++l) acc[l] += x[c + l] * y[c + l];
  float tail = 0.f;
  for (; c < n; ++c) tail += x[c] * y[c];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

}  // namespace

// out[b, r, :] = -2 * sum_j (a[b, j, r] - <taus[b, j, r, :], d[b, r, :]>) * taus[b, j, r, :]
// One task's row is read from memory once: the T rows of a matrix row (T * n floats) stay in cache between
// the dot products and the accumulation.
void doge_grad_cpu(const at::Tensor& taus, const at::Tensor& a, const at::Tensor& d, at::Tensor& out) {
  const int64_t B = taus.size(0), T = taus.size(1), M = taus.size(2), N = taus.size(3);
  const float* tp = taus.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* dp = d.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> coef(static_cast<size_t>(T));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / M, r = row % M;
      const float* drow = dp + (b * M + r) * N;
      for (int64_t j = 0; j < T; ++j) {
        const float* trow = tp + ((b * T + j) * M + r) * N;
        coef[j] = -2.0f * (ap[(b * T + j) * M + r] - dot8(trow, drow, N));
      }
      float* __restrict orow = op + (b * M + r) * N;
      std::fill(orow, orow + N, 0.0f);
      for (int64_t j = 0; j < T; ++j) {
        const float* __restrict trow = tp + ((b * T + j) * M + r) * N;
        const float cj = coef[j];
        for (int64_t c = 0; c < N; ++c) orow[c] += cj * trow[c];
      }
    }
  });
}

}  // namespace fastmerge
