// The simple GPU attention kernel: the on-device oracle beside the fast kernel (flash_fwd.h).
//
// One thread block per (batch, head, query row) at a time (the grid strides over them); its
// threads stride over the keys. Pass 1 finds the row's maximum score, pass 2 sums
// exp(score - max) and the weighted V rows in fp32. Any input dtype (fp32, fp16, bf16), any
// head_dim up to 256, any element strides. Slow by design: it shares no tiling and no
// online-softmax rescaling with the fast kernel, only the contract
// (score_mod.h for the score function and the mask, MergeLse for merge_into_output).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/attention_params.h"

namespace ringattn {

// Enqueues the computation of `p` on `stream` and returns; `p` must have passed ValidateParams
// and its pointers must be device memory. Writes o (p.o_dtype) and lse (when non-null), or
// merges into fp32 o and lse with p.merge_into_output. A fully masked row gets o = 0 and
// lse = -inf (merge: its partial is left untouched). Launch errors are returned; errors while
// the kernel runs surface at the caller's next synchronising call. With `run_if_set` (a device
// word), the kernel computes only when the word is nonzero at its start, and otherwise returns
// at once, writing nothing: the careful path of the non-finite guard (non_finite_guard.h).
absl::Status CudaReferenceForward(const AttentionParams& p, cudaStream_t stream,
                                  const uint32_t* run_if_set = nullptr);

}  // namespace ringattn
