// The cudnn backend's epilogue (see merge_kernel.h): one warp per (batch, row, head) row of o.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "base/cuda_check.h"
#include "kernels/cudnn/merge_kernel.h"
#include "kernels/dtype.h"
#include "kernels/softmax_state.h"

namespace ringattn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

__global__ void __launch_bounds__(kThreads) CudnnEpilogueKernel(const CudnnEpilogueParams e) {
  if (e.skip_if_set != nullptr && *e.skip_if_set != 0) return;  // the careful kernel's call
  const float ninf = -std::numeric_limits<float>::infinity();
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t total = static_cast<int64_t>(e.batch) * e.seqlen_q * e.heads;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
       row < total; row += step) {
    // row = (b * seqlen_q + i) * heads + h: consecutive warps walk o's memory order.
    const int h = static_cast<int>(row % e.heads);
    const int64_t bi = row / e.heads;
    const int64_t i = bi % e.seqlen_q;
    const int64_t b = bi / e.seqlen_q;
    const int64_t li = i - e.live_begin;
    const bool live = li >= 0 && li < e.live_count;
    const float lse_new = live ? e.stats[(b * e.heads + h) * e.live_count + li] : ninf;
    const int64_t o_at = b * e.o_batch_stride + i * e.o_row_stride + h * e.o_head_stride;
    const int64_t new_at =
        live ? b * e.o_new_batch_stride + li * e.o_new_row_stride + h * e.o_new_head_stride : 0;
    float* const lse_p =
        e.lse == nullptr ? nullptr : e.lse + b * e.lse_batch_stride + h * e.lse_head_stride + i;

    if (e.merge) {
      // Nothing to add: the partial stays exactly as it is (uniform across the warp).
      if (lse_new == ninf) continue;
      const float lse_old = *lse_p;
      __syncwarp();  // every lane has read lse before lane 0 overwrites it below
      const LseMerge w = MergeLse(lse_old, lse_new);
      float* const o = static_cast<float*>(e.o);
      // The new side is read always (its lse is finite here), the old one unless it is empty:
      // a negligible partial (weight 0) holding NaN gives NaN, 0 * NaN, as the rule wants.
      const bool read_old = lse_old != ninf;
      for (int c = lane; c < e.head_dim; c += 32) {
        float acc = w.wb * LoadAsFloat(e.o_new, new_at + c, e.o_new_dtype);
        if (read_old) acc += w.wa * o[o_at + c];
        o[o_at + c] = acc;
      }
      if (lane == 0) *lse_p = w.lse;
      continue;
    }

    if (lane == 0 && lse_p != nullptr) *lse_p = lse_new;
    if (!live) {
      for (int c = lane; c < e.head_dim; c += 32) StoreFromFloat(e.o, o_at + c, e.o_dtype, 0.0f);
    } else if (!e.o_written_in_place) {
      for (int c = lane; c < e.head_dim; c += 32) {
        StoreFromFloat(e.o, o_at + c, e.o_dtype, LoadAsFloat(e.o_new, new_at + c, e.o_new_dtype));
      }
    }
  }
}

__global__ void FillInt32Kernel(int32_t* out, int64_t n, int32_t value) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = value;
  }
}

}  // namespace

absl::Status LaunchCudnnEpilogue(const CudnnEpilogueParams& e, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(e.batch) * e.seqlen_q * e.heads;
  if (total == 0) return absl::OkStatus();
  const bool all_live = e.live_begin == 0 && e.live_count == e.seqlen_q;
  if (e.merge && e.live_count == 0) return absl::OkStatus();  // merging nothing
  if (!e.merge && e.o_written_in_place && all_live && e.lse == nullptr) return absl::OkStatus();
  const int64_t blocks =
      std::min<int64_t>((total + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks);
  CudnnEpilogueKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(e);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchFillInt32(int32_t* out, int64_t n, int32_t value, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 1024);
  FillInt32Kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(out, n, value);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace ringattn
