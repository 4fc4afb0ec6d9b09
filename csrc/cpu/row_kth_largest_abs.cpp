// row_kth_largest_abs on the CPU: the k-th largest |x| of every row by a radix select over magnitude keys.
// Semantics: fastmerge/ops/row_kth_largest_abs.py (row_kth_largest_abs_ref).
#include "common.h"

namespace fastmerge {

namespace {

// k-th largest key (1 <= k <= n) of keys[0, n) by four 8-bit digit passes, most significant first; keys is
// used as scratch (candidates are compacted in place).
inline uint32_t kth_largest_key(uint32_t* __restrict keys, int64_t n, int64_t k) {
  uint32_t prefix = 0;  // digits selected so far
  int64_t cand = n;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (cand == 1) return keys[0];
    int64_t cnt[256] = {0};
    for (int64_t i = 0; i < cand; ++i) ++cnt[(keys[i] >> shift) & 0xFFu];
    int d = 255;
    for (; d > 0; --d) {
      if (cnt[d] >= k) break;
      k -= cnt[d];
    }
    prefix |= static_cast<uint32_t>(d) << shift;
    if (shift == 0) break;
    if (cnt[d] != cand) {  // compact the candidates with this digit
      int64_t m = 0;
      for (int64_t i = 0; i < cand; ++i) {
        const uint32_t v = keys[i];
        keys[m] = v;
        m += static_cast<int64_t>(((v >> shift) & 0xFFu) == static_cast<uint32_t>(d));
      }
      cand = m;
    }
  }
  return prefix;
}

template <typename T>
void kth_impl(const T* xp, int64_t rows, int64_t cols, int64_t k, float* o) {
  const int nt = cpu::threads_for(rows * cols, int64_t(1) << 15);
#pragma omp parallel num_threads(nt)
  {
    cpu::Scratch<uint32_t> buf(static_cast<size_t>(cols));
    uint32_t* keys = buf.ptr();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = xp + r * cols;
      for (int64_t i = 0; i < cols; ++i) keys[i] = fm_abs_key(cpu::to_f32(row[i]));
      o[r] = cpu::bits_to_f32(kth_largest_key(keys, cols, k));
    }
  }
}

}  // namespace

void row_kth_largest_abs_cpu(const at::Tensor& x, int64_t k, at::Tensor& out) {
  const char* op = "row_kth_largest_abs_cpu";
  cpu::check_float3(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D, got ", x.dim(), "-D");
  const int64_t rows = x.size(0), cols = x.size(1);
  cpu::check_exact(out, at::kFloat, rows, op, "out");
  TORCH_CHECK(k >= 0 && k <= cols, op, ": k must be in [0, ", cols, "], got ", k);
  float* o = out.data_ptr<float>();
  if (rows == 0) return;
  if (k == 0) {
    std::fill(o, o + rows, std::numeric_limits<float>::infinity());
    return;
  }
  FM_DISPATCH_FLOAT3(x.scalar_type(), op, [&] { kth_impl(x.data_ptr<scalar_t>(), rows, cols, k, o); });
}

}  // namespace fastmerge
