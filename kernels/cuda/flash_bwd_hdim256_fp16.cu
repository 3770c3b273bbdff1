// The backward kernel for head_dim 256, fp16 inputs, every tiling of that head dim
// (flash_bwd_configs.h); one (head_dim, dtype) per file so that they compile in parallel.
#include "kernels/cuda/flash_bwd.cuh"

namespace ringattn {
template absl::Status LaunchFlashBackward<256, DType::kF16>(const AttentionBackwardParams& p,
                                                             int config, cudaStream_t stream);
template absl::StatusOr<FlashBackwardResources> FlashBackwardResourcesOf<256, DType::kF16>(
    int config);
}  // namespace ringattn
