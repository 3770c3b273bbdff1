#include "kernels/attention_backend.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace ringattn {

absl::Status AttentionBackend::DoForward(const AttentionParams& /*p*/,
                                         const ExecutionContext& /*ctx*/) {
  return absl::UnimplementedError(absl::StrCat("backend ", std::string(name()), " has no forward"));
}

absl::Status AttentionBackend::DoBackward(const AttentionBackwardParams& /*p*/,
                                          const ExecutionContext& /*ctx*/) {
  return absl::UnimplementedError(
      absl::StrCat("backend ", std::string(name()), " has no backward"));
}

absl::Status AttentionBackend::DoComputeDelta(const AttentionBackwardParams& /*p*/,
                                              float* /*delta*/, const ExecutionContext& /*ctx*/) {
  return absl::UnimplementedError(
      absl::StrCat("backend ", std::string(name()), " has no backward"));
}

}  // namespace ringattn
