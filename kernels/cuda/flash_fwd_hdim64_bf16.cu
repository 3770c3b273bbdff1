// The fast forward kernel for head_dim 64, bf16 inputs (one instantiation per file so that
// they compile in parallel).
#include "kernels/cuda/flash_fwd.cuh"

namespace ringattn {
template absl::Status LaunchFlashForward<64, DType::kBF16>(const AttentionParams& p,
                                                           cudaStream_t stream);
}  // namespace ringattn
