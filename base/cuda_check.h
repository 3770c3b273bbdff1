// Checking CUDA runtime calls: every call and every kernel launch goes through one of these
// macros, which turn a cudaError_t into an absl::Status naming the call, the file and line, and
// cudaGetErrorName / cudaGetErrorString.
//
//   RA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(...));
//   kernel<<<grid, block, smem, stream>>>(params);
//   RA_CUDA_RETURN_IF_LAUNCH_ERROR();  // cudaGetLastError: bad configuration, missing image
//
// A launch error is reported at once; an error while the kernel runs is asynchronous and shows
// up at the next synchronising call, which is checked the same way.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ringattn {

// The status for a failed CUDA call `expr` at file:line. Allocation failures become
// RESOURCE_EXHAUSTED, a missing device or driver FAILED_PRECONDITION, anything else INTERNAL.
inline absl::Status CudaErrorStatus(cudaError_t error, const char* expr, const char* file,
                                    int line) {
  const std::string message =
      absl::StrCat(file, ":", line, ": ", expr, " failed: ", cudaGetErrorName(error), " (",
                   cudaGetErrorString(error), ")");
  switch (error) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace ringattn

#define RA_CUDA_RETURN_IF_ERROR(expr)                                                \
  do {                                                                               \
    const cudaError_t ra_cuda_error_ = (expr);                                       \
    if (ra_cuda_error_ != cudaSuccess) {                                             \
      return ::ringattn::CudaErrorStatus(ra_cuda_error_, #expr, __FILE__, __LINE__); \
    }                                                                                \
  } while (0)

// After a <<<...>>> launch: catches configuration and launch errors of that launch.
#define RA_CUDA_RETURN_IF_LAUNCH_ERROR() RA_CUDA_RETURN_IF_ERROR(cudaGetLastError())
