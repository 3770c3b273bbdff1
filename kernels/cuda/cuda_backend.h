// The CUDA kernel backends behind AttentionBackend:
//   "cuda"            the fast kernel (flash_fwd.h): bf16/fp16 inputs, head_dim 64/128/256;
//                     anything else is InvalidArgument (no silent fallback);
//   "cuda_reference"  the simple kernel (reference_attention.h): any dtype, slow.
// Both take device pointers (MemorySpace::kDevice) and run on the backend's stream.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "kernels/attention_backend.h"

namespace ringattn {

// Forward validates `p` (ValidateParams, then the kernel's own limits), enqueues the kernel on
// stream() and returns without synchronising: the results are ready when the stream reaches
// that point. Launch errors are returned; errors while the kernel runs surface at the caller's
// next synchronising call on the stream.
class CudaBackend : public AttentionBackend {
 public:
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }

  // The stream Forward enqueues on; nullptr (the default) is the legacy default stream. The
  // backend does not own it. The ring sets its compute stream here.
  void SetStream(cudaStream_t stream) { stream_ = stream; }
  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// "cuda" or "cuda_reference"; other names give InvalidArgument listing these. The result is a
// CudaBackend (see AsCudaBackend).
absl::StatusOr<std::unique_ptr<AttentionBackend>> MakeCudaBackend(std::string_view name);

// `backend` as a CudaBackend (to set its stream), or nullptr when it is not one.
inline CudaBackend* AsCudaBackend(AttentionBackend* backend) {
  return dynamic_cast<CudaBackend*>(backend);
}

}  // namespace ringattn
