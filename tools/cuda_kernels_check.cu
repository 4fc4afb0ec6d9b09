// Compile check of the torch-free CUDA kernel headers (csrc/cuda/kernels/*.cuh): includes every header and
// explicitly instantiates every kernel for every element-type combination the launchers use. Compiled (not
// linked, not run) by tools/check_cuda.py.
#include "../csrc/cuda/kernels/common.cuh"
#include "../csrc/cuda/kernels/abs_histogram.cuh"
#include "../csrc/cuda/kernels/emr_elect.cuh"
#include "../csrc/cuda/kernels/prune.cuh"
#include "../csrc/cuda/kernels/row_kth_largest_abs.cuh"
#include "../csrc/cuda/kernels/tall.cuh"
#include "../csrc/cuda/kernels/ties_merge.cuh"

namespace fm = fastmerge::cuda;
using fm::EmrArgs;
using fm::PruneArgs;
using fm::TallArgs;
using fm::TiesArgs;

#define FM_INST_IN(T)                                                                                   \
  template __global__ void fm::abs_histogram_kernel<T, false>(const T*, int64_t, bool, uint32_t,        \
                                                              unsigned long long*);                     \
  template __global__ void fm::abs_histogram_kernel<T, true>(const T*, int64_t, bool, uint32_t,         \
                                                             unsigned long long*);                      \
  template __global__ void fm::abs_histogram_global_kernel<T, false>(const T*, int64_t, bool, uint32_t, \
                                                                     unsigned long long*);              \
  template __global__ void fm::abs_histogram_global_kernel<T, true>(const T*, int64_t, bool, uint32_t,  \
                                                                    unsigned long long*);               \
  template __global__ void fm::row_kth_largest_abs_kernel<T>(const T*, int64_t, int64_t, int64_t, bool,  \
                                                             bool, float*);                             \
  template __global__ void fm::ties_merge_kernel<T, fm::kMergeSum>(const __grid_constant__ TiesArgs);   \
  template __global__ void fm::ties_merge_kernel<T, fm::kMergeMean>(const __grid_constant__ TiesArgs);  \
  template __global__ void fm::ties_merge_kernel<T, fm::kMergeWMean>(const __grid_constant__ TiesArgs); \
  template __global__ void fm::ties_merge_kernel<T, fm::kMergeMax>(const __grid_constant__ TiesArgs);   \
  template __global__ void fm::ties_merge_kernel<T, fm::kMergeCountsOnly>(                              \
      const __grid_constant__ TiesArgs);                                                                \
  template __global__ void fm::tall_kernel<T>(const __grid_constant__ TallArgs);                        \
  template __global__ void fm::emr_elect_kernel<T>(const __grid_constant__ EmrArgs);                    \
  template __global__ void fm::prune_kernel<T, float>(const __grid_constant__ PruneArgs);               \
  template __global__ void fm::prune_kernel<T, __half>(const __grid_constant__ PruneArgs);              \
  template __global__ void fm::prune_kernel<T, __nv_bfloat16>(const __grid_constant__ PruneArgs);

FM_INST_IN(float)
FM_INST_IN(__half)
FM_INST_IN(__nv_bfloat16)
