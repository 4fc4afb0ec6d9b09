// The TALL kernel's host side (tall.cu), shared by tall_masks.cu (the masks) and consensus_merge.cu (the merge they
// select). Per-task lambdas are CPU tensors, read here and passed by value.
#pragma once

#include "kernels/tall.cuh"
#include "launch_utils.h"

namespace fastmerge {
namespace cuda {

// Shared by tall_masks_cuda and consensus_merge_cuda: everything but the outputs.
TallArgs tall_args(const OptTensor& base, const std::vector<at::Tensor>& experts, const at::Tensor& lambdas,
                   const OptTensor& mtl, int T);

// Launches the TALL kernel (masks and/or merge, as `a` says) for the experts' dtype on the current stream of e0's
// device.
void run_tall(const TallArgs& a, const at::Tensor& e0);

}  // namespace cuda
}  // namespace fastmerge
