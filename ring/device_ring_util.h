// Transitional names that ring/testing still uses: a fixed-size DeviceBuffer and the
// destructor-side error report. New code takes base/device_buffer.h directly.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdio>

#include "absl/status/status.h"
#include "base/device_buffer.h"

namespace ringattn::device_ring_internal {

// Prints "<owner>: <what> failed: <error>" on stderr unless e is cudaSuccess: for destructors,
// which cannot return a status.
inline void ReportIfError(const char* owner, cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  std::fprintf(stderr, "%s: %s failed: %s (%s)\n", owner, what, cudaGetErrorName(e),
               cudaGetErrorString(e));
}

// A DeviceBuffer allocated once, at its exact size (null for zero bytes).
class DeviceAllocation : public DeviceBuffer {
 public:
  absl::Status Allocate(size_t bytes) {
    if (get() != nullptr) return absl::FailedPreconditionError("DeviceAllocation: allocated twice");
    return Reserve(bytes);
  }
};

}  // namespace ringattn::device_ring_internal
