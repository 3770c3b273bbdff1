// The fast CPU forward: blocked online softmax (FlashAttention's schedule on a CPU), fp32
// accumulation, work split over a thread pool by (batch, head, query block).
#pragma once

#include "absl/status/status.h"
#include "kernels/attention_params.h"

namespace ringattn {

struct FlashCpuOptions {
  int num_threads = 0;  // 0: std::thread::hardware_concurrency()
};

// Computes `p` (validated first). Writes o in p.o_dtype and the fp32 lse when p.lse is set, or
// merges into fp32 o and lse with p.merge_into_output.
absl::Status FlashCpuForward(const AttentionParams& p, const FlashCpuOptions& options = {});

}  // namespace ringattn
