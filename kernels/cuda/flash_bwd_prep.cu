// The backward's small kernels around the main one: D = rowsum(dO * O), and zeroing dq before
// the main kernel adds into it.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "base/cuda_check.h"
#include "kernels/cuda/flash_bwd.h"
#include "kernels/dtype.h"

namespace ringattn {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

unsigned Blocks(int64_t n, int64_t per_block) {
  return static_cast<unsigned>(std::min<int64_t>((n + per_block - 1) / per_block, kMaxBlocks));
}

// One warp per (batch, query row, head): D[b, h, i] = sum_c dout[b, i, h, c] * out[b, i, h, c].
__global__ void __launch_bounds__(kThreads)
    DeltaKernel(const AttentionBackwardParams p, float* delta) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t total = static_cast<int64_t>(p.fwd.batch) * p.fwd.seqlen_q * p.fwd.heads;
  const int64_t step = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
       row < total; row += step) {
    const int64_t h = row % p.fwd.heads;
    const int64_t i = (row / p.fwd.heads) % p.fwd.seqlen_q;
    const int64_t b = row / (p.fwd.heads * p.fwd.seqlen_q);
    const int64_t o_at = b * p.out_batch_stride + i * p.out_row_stride + h * p.out_head_stride;
    const int64_t d_at = b * p.dout_batch_stride + i * p.dout_row_stride + h * p.dout_head_stride;
    float acc = 0.0f;
    for (int c = lane; c < p.fwd.head_dim; c += 32) {
      acc += LoadAsFloat(p.out, o_at + c, p.out_dtype) * LoadAsFloat(p.dout, d_at + c, p.out_dtype);
    }
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) delta[b * p.lse_batch_stride + h * p.lse_head_stride + i] = acc;
  }
}

// dq[b, i, h, :] = 0 through dq's strides.
__global__ void __launch_bounds__(kThreads) ZeroDqKernel(const AttentionBackwardParams p) {
  const int64_t d = p.fwd.head_dim;
  const int64_t total = static_cast<int64_t>(p.fwd.batch) * p.fwd.seqlen_q * p.fwd.heads * d;
  for (int64_t at = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; at < total;
       at += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = at % d;
    const int64_t h = (at / d) % p.fwd.heads;
    const int64_t i = (at / (d * p.fwd.heads)) % p.fwd.seqlen_q;
    const int64_t b = at / (d * p.fwd.heads * p.fwd.seqlen_q);
    p.dq[b * p.dq_batch_stride + i * p.dq_row_stride + h * p.dq_head_stride + c] = 0.0f;
  }
}

}  // namespace

absl::Status LaunchComputeDelta(const AttentionBackwardParams& p, float* delta,
                                cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.fwd.batch) * p.fwd.seqlen_q * p.fwd.heads;
  if (total == 0) return absl::OkStatus();
  DeltaKernel<<<Blocks(total, kThreads / 32), kThreads, 0, stream>>>(p, delta);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchZeroDq(const AttentionBackwardParams& p, cudaStream_t stream) {
  const int64_t total =
      static_cast<int64_t>(p.fwd.batch) * p.fwd.seqlen_q * p.fwd.heads * p.fwd.head_dim;
  if (total == 0) return absl::OkStatus();
  ZeroDqKernel<<<Blocks(total, kThreads), kThreads, 0, stream>>>(p);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace ringattn
