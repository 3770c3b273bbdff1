// fp32 inputs for the fast GPU kernels, whose tensor-core operands are 16-bit: the call's fp32
// tensors are rounded into stream-ordered scratch, the call runs on the copies, and the
// scratch is released on the stream. The forward rounds to fp16 (11 significant bits): a value
// beyond fp16's range becomes an infinity there, which the non-finite guard sees, and the
// careful kernel then computes the call from the fp32 originals. The backward, which has no
// careful kernel, rounds to bf16 (8 significant bits, fp32's range), so that no finite input
// overflows. Errors against the fp64 reference: docs/kernels.md, "fp32 inputs".
#pragma once

#include <cuda_runtime_api.h>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"

namespace ringattn {

// `p` as its 16-bit copies will look: dtype `half`, q, k and v contiguous at an aligned
// placeholder address never to be read. For checking a kernel's support before rounding.
AttentionParams HalfCopyShape(const AttentionParams& p, DType half);
// The same for the backward (bf16; out and dout too).
AttentionBackwardParams HalfCopyShape(const AttentionBackwardParams& p);

// Runs `run(half)` with `half` equal to `p` but for q, k and v: fp16 copies, contiguous
// [batch, rows, heads, head_dim], dtype kF16. `p` must be validated with dtype kF32.
absl::Status WithHalfInputs(const AttentionParams& p, cudaStream_t stream,
                            absl::FunctionRef<absl::Status(const AttentionParams& half)> run);

// The same for the backward: q, k, v, out and dout as bf16 copies (out_dtype kBF16); lse,
// delta and the fp32 gradients as they are. `p` must be validated with fwd.dtype kF32.
absl::Status WithHalfInputs(
    const AttentionBackwardParams& p, cudaStream_t stream,
    absl::FunctionRef<absl::Status(const AttentionBackwardParams& half)> run);

}  // namespace ringattn
