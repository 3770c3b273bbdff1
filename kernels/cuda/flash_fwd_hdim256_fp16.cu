// The fast forward kernel for head_dim 256, fp16 inputs, every tiling of that head dim
// (flash_fwd_configs.h); one (head_dim, dtype) per file so that they compile in parallel.
#include "kernels/cuda/flash_fwd.cuh"

namespace ringattn {
template absl::Status LaunchFlashForward<256, DType::kF16>(const AttentionParams& p, int config,
                                                           cudaStream_t stream);
template absl::StatusOr<FlashKernelResources> FlashForwardKernelResources<256, DType::kF16>(
    int config);
}  // namespace ringattn
