// The "cuda" backward backend: validation, D scratch, and the kernel on the backend's stream.
#include "kernels/cuda/cuda_backward.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/status.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/cuda/flash_bwd.h"

namespace ringattn {
namespace {

class FlashCudaBackwardBackend final : public CudaBackwardBackend {
 public:
  std::string_view name() const override { return "cuda"; }
  bool supports_position_runs() const override { return true; }

  absl::Status Backward(const AttentionBackwardParams& p) override {
    RA_RETURN_IF_ERROR(ValidateBackwardParams(p));
    // FlashBackward checks the kernel's support (before any scratch is allocated).
    return FlashBackwardAllocatingDelta(p, stream());
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
