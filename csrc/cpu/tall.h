// The TALL kernel on the CPU (tall.cpp), shared by tall_masks.cpp (the masks) and consensus_merge.cpp (the merge
// they select). Semantics: fastmerge/ops/tall_masks.py, consensus_merge.py (tall_masks_ref, consensus_merge_ref).
#pragma once

#include "common.h"

namespace fastmerge {
namespace cpu {

struct TallArgs {
  const float* lam;  // (T,)
  const void* mtl;   // nullptr: mtl = sum_t delta_t
  at::ScalarType mtl_dt;
  bool* masks;  // (T, N), or nullptr (consensus)
  // consensus only
  void* out;  // nullptr (tall_masks)
  at::ScalarType odt;
  int64_t min_count;
  float lam_out;
};

// Checks and arguments shared by the two TALL entry points; runs the kernel (masks and/or merged out).
// N: the element count the caller got from cpu::check_experts.
void run_tall(const char* op, int64_t N, const OptTensor& base, const std::vector<at::Tensor>& experts,
              const at::Tensor& lambdas, const OptTensor& mtl, TallArgs A);

}  // namespace cpu
}  // namespace fastmerge
