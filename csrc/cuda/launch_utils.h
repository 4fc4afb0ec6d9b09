// Host-side helpers of the CUDA launchers (csrc/cuda/<op>.cu): argument checks, dtype dispatch to the device
// element types, alignment tests, grid sizing from the SM count and occupancy.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers), so
// the launchers also compile against a CPU-only torch's headers plus the CUDA toolkit (tools/check_cuda.py).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "fastmerge/ops.h"
#include "kernels/common.cuh"

namespace fastmerge {
namespace cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// Device element-type code of a tensor (float32, float16 or bfloat16), or an error naming the argument.
inline int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kFloat32;
    case at::kHalf:
      return kFloat16;
    case at::kBFloat16:
      return kBFloat16;
    default:
      TORCH_CHECK(false, name, ": dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return kFloat32;
}

// f(TypeTag<T>{}) with T the device element type of code `dt`.
template <typename F>
inline void dispatch_dtype(int dt, F&& f) {
  switch (dt) {
    case kFloat16:
      f(TypeTag<__half>{});
      break;
    case kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      break;
    default:
      f(TypeTag<float>{});
      break;
  }
}

inline bool is_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int current_device() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

inline int sm_count() {
  static std::mutex mu;
  static std::map<int, int> cache;  // device -> SMs
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return cache[dev] = std::max(sms, 1);
}

// Resident blocks per SM of `kernel` (cached per device and launch shape: launchers run once per tensor,
// often for thousands of small tensors).
inline int blocks_per_sm(const void* kernel, int threads, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  const auto key = std::make_tuple(kernel, current_device(), threads, smem);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  return cache[key] = std::max(per_sm, 1);
}

// Blocks for a grid-stride kernel: enough to fill every SM at the kernel's occupancy, never more than
// there is work for (work_blocks >= 1).
template <typename Kernel>
inline int grid_size(Kernel kernel, int threads, size_t smem, int64_t work_blocks) {
  const int per_sm = blocks_per_sm(reinterpret_cast<const void*>(kernel), threads, smem);
  const int64_t full = static_cast<int64_t>(sm_count()) * per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min(work_blocks, full)));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The experts (and base): 1 .. kMaxTasks contiguous CUDA tensors of one dtype and numel. Returns T.
inline int check_experts(const OptTensor& base, const std::vector<at::Tensor>& experts) {
  const int64_t T = static_cast<int64_t>(experts.size());
  TORCH_CHECK(T >= 1 && T <= kMaxTasks, "experts: need 1 to ", kMaxTasks, " tensors, got ", T);
  const at::Tensor& e0 = experts[0];
  dtype_code(e0, "experts");
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& e = experts[t];
    TORCH_CHECK(e.defined() && e.is_cuda(), "experts[", t, "]: must be a CUDA tensor");
    TORCH_CHECK(e.scalar_type() == e0.scalar_type(), "experts[", t, "]: dtype differs from experts[0]");
    TORCH_CHECK(e.numel() == e0.numel(), "experts[", t, "]: numel differs from experts[0]");
    TORCH_CHECK(e.is_contiguous(), "experts[", t, "]: must be contiguous");
    TORCH_CHECK(e.device() == e0.device(), "experts[", t, "]: device differs from experts[0]");
  }
  if (base.has_value()) {
    const at::Tensor& b = *base;
    TORCH_CHECK(b.is_cuda() && b.device() == e0.device(), "base: must be on the experts' CUDA device");
    TORCH_CHECK(b.scalar_type() == e0.scalar_type(), "base: dtype differs from the experts'");
    TORCH_CHECK(b.numel() == e0.numel(), "base: numel differs from the experts'");
    TORCH_CHECK(b.is_contiguous(), "base: must be contiguous");
  }
  return static_cast<int>(T);
}

// A contiguous CUDA output/input of numel n on `dev`, of a float dtype; returns its dtype code.
inline int check_float_tensor(const at::Tensor& t, const char* name, int64_t n, const at::Device& dev) {
  TORCH_CHECK(t.defined() && t.is_cuda() && t.device() == dev, name, ": must be on the experts' CUDA device");
  TORCH_CHECK(t.numel() == n, name, ": numel must be ", n, ", got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous");
  return dtype_code(t, name);
}

inline void check_accumulator(const at::Tensor& t, const char* name, at::ScalarType st, int64_t numel,
                              const at::Device& dev) {
  TORCH_CHECK(t.defined() && t.is_cuda() && t.device() == dev, name, ": must be on the input's CUDA device");
  TORCH_CHECK(t.scalar_type() == st, name, ": dtype must be ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel && t.is_contiguous(), name, ": must be a contiguous tensor of ", numel,
              " elements");
}

// A contiguous fp32 CPU tensor of `numel` elements (per-task parameters), read on the host.
inline const float* host_floats(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), name, ": must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": dtype must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel && t.is_contiguous(), name, ": must be a contiguous tensor of ", numel,
              " elements, got ", t.numel());
  return t.data_ptr<float>();
}


// ---- the multi-expert launchers ----------------------------------------------------------------------------

// Whether every expert (and base) is 16-byte aligned (then every 8-element chunk is).
inline bool experts_aligned(const OptTensor& base, const std::vector<at::Tensor>& experts) {
  bool ok = !base.has_value() || is_aligned(base->data_ptr(), 16);
  for (const at::Tensor& e : experts) ok = ok && is_aligned(e.data_ptr(), 16);
  return ok;
}

// The bool masks [T, n]: 8-byte stores need every row start t * n aligned.
inline bool masks_aligned(const at::Tensor& masks, int64_t n) { return is_aligned(masks.data_ptr(), 8) && n % 8 == 0; }

inline void check_masks(const at::Tensor& masks, int T, int64_t n, const at::Device& dev) {
  TORCH_CHECK(masks.defined() && masks.is_cuda() && masks.device() == dev,
              "masks: must be on the experts' CUDA device");
  TORCH_CHECK(masks.scalar_type() == at::kBool, "masks: dtype must be bool, got ", masks.scalar_type());
  TORCH_CHECK(masks.numel() == static_cast<int64_t>(T) * n && masks.is_contiguous(),
              "masks: must be a contiguous tensor of T * numel = ", static_cast<int64_t>(T) * n, " elements");
}

}  // namespace cuda
}  // namespace fastmerge
