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

#include <type_traits>

namespace fastmerge {

namespace {

// v rounded to T and back, as torch's opmath ops round each result: round-to-nearest-even, NaN to the
// dtype's canonical NaN (bf16: the c10::BFloat16 conversion written out so that loops of it vectorise).
template <typename T>
inline float rnd(float v) {
  return cpu::to_f32(cpu::from_f32<T>(v));
}
template <>
inline float rnd<float>(float v) {
  return v;
}
template <>
inline float rnd<at::Half>(float v) {  // fp16 round-to-nearest-even as float arithmetic and bit operations
  const uint32_t u = cpu::f32_to_bits(v);
  const uint32_t a = u & 0x7FFFFFFFu, sign = u & 0x80000000u;
  const float av = cpu::bits_to_f32(a);
  const float sub = (av + 0.5f) - 0.5f;  // below 2^-14: multiples of 2^-24 (0.5's ulp), nearest even
  const uint32_t nrm = (a + 0xFFFu + ((a >> 13) & 1u)) & ~0x1FFFu;  // 10 mantissa bits, nearest even
  uint32_t r = a < 0x38800000u ? cpu::f32_to_bits(sub) : nrm;
  r = a >= 0x477FF000u ? 0x7F800000u : r;  // from 65520 up: inf
  return v != v ? v : cpu::bits_to_f32(r | sign);
}
template <>
inline float rnd<at::BFloat16>(float v) {
  const uint32_t u = cpu::f32_to_bits(v);
  const uint32_t r = (u + (((u >> 16) & 1u) + 0x7FFFu)) & 0xFFFF0000u;
  return cpu::bits_to_f32(v != v ? 0x7FC00000u : r);
}

// Loads and stores that vectorise: fp16 decoded and encoded with integer operations (torch's c10::Half goes
// through a scalar routine). The store takes values the dtype represents exactly (they were rounded with rnd).
template <typename T>
inline float load(T v) {
  return cpu::to_f32(v);
}
template <>
inline float load<at::Half>(at::Half v) {
  const uint32_t h = v.x, sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  const float sub = static_cast<float>(mant) * 5.9604644775390625e-8f;  // 2^-24
  const uint32_t nrm = ((e + 112u) << 23) | (mant << 13), special = 0x7F800000u | (mant << 13);
  const uint32_t bits = e == 0 ? cpu::f32_to_bits(sub) : (e == 31 ? special : nrm);
  return cpu::bits_to_f32(bits | sign);
}

template <typename O>
inline O store_exact(float v) {
  return cpu::from_f32<O>(v);
}
template <>
inline at::Half store_exact<at::Half>(float v) {
  const uint32_t u = cpu::f32_to_bits(v), a = u & 0x7FFFFFFFu;
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint16_t nrm = static_cast<uint16_t>((((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3FFu));
  const uint16_t sub = static_cast<uint16_t>(cpu::bits_to_f32(a) * 16777216.0f);  // |v| < 2^-14: mant * 2^-24
  uint16_t h = a < 0x38800000u ? sub : nrm;
  h = a >= 0x7F800000u ? (a > 0x7F800000u ? 0x7E00 : 0x7C00) : h;
  at::Half r;
  r.x = static_cast<uint16_t>(h | sign);
  return r;
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
    // per block: the T task vectors, the base, and the running sums (vote / merged delta, divisor)
    cpu::Scratch<float> scratch(static_cast<size_t>((T_ + 3) * cpu::kBlock));
    float* __restrict d = scratch.ptr();
    float* __restrict bf = d + T_ * cpu::kBlock;
    float* __restrict mixed = bf + cpu::kBlock;
    float* __restrict div = mixed + cpu::kBlock;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t i0 = blk * cpu::kBlock;
      const int64_t m = std::min<int64_t>(cpu::kBlock, n - i0);
      const T* __restrict bb = b + i0;
      for (int64_t i = 0; i < m; ++i) bf[i] = load(bb[i]);
      for (int64_t t = 0; t < T_; ++t) {  // d_t = ((x_t - b) * keep_t * s_t) * w_t, each product rounded
        const T* __restrict x = xs[t] + i0;
        float* __restrict dt = d + t * cpu::kBlock;
        const float w = A.w[t], s = A.s[t];
        if (keep[t]) {
          const uint8_t* __restrict k = reinterpret_cast<const uint8_t*>(keep[t] + i0);  // 0/1 bytes
          for (int64_t i = 0; i < m; ++i) {  // times the 0/1 mask, as torch does (-0, NaN as the product gives)
            const float v = rnd<T>(load(x[i]) - bf[i]) * static_cast<float>(k[i]);
            dt[i] = rnd<T>(rnd<T>(v * s) * w);
          }
        } else {
          for (int64_t i = 0; i < m; ++i) dt[i] = rnd<T>(rnd<T>(rnd<T>(load(x[i]) - bf[i]) * s) * w);
        }
      }
      if (A.consensus) {
        for (int64_t i = 0; i < m; ++i) mixed[i] = 0.0f;  // the vote first
        for (int64_t t = 0; t < T_; ++t)
          for (int64_t i = 0; i < m; ++i) mixed[i] += d[t * cpu::kBlock + i];
        for (int64_t i = 0; i < m; ++i) {  // the majority sign as +-1 (vote >= 0: +; NaN: -)
          mixed[i] = rnd<T>(mixed[i]) >= 0.0f ? 1.0f : -1.0f;
          div[i] = 0.0f;
        }
        for (int64_t i = 0; i < m; ++i) bf[i] = 0.0f;  // bf: the merged delta's running sum (base re-read below)
        for (int64_t t = 0; t < T_; ++t) {
          const float* __restrict dt = d + t * cpu::kBlock;
          const float w = A.w[t];
          for (int64_t i = 0; i < m; ++i) {  // the 0/1 mask sign(v) == majority sign, multiplied in as torch does
            const float v = dt[i], mj = mixed[i];
            const float agree = static_cast<float>((v > 0.0f) & (mj > 0.0f)) + static_cast<float>((v < 0.0f) & (mj < 0.0f));
            bf[i] += v * agree;
            div[i] += w * agree;
          }
        }
        for (int64_t i = 0; i < m; ++i) {
          mixed[i] = rnd<T>(bf[i]);
          const float dv = rnd<T>(div[i]);
          div[i] = dv == 0.0f ? 1.0f : dv;
          bf[i] = load(bb[i]);
        }
      } else {
        for (int64_t i = 0; i < m; ++i) mixed[i] = 0.0f;
        for (int64_t t = 0; t < T_; ++t)
          for (int64_t i = 0; i < m; ++i) mixed[i] += d[t * cpu::kBlock + i];
        for (int64_t i = 0; i < m; ++i) {
          mixed[i] = rnd<T>(mixed[i]);
          div[i] = A.divisor;
        }
      }
      O* __restrict o = out + i0;
      for (int64_t i = 0; i < m; ++i) {
        float v = mixed[i];
        if (A.normalize) v = rnd<T>(v / div[i]);
        if (A.scale_lam) v = rnd<T>(v * A.lam);
        const float r = rnd<T>(v + bf[i]);
        o[i] = std::is_same<T, O>::value ? store_exact<O>(r) : cpu::from_f32<O>(r);
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
