// Helper kernels of the cudnn backward backend (cudnn_backward.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "base/cuda_check.h"
#include "kernels/cudnn/cudnn_backward.h"
#include "kernels/dtype.h"

namespace ringattn {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

unsigned Blocks(int64_t n, int64_t per_block) {
  return static_cast<unsigned>(std::min<int64_t>((n + per_block - 1) / per_block, kMaxBlocks));
}

__global__ void __launch_bounds__(kThreads) GradToFloatKernel(const GradToFloatParams g) {
  const int64_t total = g.batch * g.rows * g.heads * g.head_dim;
  for (int64_t at = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; at < total;
       at += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = at % g.head_dim;
    const int64_t h = (at / g.head_dim) % g.heads;
    const int64_t i = (at / (g.head_dim * g.heads)) % g.rows;
    const int64_t b = at / (g.head_dim * g.heads * g.rows);
    const int64_t li = i - g.live_begin;
    const bool live = li >= 0 && li < g.live_count;
    if (!live && g.accumulate) continue;
    float x = 0.0f;
    if (live) {
      x = LoadAsFloat(g.src, ((b * g.live_count + li) * g.heads + h) * g.head_dim + c, g.src_dtype);
    }
    float* const d =
        g.dst + b * g.dst_batch_stride + i * g.dst_row_stride + h * g.dst_head_stride + c;
    *d = g.accumulate ? *d + x : x;
  }
}

__global__ void GatherLseKernel(const float* lse, int64_t bs, int64_t hs, int64_t batch,
                                int64_t heads, int64_t begin, int64_t count, float* dst) {
  const int64_t total = batch * heads * count;
  for (int64_t at = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; at < total;
       at += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = at % count;
    const int64_t h = (at / count) % heads;
    const int64_t b = at / (count * heads);
    dst[at] = lse[b * bs + h * hs + begin + i];
  }
}

}  // namespace

absl::Status LaunchGradToFloat(const GradToFloatParams& g, cudaStream_t stream) {
  const int64_t total = g.batch * g.rows * g.heads * g.head_dim;
  if (total == 0) return absl::OkStatus();
  if (g.accumulate && g.live_count == 0) return absl::OkStatus();
  GradToFloatKernel<<<Blocks(total, kThreads), kThreads, 0, stream>>>(g);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchGatherLse(const float* lse, int64_t lse_batch_stride, int64_t lse_head_stride,
                             int64_t batch, int64_t heads, int64_t begin, int64_t count, float* dst,
                             cudaStream_t stream) {
  const int64_t total = batch * heads * count;
  if (total == 0) return absl::OkStatus();
  GatherLseKernel<<<Blocks(total, kThreads), kThreads, 0, stream>>>(
      lse, lse_batch_stride, lse_head_stride, batch, heads, begin, count, dst);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace ringattn
