// Internal helpers of the CPU kernels (csrc/cpu/<op>.cpp): dtype conversion, thread partitioning, argument
// checks, instruction-set selection. Not part of the public interface (see ops.h). The helpers whose speed
// depends on the instruction set (block loads/stores, Philox blocks) are in block_ops.inc.
//
// Numerics: every kernel converts its inputs to fp32, does the arithmetic of its oracle (fastmerge/ops/<op>.py) in the
// same fp32 expression order, and writes outputs with torch's round-to-nearest-even conversions (the
// c10::Half / c10::BFloat16 constructors). Vectorised IEEE add/mul/div/compare are exact per element, so
// every instruction-set variant gives bit-identical results; fused multiply-add is never used.
//
// Instruction sets: the build has no -march, so on x86-64 with GCC the elementwise kernels are compiled
// twice, baseline (SSE2) and AVX2 (no FMA), and the Philox generator three times (plus AVX-512); the best
// variant the CPU supports runs (FM_MULTI_ISA, isa()). FASTMERGE_CPU_ISA=base|avx2 lowers the choice (for
// tests and benchmarks).
#pragma once

// GCC: let loops with floating-point comparisons in selects be if-converted (and so vectorised), and never
// contract a * b + c into an FMA (GCC contracts by default where FMA exists, e.g. aarch64 or -march=native).
// Neither changes a result of IEEE non-stop arithmetic; no reassociation, no finite-math assumptions.
// Placed before every include so that the headers' inline functions get the same options (GCC does not
// inline across differing floating-point options).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fastmerge/ops.h"
#include "fastmerge/philox.h"

namespace fastmerge {
namespace cpu {

// Elements per inner block: small enough that a few fp32 block buffers (and T of them in the consensus
// kernels) stay in L1/L2, large enough to amortise per-block overhead.
constexpr int64_t kBlock = 1024;

// The multi-expert kernels (ties_merge.inc, tall.inc, emr_elect.inc) stream their inputs once: each thread walks
// its contiguous share of the elements in blocks of kBlock; per block it converts the inputs to fp32 block buffers
// (T of them where the election needs all tasks before the merge), does the fp32 arithmetic of the reference in the
// same order (tasks t = 0..T-1), and writes the outputs. Per-element work is independent, so results do not depend
// on the thread count; counts and stats are per-thread partials added at the end.

// ---- dtype conversion ----------------------------------------------------------------------------------

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}
template <>
inline float to_f32<at::BFloat16>(at::BFloat16 v) {
  return bits_to_f32(static_cast<uint32_t>(v.x) << 16);  // exact, and trivially vectorisable
}

template <typename T>
inline T from_f32(float v) {
  return T(v);  // float: identity; Half / BFloat16: round to nearest even, as torch's .to(dtype)
}

// Dispatch over the three supported input dtypes; the body sees `scalar_t`.
#define FM_DISPATCH_FLOAT3(DT, NAME, ...)                                                       \
  [&] {                                                                                         \
    switch (DT) {                                                                               \
      case at::kFloat: {                                                                        \
        using scalar_t = float;                                                                 \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case at::kHalf: {                                                                         \
        using scalar_t = at::Half;                                                              \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case at::kBFloat16: {                                                                     \
        using scalar_t = at::BFloat16;                                                          \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      default:                                                                                  \
        TORCH_CHECK(false, NAME, ": dtype must be float32, float16 or bfloat16, got ", DT);     \
    }                                                                                           \
  }()

// ---- argument checks (cheap ones; the Python layer validates the rest) ---------------------------------

inline bool is_float3(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
}

inline void check_cpu_contig(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_float3(const at::Tensor& t, const char* op, const char* name) {
  check_cpu_contig(t, op, name);
  TORCH_CHECK(is_float3(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

inline void check_exact(const at::Tensor& t, at::ScalarType dt, int64_t numel, const char* op, const char* name) {
  check_cpu_contig(t, op, name);
  TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " must have ", numel, " elements, got ", t.numel());
}

// Experts (and base) share one shape and dtype; returns numel.
inline int64_t check_experts(const OptTensor& base, const std::vector<at::Tensor>& experts, const char* op) {
  TORCH_CHECK(!experts.empty(), op, ": experts must not be empty");
  const at::Tensor& e0 = experts[0];
  check_float3(e0, op, "experts[0]");
  for (size_t t = 1; t < experts.size(); ++t) {
    check_cpu_contig(experts[t], op, "experts[t]");
    TORCH_CHECK(experts[t].scalar_type() == e0.scalar_type(), op, ": experts[", t, "] dtype ",
                experts[t].scalar_type(), " differs from experts[0] dtype ", e0.scalar_type());
    TORCH_CHECK(experts[t].numel() == e0.numel(), op, ": experts[", t, "] has ", experts[t].numel(),
                " elements, experts[0] has ", e0.numel());
  }
  if (base.has_value() && base->defined()) {
    check_cpu_contig(*base, op, "base");
    TORCH_CHECK(base->scalar_type() == e0.scalar_type(), op, ": base dtype ", base->scalar_type(),
                " differs from the experts' dtype ", e0.scalar_type());
    TORCH_CHECK(base->numel() == e0.numel(), op, ": base has ", base->numel(), " elements, experts have ",
                e0.numel());
  }
  return e0.numel();
}

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// The experts' data pointers (checked contiguous, of dtype T).
template <typename T>
std::vector<const T*> expert_ptrs(const std::vector<at::Tensor>& experts) {
  std::vector<const T*> v;
  v.reserve(experts.size());
  for (const auto& e : experts) v.push_back(e.data_ptr<T>());
  return v;
}

// ---- threads ---------------------------------------------------------------------------------------------

// Threads for `work` units when one thread should get at least `grain` units (respects torch.set_num_threads).
inline int threads_for(int64_t work, int64_t grain) {
  const int64_t maxt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = work / std::max<int64_t>(grain, 1);
  return static_cast<int>(std::max<int64_t>(1, std::min(maxt, want)));
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Contiguous share [begin, end) of [0, n) for thread `tid` of `nt`, aligned to kBlock so that block
// boundaries (and hence any per-block behaviour) do not depend on the thread count.
inline void thread_range(int64_t n, int tid, int nt, int64_t* begin, int64_t* end) {
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  const int64_t per = nblocks / nt, rem = nblocks % nt;
  const int64_t b0 = tid * per + std::min<int64_t>(tid, rem);
  const int64_t b1 = b0 + per + (tid < rem ? 1 : 0);
  *begin = std::min(n, b0 * kBlock);
  *end = std::min(n, b1 * kBlock);
}

// 64-byte aligned scratch buffer owned by one thread (allocated once per kernel call, not per element).
template <typename T>
struct Scratch {
  std::vector<T> v;
  explicit Scratch(size_t n) : v(n + 64 / sizeof(T)) {}
  T* ptr() {
    uintptr_t p = reinterpret_cast<uintptr_t>(v.data());
    p = (p + 63) & ~uintptr_t(63);
    return reinterpret_cast<T*>(p);
  }
};

// ---- flat parameters cut into segments (tv_combine, tv_coef_grad) -----------------------------------------

struct Chunk {
  int64_t seg, begin, end;
};

// Segments (offsets[s]..offsets[s+1]) cut into chunks of at most kLen elements, never straddling a segment, so
// every chunk has one coefficient per task and its partial sums belong to one segment.
inline std::vector<Chunk> segment_chunks(const at::Tensor& offsets) {
  constexpr int64_t kLen = 1 << 14;
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t S = offsets.numel() - 1;
  std::vector<Chunk> out;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t b = off[s]; b < off[s + 1]; b += kLen) out.push_back({s, b, std::min(off[s + 1], b + kLen)});
  return out;
}

// ---- small numeric helpers matching torch ------------------------------------------------------------

// Written as selects (no bool -> int -> float conversions, no short-circuit branches) so that loops using
// them vectorise.

// 1.0f / 0.0f for a mask: what torch's `tensor * bool_tensor` multiplies by.
inline float sel01(bool b) { return b ? 1.0f : 0.0f; }

// torch.sign on fp32: 1, -1, 0 for zeros and NaN.
inline float sign_f(float v) { return v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f); }

// torch.amax step: NaN propagates.
inline float nanmax_f(float m, float v) { return ((v > m) | (v != v)) ? v : m; }

// ---- instruction sets ------------------------------------------------------------------------------------

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__AVX2__)
#define FM_MULTI_ISA 1
#else
#define FM_MULTI_ISA 0
#endif

// kAvx512 only changes the Philox generator (the elementwise kernels run their AVX2 variant there).
enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The variant to run: the best the CPU supports, lowered (never raised) by FASTMERGE_CPU_ISA=base|avx2.
// Cheap (one getenv); called once per kernel call.
inline Isa isa() {
#if FM_MULTI_ISA
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
      return Isa::kAvx512;
    return __builtin_cpu_supports("avx2") ? Isa::kAvx2 : Isa::kBase;
  }();
  const char* env = std::getenv("FASTMERGE_CPU_ISA");
  if (env && std::strcmp(env, "base") == 0) return Isa::kBase;
  if (env && std::strcmp(env, "avx2") == 0 && best > Isa::kAvx2) return Isa::kAvx2;
  return best;
#else
  return Isa::kBase;
#endif
}

// Philox4x32-10 blocks g0 .. g0 + ng - 1 of stream (seed, key) into words[4q .. 4q + 3] (philox.cpp):
// the one hot spot of the random drops, so it has its own AVX-512 variant.
using PhiloxGroupsFn = void (*)(uint64_t g0, int64_t ng, uint64_t seed, uint64_t key, uint32_t* words);
PhiloxGroupsFn philox_groups_fn(Isa isa);

}  // namespace cpu
}  // namespace fastmerge

// Calls NS::FN(args...) for the selected instruction-set namespace NS (isa_base / isa_avx2).
#if FM_MULTI_ISA
#define FM_ISA_CALL(ISA, FN, ...)                                             \
  do {                                                                        \
    if ((ISA) >= ::fastmerge::cpu::Isa::kAvx2)                                \
      ::fastmerge::cpu::isa_avx2::FN(__VA_ARGS__);                            \
    else                                                                      \
      ::fastmerge::cpu::isa_base::FN(__VA_ARGS__);                            \
  } while (0)
#else
#define FM_ISA_CALL(ISA, FN, ...)               \
  do {                                          \
    (void)(ISA);                                \
    ::fastmerge::cpu::isa_base::FN(__VA_ARGS__); \
  } while (0)
#endif
