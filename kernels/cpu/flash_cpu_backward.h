// The fast CPU backward: FlashAttention-2's backward schedule on a CPU (blocked, fp32
// accumulation, P recomputed per block from the forward's LSE, threads over key blocks).
#pragma once

#include "absl/status/status.h"
#include "kernels/attention_backward_params.h"
#include "kernels/cpu/flash_cpu.h"  // FlashCpuOptions

namespace ringattn {

// Computes the gradients of `p` (validated first) into its fp32 dq, dk and dv, overwriting or
// (p.accumulate) adding. Results are bitwise independent of options.num_threads.
absl::Status FlashCpuBackward(const AttentionBackwardParams& p,
                              const FlashCpuOptions& options = {});

// D = rowsum(dout * out) of every query row of `p`, in fp32, into `delta` [batch, heads,
// seqlen_q] with p.lse's strides: what FlashCpuBackward computes first when p.delta is null.
absl::Status FlashCpuBackwardDelta(const AttentionBackwardParams& p, float* delta,
                                   const FlashCpuOptions& options = {});

}  // namespace ringattn
