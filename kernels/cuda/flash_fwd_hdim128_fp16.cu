// The fast forward kernel for head_dim 128, fp16 inputs (one instantiation per file so that
// they compile in parallel).
#include "kernels/cuda/flash_fwd.cuh"

namespace ringattn {
template absl::Status LaunchFlashForward<128, DType::kF16>(const AttentionParams& p,
                                                           cudaStream_t stream);
}  // namespace ringattn
