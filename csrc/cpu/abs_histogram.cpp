// abs_histogram on the CPU: the 65536-bin histogram of magnitude keys, the building block of the streaming exact
// top-k threshold. Semantics: fastmerge/ops/abs_histogram.py (abs_histogram_ref).
#include "common.h"

namespace fastmerge {

namespace {

constexpr int64_t kBins = 1 << 16;

// Level 0 over a long range: four interleaved 32-bit sub-histograms. Neighbouring elements often share a bin,
// and one counter incremented back to back waits on store-to-load forwarding every time; four counters per
// bin overlap those waits (about 2x on bf16 task vectors), for 1 MiB of zeroing and one merge per 2^30 items.
template <typename T>
void hist0_interleaved(const T* __restrict x, int64_t begin, int64_t end, int64_t* __restrict h) {
  constexpr int64_t kFlush = int64_t(1) << 30;  // keeps every 32-bit counter exact
  thread_local std::vector<uint32_t> buf(4 * kBins);  // kept per thread: a fresh 1 MiB is 256 page faults
  uint32_t* h0 = buf.data();
  uint32_t* h1 = h0 + kBins;
  uint32_t* h2 = h1 + kBins;
  uint32_t* h3 = h2 + kBins;
  for (int64_t s = begin; s < end; s += kFlush) {
    const int64_t e = std::min(end, s + kFlush);
    std::fill(h0, h0 + 4 * kBins, 0u);
    int64_t i = s;
    for (; i + 4 <= e; i += 4) {
      ++h0[fm_abs_key(cpu::to_f32(x[i])) >> 16];
      ++h1[fm_abs_key(cpu::to_f32(x[i + 1])) >> 16];
      ++h2[fm_abs_key(cpu::to_f32(x[i + 2])) >> 16];
      ++h3[fm_abs_key(cpu::to_f32(x[i + 3])) >> 16];
    }
    for (; i < e; ++i) ++h0[fm_abs_key(cpu::to_f32(x[i])) >> 16];
    for (int64_t b = 0; b < kBins; ++b)
      h[b] += static_cast<int64_t>(h0[b]) + h1[b] + static_cast<int64_t>(h2[b]) + h3[b];
  }
}

// Adds the level-0 / level-1 histogram of x[begin, end) to h (int64, kBins).
template <typename T>
void hist_range(const T* __restrict x, int64_t begin, int64_t end, int64_t level, int64_t prefix,
                int64_t* __restrict h) {
  if (level == 0) {
    if (end - begin >= (int64_t(1) << 18)) {
      hist0_interleaved(x, begin, end, h);
      return;
    }
    for (int64_t i = begin; i < end; ++i) ++h[fm_abs_key(cpu::to_f32(x[i])) >> 16];
  } else {
    if (prefix < 0 || prefix >= (int64_t(1) << 15)) return;  // keys are < 2^31: no element can match
    const uint32_t pre = static_cast<uint32_t>(prefix);
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t k = fm_abs_key(cpu::to_f32(x[i]));
      if ((k >> 16) == pre) ++h[k & 0xFFFFu];
    }
  }
}

template <typename T>
void abs_histogram_impl(const T* x, int64_t n, int64_t level, int64_t prefix, int64_t* hist) {
  // Per-thread histograms cost 512 KiB of zeroing and merging each: only worth it for large inputs.
  const int nt = cpu::threads_for(n, int64_t(1) << 20);
  if (nt <= 1) {
    hist_range(x, 0, n, level, prefix, hist);
    return;
  }
  // Kept per calling thread (a fresh 1 MiB+ buffer is hundreds of page faults); each thread zeroes its part.
  // The team reaches it through this pointer: inside the parallel region the name would be their own copy.
  thread_local std::vector<int64_t> partials;
  partials.resize(static_cast<size_t>(nt) * kBins);
  int64_t* const part = partials.data();
#pragma omp parallel num_threads(nt)
  {
    const int tid = cpu::thread_id(), team = cpu::team_size();
    std::fill(part + static_cast<size_t>(tid) * kBins, part + static_cast<size_t>(tid + 1) * kBins, int64_t(0));
    // Element range of this thread (contiguous, static).
    const int64_t per = n / team, rem = n % team;
    const int64_t b = tid * per + std::min<int64_t>(tid, rem);
    const int64_t e = b + per + (tid < rem ? 1 : 0);
    int64_t* h = part + static_cast<size_t>(tid) * kBins;
    hist_range(x, b, e, level, prefix, h);
#pragma omp barrier
    // Merge: each thread adds a slice of bins over all partial histograms, in thread order.
    const int64_t bper = kBins / team, brem = kBins % team;
    const int64_t c0 = tid * bper + std::min<int64_t>(tid, brem);
    const int64_t c1 = c0 + bper + (tid < brem ? 1 : 0);
    for (int q = 0; q < team; ++q) {
      const int64_t* hq = part + static_cast<size_t>(q) * kBins;
      for (int64_t i = c0; i < c1; ++i) hist[i] += hq[i];
    }
  }
}

}  // namespace

void abs_histogram_cpu(const at::Tensor& x, at::Tensor& hist, int64_t level, int64_t prefix) {
  const char* op = "abs_histogram_cpu";
  cpu::check_float3(x, op, "x");
  cpu::check_exact(hist, at::kLong, kBins, op, "hist");
  TORCH_CHECK(level == 0 || level == 1, op, ": level must be 0 or 1, got ", level);
  const int64_t n = x.numel();
  if (n == 0) return;
  int64_t* h = hist.data_ptr<int64_t>();
  FM_DISPATCH_FLOAT3(x.scalar_type(), op,
                     [&] { abs_histogram_impl(x.data_ptr<scalar_t>(), n, level, prefix, h); });
}

}  // namespace fastmerge
