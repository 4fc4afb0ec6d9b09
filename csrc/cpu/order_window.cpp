// order_window on the CPU: which elements torch.sort(|x|.float(), descending) puts at positions [start, stop),
// or (topk) which k elements torch.topk(|x|, k) returns.
// Semantics: fastmerge/ops/order_window.py (order_window_ref).
//
// torch's CPU sort (stable=False) is libstdc++'s std::sort (introsort: median-of-three quicksort down to
// 16-element blocks, heapsort past a depth limit, then one insertion sort over everything) on (value, index)
// pairs with a comparator that looks at values only, so the order of equal magnitudes follows from how the
// partitions moved them. Which elements land in the window depends only on the partitions whose range holds a
// window boundary strictly inside: every other range ends up wholly inside or wholly outside the window, and
// the final insertion sort never moves an element across a partition point (a right-hand element is never
// strictly before a left-hand one). So this replays exactly those partitions, the heapsort of a range that
// hits the depth limit, and the insertion sort of the blocks that hold a boundary: the same swaps on the same
// data, about 2n comparisons instead of n log n, and the same tie order as the full sort.
#include "common.h"

namespace fastmerge {

namespace {

// Every value ranked is |x| (or NaN), so one unsigned key orders them as torch's comparators order
// float(|x|): the bits of a non-negative float, half or bfloat16 order like the value, and every NaN maps to
// one key above +inf (torch's sort treats NaN as larger than everything and NaNs as equal). 16-bit inputs get
// 16-bit keys (float(|x|) orders like them). Descending: a before b iff key(a) > key(b); ascending: iff <.
template <typename T>
struct Key {
  using type = uint32_t;
  static uint32_t of(T x) {
    const uint32_t k = fm_abs_key(cpu::to_f32(x));
    return k > 0x7F800001u ? 0x7F800001u : k;
  }
};
// a 16-bit float's magnitude bits, every NaN (above kInf) folded onto kInf + 1
template <uint16_t kInf>
inline uint16_t key16(uint16_t bits) {
  const uint16_t k = bits & 0x7FFFu;
  return k > kInf + 1 ? uint16_t(kInf + 1) : k;
}
template <>
struct Key<at::BFloat16> {
  using type = uint16_t;
  static uint16_t of(at::BFloat16 x) { return key16<0x7F80u>(x.x); }
};
template <>
struct Key<at::Half> {
  using type = uint16_t;
  static uint16_t of(at::Half x) { return key16<0x7C00u>(x.x); }
};

constexpr int64_t kThreshold = 16;  // libstdc++'s _S_threshold
constexpr uint8_t kStopL = 1, kStopR = 2;

template <typename K, typename I, bool Desc>
struct Sorter {
  K* v;            // keys
  I* ix;           // original positions
  uint8_t* stops;  // per position: would the left (kStopL) / right (kStopR) scan stop here (original values)

  static bool comp(K a, K b) { return Desc ? a > b : a < b; }

  void swap(int64_t a, int64_t b) {
    std::swap(v[a], v[b]);
    std::swap(ix[a], ix[b]);
  }

  void median_to_first(int64_t result, int64_t a, int64_t b, int64_t c) {
    if (comp(v[a], v[b])) {
      if (comp(v[b], v[c])) swap(result, b);
      else if (comp(v[a], v[c])) swap(result, c);
      else swap(result, a);
    } else if (comp(v[a], v[c])) {
      swap(result, a);
    } else if (comp(v[b], v[c])) {
      swap(result, c);
    } else {
      swap(result, b);
    }
  }

  // libstdc++'s __unguarded_partition of [first + 1, last) around the pivot at `first`; returns the cut. Its
  // two scans stop at the elements "not less" (left) and "not greater" (right) than the pivot, and each stop
  // pair is swapped until the scans cross. Every position between the two scans still holds its original value,
  // so the stops are read from flags of the original values (one vectorised pass) instead of from branchy
  // compares; the position just swapped on the far side is a stop by construction (it now holds what the
  // other scan stopped at), which bounds each search. Same swaps, same cut.
  int64_t partition_pivot(int64_t first, int64_t last) {
    const int64_t mid = first + (last - first) / 2;
    median_to_first(first, first + 1, mid, last - 1);
    const K pv = v[first];
    const K* __restrict k = v;
    uint8_t* __restrict st = stops;
    for (int64_t i = first; i < last; ++i)
      st[i] = static_cast<uint8_t>((comp(k[i], pv) ? 0 : kStopL) | (comp(pv, k[i]) ? 0 : kStopR));
    int64_t lo = next_left(first + 1, last);  // a stop exists: median-of-three left one >= pivot in range
    int64_t hi = next_right(last - 1, first);  // the pivot itself stops the right scan
    while (lo < hi) {
      swap(lo, hi);
      const int64_t nl = next_left(lo + 1, hi);
      hi = next_right(hi - 1, lo);
      lo = nl;
    }
    return lo;
  }

  // First p in [p, end) where the left scan stops, else end.
  int64_t next_left(int64_t p, int64_t end) const {
    constexpr uint64_t kMask = 0x0101010101010101ull * kStopL;
    while (p + 8 <= end) {
      uint64_t w;
      std::memcpy(&w, stops + p, 8);
      w &= kMask;
      if (w) return p + (__builtin_ctzll(w) >> 3);
      p += 8;
    }
    for (; p < end; ++p)
      if (stops[p] & kStopL) return p;
    return end;
  }

  // Last p in (end, p] where the right scan stops, else end.
  int64_t next_right(int64_t p, int64_t end) const {
    constexpr uint64_t kMask = 0x0101010101010101ull * kStopR;
    while (p - 8 >= end) {  // positions p-7 .. p, all > end
      uint64_t w;
      std::memcpy(&w, stops + p - 7, 8);
      w &= kMask;
      if (w) return p - (__builtin_clzll(w) >> 3);
      p -= 8;
    }
    for (; p > end; --p)
      if (stops[p] & kStopR) return p;
    return end;
  }

  void insertion_sort(int64_t first, int64_t last) {
    for (int64_t i = first + 1; i < last; ++i) {
      const K val = v[i];
      const I id = ix[i];
      int64_t j = i;
      if (comp(val, v[first])) {
        for (; j > first; --j) {
          v[j] = v[j - 1];
          ix[j] = ix[j - 1];
        }
      } else {
        for (; comp(val, v[j - 1]); --j) {
          v[j] = v[j - 1];
          ix[j] = ix[j - 1];
        }
      }
      v[j] = val;
      ix[j] = id;
    }
  }

  // libstdc++'s __adjust_heap then __push_heap, on the heap at `base` of `len` elements.
  void adjust_heap(int64_t base, int64_t hole, int64_t len, K val, I id) {
    const int64_t top = hole;
    int64_t child = hole;
    while (child < (len - 1) / 2) {
      child = 2 * (child + 1);
      if (comp(v[base + child], v[base + child - 1])) --child;
      v[base + hole] = v[base + child];
      ix[base + hole] = ix[base + child];
      hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
      child = 2 * (child + 1);
      v[base + hole] = v[base + child - 1];
      ix[base + hole] = ix[base + child - 1];
      hole = child - 1;
    }
    int64_t parent = (hole - 1) / 2;
    while (hole > top && comp(v[base + parent], val)) {
      v[base + hole] = v[base + parent];
      ix[base + hole] = ix[base + parent];
      hole = parent;
      parent = (hole - 1) / 2;
    }
    v[base + hole] = val;
    ix[base + hole] = id;
  }

  // std::__partial_sort(first, last, last): make_heap, then sort_heap.
  void heap_sort(int64_t first, int64_t last) {
    const int64_t len = last - first;
    if (len < 2) return;
    for (int64_t parent = (len - 2) / 2;; --parent) {
      adjust_heap(first, parent, len, v[first + parent], ix[first + parent]);
      if (parent == 0) break;
    }
    for (int64_t end = last - 1; end - first > 0; --end) {  // pop_heap(first, end, end)
      const K val = v[end];
      const I id = ix[end];
      v[end] = v[first];
      ix[end] = ix[first];
      adjust_heap(first, 0, end - first, val, id);
    }
  }

  // std::__heap_select(first, middle, last): the heap of [first, middle) takes every later element that
  // comes before its top.
  void heap_select(int64_t first, int64_t middle, int64_t last) {
    const int64_t len = middle - first;
    if (len >= 2) {
      for (int64_t parent = (len - 2) / 2;; --parent) {
        adjust_heap(first, parent, len, v[first + parent], ix[first + parent]);
        if (parent == 0) break;
      }
    }
    for (int64_t i = middle; i < last; ++i) {
      if (comp(v[i], v[first])) {  // __pop_heap(first, middle, i)
        const K val = v[i];
        const I id = ix[i];
        v[i] = v[first];
        ix[i] = ix[first];
        adjust_heap(first, 0, len, val, id);
      }
    }
  }

  // torch.topk's CPU selection of the first k (TopKImpl.h): std::partial_sort when k * 64 <= n (its heap
  // select decides which elements are in), else std::nth_element (introselect: the same partitions as the
  // sort, down to 3 elements, heap select past the depth limit). Sorting the k afterwards moves none out.
  void run_topk(int64_t n, int64_t k) {
    if (k == 0 || n == 0) return;
    if (k * 64 <= n) {
      heap_select(0, k, n);
      return;
    }
    int64_t first = 0, last = n;
    const int64_t nth = k - 1;
    int depth = 0;
    for (int64_t m = n; m > 1; m >>= 1) ++depth;
    depth *= 2;
    while (last - first > 3) {
      if (depth == 0) {
        heap_select(first, nth + 1, last);
        swap(first, nth);
        return;
      }
      --depth;
      const int64_t cut = partition_pivot(first, last);
      if (cut <= nth) first = cut;
      else last = cut;
    }
    insertion_sort(first, last);
  }

  // The introsort loop on the ranges that hold a boundary of [start, stop) strictly inside.
  void run(int64_t n, int64_t start, int64_t stop) {
    auto holds = [&](int64_t f, int64_t l) { return (f < start && start < l) || (f < stop && stop < l); };
    int depth = 0;
    for (int64_t m = n; m > 1; m >>= 1) ++depth;  // std::__lg(n)
    struct Range {
      int64_t first, last;
      int depth;
    };
    std::vector<Range> todo{{0, n, 2 * depth}};
    while (!todo.empty()) {
      const Range r = todo.back();
      todo.pop_back();
      if (!holds(r.first, r.last)) continue;
      if (r.last - r.first <= kThreshold) {
        insertion_sort(r.first, r.last);
      } else if (r.depth == 0) {
        heap_sort(r.first, r.last);
      } else {
        const int64_t cut = partition_pivot(r.first, r.last);
        todo.push_back({r.first, cut, r.depth - 1});
        todo.push_back({cut, r.last, r.depth - 1});
      }
    }
  }
};

// Per-thread scratch reused across calls (no page faults per tensor); buffers past kKeep bytes are released.
struct Buffers {
  std::vector<uint32_t> keys;  // uint32 or uint16 keys
  std::vector<int64_t> ix;  // used as int32 or int64
  std::vector<uint8_t> stops;
  static constexpr size_t kKeep = size_t(1) << 28;

  void reserve(int64_t n, size_t key_bytes) {
    const size_t m = static_cast<size_t>(n);
    if (keys.size() * 4 < m * key_bytes) keys.resize((m * key_bytes + 3) / 4);
    if (ix.size() < (m + 1) / 2 + 1) ix.resize((m + 1) / 2 + 1);  // as int32: two per int64
    if (stops.size() < m) stops.resize(m);
  }
  void shrink() {
    if (keys.size() * 4 + ix.size() * 8 + stops.size() > kKeep) {
      std::vector<uint32_t>().swap(keys);
      std::vector<int64_t>().swap(ix);
      std::vector<uint8_t>().swap(stops);
    }
  }
};

template <typename T, typename I>
void window_impl(const T* x, int64_t n, int64_t start, int64_t stop, bool descending, bool topk, bool* out) {
  using K = typename Key<T>::type;
  static thread_local Buffers buf;
  buf.reserve(n, sizeof(K));
  std::vector<int64_t> ix64;
  I* ix;
  if (sizeof(I) == 4) {
    ix = reinterpret_cast<I*>(buf.ix.data());
  } else {
    ix64.resize(static_cast<size_t>(n));
    ix = reinterpret_cast<I*>(ix64.data());
  }
  K* __restrict k = reinterpret_cast<K*>(buf.keys.data());
  for (int64_t i = 0; i < n; ++i) {
    k[i] = Key<T>::of(x[i]);
    ix[i] = static_cast<I>(i);
  }
  if (descending) {
    Sorter<K, I, true> s{k, ix, buf.stops.data()};
    topk ? s.run_topk(n, stop) : s.run(n, start, stop);
  } else {
    Sorter<K, I, false> s{k, ix, buf.stops.data()};
    topk ? s.run_topk(n, stop) : s.run(n, start, stop);
  }
  std::memset(out, 0, static_cast<size_t>(n));
  for (int64_t p = start; p < stop; ++p) out[ix[p]] = true;
  buf.shrink();
}

}  // namespace

void order_window_cpu(const at::Tensor& x, int64_t start, int64_t stop, bool descending, bool topk,
                      at::Tensor& out) {
  const char* op = "order_window_cpu";
  cpu::check_float3(x, op, "x");
  const int64_t n = x.numel();
  TORCH_CHECK(out.scalar_type() == at::kBool && out.numel() == n && out.is_contiguous() && out.device().is_cpu(),
              op, ": out must be a contiguous CPU bool tensor of ", n, " elements");
  TORCH_CHECK(0 <= start && start <= stop && stop <= n, op, ": need 0 <= start <= stop <= ", n, ", got [", start,
              ", ", stop, ")");
  TORCH_CHECK(!topk || start == 0, op, ": topk windows start at 0, got ", start);
  bool* o = out.data_ptr<bool>();
  FM_DISPATCH_FLOAT3(x.scalar_type(), op, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    if (n <= std::numeric_limits<int32_t>::max())
      window_impl<scalar_t, int32_t>(xp, n, start, stop, descending, topk, o);
    else
      window_impl<scalar_t, int64_t>(xp, n, start, stop, descending, topk, o);
  });
}

}  // namespace fastmerge
