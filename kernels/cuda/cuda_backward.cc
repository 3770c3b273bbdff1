// The "cuda" backward backend: validation, D scratch, and the kernel on the backend's stream.
#include "kernels/cuda/cuda_backward.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/status.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/flash_bwd.h"
#include "kernels/status_macros.h"

namespace ringattn {
namespace {

class FlashCudaBackwardBackend final : public CudaBackwardBackend {
 public:
  std::string_view name() const override { return "cuda"; }

  absl::Status Backward(const AttentionBackwardParams& p) override {
    RA_RETURN_IF_ERROR(ValidateBackwardParams(p));
    RA_RETURN_IF_ERROR(CheckFlashBackwardSupport(p));
    if (p.delta != nullptr || p.fwd.seqlen_q == 0) return FlashBackward(p, nullptr, stream());
    // D for this call only, with lse's strides (the kernel reads both through them): stream-
    // ordered scratch from the device's memory pool spanning lse's view. (A ring passes its
    // own D, computed once per shard, and takes the branch above.)
    const int64_t span = (p.fwd.batch - 1) * p.lse_batch_stride +
                         (p.fwd.heads - 1) * p.lse_head_stride + p.fwd.seqlen_q;
    void* scratch = nullptr;
    RA_CUDA_RETURN_IF_ERROR(
        cudaMallocAsync(&scratch, static_cast<size_t>(span) * sizeof(float), stream()));
    const absl::Status run = FlashBackward(p, static_cast<float*>(scratch), stream());
    const cudaError_t freed = cudaFreeAsync(scratch, stream());
    RA_RETURN_IF_ERROR(run);
    RA_CUDA_RETURN_IF_ERROR(freed);
    return absl::OkStatus();
  }

  absl::Status ComputeDelta(const AttentionBackwardParams& p, float* delta) override {
    if (p.out == nullptr || p.dout == nullptr) {
      return absl::InvalidArgumentError("cuda: ComputeDelta needs out and dout");
    }
    return LaunchComputeDelta(p, delta, stream());
  }
};

}  // namespace

std::unique_ptr<AttentionBackwardBackend> MakeCudaBackwardBackend() {
  return std::make_unique<FlashCudaBackwardBackend>();
}

}  // namespace ringattn
