// The two CUDA backends: thin wrappers that validate and launch on the call's stream.
#include "kernels/cuda/cuda_backend.h"

#include <memory>
#include <string_view>

#include "absl/status/status.h"
#include "base/status_macros.h"
#include "kernels/backend_registry.h"
#include "kernels/cuda/flash_bwd.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/cuda/reference_attention.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

class FlashCudaBackend final : public CudaBackend {
 public:
  std::string_view name() const override { return "cuda"; }
  BackendCapabilities capabilities() const override {
    return {.backward = true, .position_runs = true, .partial_input = true};
  }

 protected:
  absl::Status DoForward(const AttentionParams& p, const ExecutionContext& ctx) override {
    RA_RETURN_IF_ERROR(ValidateParams(p));
    return FlashForward(p, StreamOf(ctx));
  }
  absl::Status DoBackward(const AttentionBackwardParams& p, const ExecutionContext& ctx) override {
    RA_RETURN_IF_ERROR(ValidateBackwardParams(p));
    // FlashBackward checks the kernel's support (before any scratch is allocated).
    return FlashBackwardAllocatingDelta(p, StreamOf(ctx));
  }
  absl::Status DoComputeDelta(const AttentionBackwardParams& p, float* delta,
                              const ExecutionContext& ctx) override {
    if (p.out == nullptr || p.dout == nullptr) {
      return absl::InvalidArgumentError("cuda: ComputeDelta needs out and dout");
    }
    return LaunchComputeDelta(p, delta, StreamOf(ctx));
  }
};

class ReferenceCudaBackend final : public CudaBackend {
 public:
  std::string_view name() const override { return "cuda_reference"; }
  BackendCapabilities capabilities() const override {
    return {.position_runs = true,
            .partial_input = true,
            .fp32_inputs = true,
            .non_finite_rule = true};
  }

 protected:
  absl::Status DoForward(const AttentionParams& p, const ExecutionContext& ctx) override {
    RA_RETURN_IF_ERROR(ValidateParams(p));
    return CudaReferenceForward(p, StreamOf(ctx));
  }
};

}  // namespace

// Kept in every program that links ra_kernels_cuda (kernels/cuda/CMakeLists.txt: --undefined).
extern "C" const bool ringattn_register_cuda_backends = RegisterBackends({
    {"cuda", [] { return std::unique_ptr<AttentionBackend>(new FlashCudaBackend()); }},
    {"cuda_reference",
     [] { return std::unique_ptr<AttentionBackend>(new ReferenceCudaBackend()); }},
});

}  // namespace ringattn
