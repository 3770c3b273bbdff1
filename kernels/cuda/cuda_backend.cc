// The two CUDA backends: thin wrappers that validate and launch on the backend's stream.
#include "kernels/cuda/cuda_backend.h"

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/cuda/reference_attention.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

constexpr std::string_view kCudaName = "cuda";
constexpr std::string_view kCudaReferenceName = "cuda_reference";

class FlashCudaBackend final : public CudaBackend {
 public:
  std::string_view name() const override { return kCudaName; }
  bool supports_position_runs() const override { return true; }
  bool supports_partial_input() const override { return true; }
  absl::Status Forward(const AttentionParams& p) override {
    RA_RETURN_IF_ERROR(ValidateParams(p));
    return FlashForward(p, stream());
  }
};

class ReferenceCudaBackend final : public CudaBackend {
 public:
  std::string_view name() const override { return kCudaReferenceName; }
  bool supports_position_runs() const override { return true; }
  bool supports_partial_input() const override { return true; }
  absl::Status Forward(const AttentionParams& p) override {
    RA_RETURN_IF_ERROR(ValidateParams(p));
    return CudaReferenceForward(p, stream());
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionBackend>> MakeCudaBackend(std::string_view name) {
  if (name == kCudaName) return std::make_unique<FlashCudaBackend>();
  if (name == kCudaReferenceName) return std::make_unique<ReferenceCudaBackend>();
  return absl::InvalidArgumentError(absl::StrCat("unknown kernel backend '", std::string(name),
                                                 "'; expected one of cuda, cuda_reference"));
}

}  // namespace ringattn
