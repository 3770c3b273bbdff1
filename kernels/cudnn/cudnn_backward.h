// The backward of the "cudnn" backend (cudnn_backend.h): cuDNN's fused SDPA backward
// (cudnn-frontend graph.sdpa_backward) on the forward's live block and band, gradients added or
// written into fp32 dq/dk/dv through their strides. Device pointers, enqueued on the call's
// stream. Refuses what the forward refuses, plus out == nullptr, out_dtype != dtype and
// misaligned out/dout (named); a 1 x 1 live block, which cuDNN rejects, runs our kernel. How a
// call runs and what it caches: docs/cudnn.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/attention_backward_params.h"
#include "kernels/cudnn/cudnn_backend.h"
#include "kernels/dtype.h"

namespace ringattn {

class CudnnDeviceContext;  // cudnn_context.h

// Checks `p` against what the cudnn backward can compute (host only, reads no tensor).
absl::Status CudnnBackwardSupports(const AttentionBackwardParams& p);

// The backend's Backward and ComputeDelta on `stream` with its context `c` (internal to
// kernels/cudnn; call them through AttentionBackend).
absl::Status CudnnBackward(CudnnDeviceContext& c, const AttentionBackwardParams& p,
                           cudaStream_t stream);
absl::Status CudnnComputeDelta(CudnnDeviceContext& c, const AttentionBackwardParams& p,
                               float* delta, cudaStream_t stream);

// ---- Helper kernels (cudnn_backward_kernels.cu) --------------------------------------------

// dst (fp32, [batch, rows, heads, head_dim] through dst strides) gets src for rows
// [live_begin, live_begin + live_count): src is packed [batch, live_count, heads, head_dim]
// of type src_dtype. accumulate: dst += src on live rows, other rows untouched; otherwise
// dst = src on live rows and 0 elsewhere. src may be null when live_count == 0.
struct GradToFloatParams {
  const void* src = nullptr;
  DType src_dtype = DType::kBF16;
  int64_t batch = 0, rows = 0, heads = 0, head_dim = 0;
  int64_t live_begin = 0, live_count = 0;
  float* dst = nullptr;
  int64_t dst_batch_stride = 0, dst_row_stride = 0, dst_head_stride = 0;
  bool accumulate = false;
};
absl::Status LaunchGradToFloat(const GradToFloatParams& g, cudaStream_t stream);

// dst[(b * heads + h) * count + i] = lse[b * lse_batch_stride + h * lse_head_stride + begin + i].
absl::Status LaunchGatherLse(const float* lse, int64_t lse_batch_stride, int64_t lse_head_stride,
                             int64_t batch, int64_t heads, int64_t begin, int64_t count, float* dst,
                             cudaStream_t stream);

// LaunchComputeDelta (D = rowsum(dO * O)) is flash_bwd.h's, shared with the cuda backward.

}  // namespace ringattn
