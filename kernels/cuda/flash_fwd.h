// Host entry points of the fast forward kernel (flash_fwd.cuh): FlashAttention-2's schedule on
// mma.sync tensor cores, compiled for sm_90a. Plain C++ (no device code), so that host-only
// files can call it.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "kernels/attention_params.h"
#include "kernels/dtype.h"

namespace ringattn {

// Whether the fast kernel can compute `p` (already through ValidateParams): q/k/v in bf16 or
// fp16, head_dim 64, 128 or 256, 16-byte aligned q/k/v rows (pointers 16-byte aligned, strides
// multiples of 8 elements: the kernel copies 16-byte chunks), o pointer aligned to two elements
// and o strides even (it stores pairs), heads and batch <= 65535 (grid y and z). Each refusal is
// InvalidArgument naming the field.
absl::Status CheckFlashForwardSupport(const AttentionParams& p);

// Checks support, then enqueues the kernel on `stream` and returns; pointers are device memory.
// Writes o (p.o_dtype: fp32, fp16 or bf16) and lse (when non-null), or merges into fp32 o and
// lse with p.merge_into_output. Launch errors are returned; errors while the kernel runs surface
// at the caller's next synchronising call.
absl::Status FlashForward(const AttentionParams& p, cudaStream_t stream);

// One instantiation of the kernel per (head_dim, dtype); defined in flash_fwd_hdim*_*.cu (one
// file each, so that they build in parallel). FlashForward dispatches to them.
template <int kHeadDim, DType kDType>
absl::Status LaunchFlashForward(const AttentionParams& p, cudaStream_t stream);
extern template absl::Status LaunchFlashForward<64, DType::kBF16>(const AttentionParams&,
                                                                  cudaStream_t);
extern template absl::Status LaunchFlashForward<64, DType::kF16>(const AttentionParams&,
                                                                 cudaStream_t);
extern template absl::Status LaunchFlashForward<128, DType::kBF16>(const AttentionParams&,
                                                                   cudaStream_t);
extern template absl::Status LaunchFlashForward<128, DType::kF16>(const AttentionParams&,
                                                                  cudaStream_t);
extern template absl::Status LaunchFlashForward<256, DType::kBF16>(const AttentionParams&,
                                                                   cudaStream_t);
extern template absl::Status LaunchFlashForward<256, DType::kF16>(const AttentionParams&,
                                                                  cudaStream_t);

}  // namespace ringattn
