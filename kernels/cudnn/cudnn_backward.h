// The backward of the "cudnn" backend (cudnn_backend.h): cuDNN's fused SDPA backward
// (cudnn-frontend graph.sdpa_backward).
//
// Device pointers (MemorySpace::kDevice), enqueued on the call's stream; Backward returns
// without synchronising.
//
// ---- What is refused (InvalidArgument naming the option; nothing touches the device) -------
// Everything the forward cudnn backend refuses (cudnn_backend.h: PlanCudnnCall and the q/k/v
// alignment rule): dtype other than bf16/fp16, alibi_slopes, softcap, a partial causal/window
// mask with q_pos_stride != k_pos_stride, ... Plus, for the backward's own tensors:
//   out == nullptr ("out": cuDNN computes D = rowsum(dO * O) itself from O; a precomputed
//     `delta` is accepted but not used),
//   out_dtype != fwd.dtype ("out_dtype": cuDNN reads O and dO in the input dtype),
//   out/dout not 16-byte aligned at the first live row, or an out/dout batch/head/row stride
//     (of a dimension of size > 1) not a multiple of 8 elements (named, e.g. "dout_row_stride").
// dq/dk/dv may have any strides (fp32; the copy kernel below reads through them).
//
// ---- How a call runs ------------------------------------------------------------------------
// 1. The mask plan of the forward (PlanCudnnCall(p.fwd)) gives the live block: query rows
//    [q_begin, +q_count), keys [k_begin, +k_count), and the TOP_LEFT band (+ padding mask)
//    cuDNN applies inside it, exactly as the forward does.
// 2. lse of the live rows is gathered into a packed fp32 [b, h, q_count, 1] Stats scratch (our
//    lse is the natural-log LSE over all the keys the output came from, which is what cuDNN's
//    Stats is; for a ring step cuDNN then computes this call's keys' contribution).
// 3. cuDNN runs on the live block, writing dQ [b, q_count, h, d], dK and dV [b, k_count, h_k, d]
//    into packed scratch buffers of the input dtype (so gradients are rounded to bf16/fp16).
// 4. A small kernel (LaunchGradToFloat) adds (accumulate) or writes them into our fp32 dq/dk/dv
//    through their strides. Rows outside the live block get no contribution: 0 when writing,
//    untouched when accumulating. An empty plan runs no cuDNN (zeros, or nothing when
//    accumulating).
// GQA: dK/dV are [b, h_k, s_k, d] tensors; cuDNN sums the contributions of the h / h_k query
// heads of each K/V head (query head i reads K/V head i / (h / h_k), as in the forward). The
// GPU test checks this against the fp64 reference at 8:2.
//
// One query against one key (a live block of 1 x 1, which rings with single-row segments make)
// cuDNN's backward rejects at graph validation ("s_q = s_kv = 1 is not supported"); that call
// runs our kernel (FlashBackwardAllocatingDelta, flash_bwd.h) on the same stream instead.
//
// ---- Caching ----------------------------------------------------------------------------------
// Shared with the forward (cudnn_context.h): one handle, one graph cache (backward keys: the
// live block's sizes, strides of q/k/v/o/dO, mask plan, scale) and one workspace (here cuDNN's
// + Stats + dQ/dK/dV scratch).
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
