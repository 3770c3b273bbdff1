// The CUDA kernel backends, in device memory (MemorySpace::kDevice), registered by name:
//   "cuda"            our kernels: the forward (flash_fwd.h) and the backward (flash_bwd.h,
//                     FlashAttention-2's on mma.sync tensor cores); bf16/fp16 inputs, head_dim
//                     64/128/256, every score option (causal and window masks on global
//                     positions, ALiBi, softcap, GQA), two runs of positions, a partial input;
//                     anything else is InvalidArgument (no silent fallback);
//   "cuda_reference"  the simple forward kernel (reference_attention.h): any dtype, slow; no
//                     backward.
// Calls validate `p`, enqueue on the context's stream (or stream() when the context has none)
// and return without synchronising.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "kernels/attention_backend.h"

namespace ringattn {

// What every device backend shares: device memory and the stream a call without one in its
// ExecutionContext runs on.
class CudaBackend : public AttentionBackend {
 public:
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }

  // The stream of calls whose context has none; nullptr (the default) is the legacy default
  // stream. Not owned.
  void SetStream(cudaStream_t stream) { stream_ = stream; }
  cudaStream_t stream() const { return stream_; }

 protected:
  // ctx's stream, or stream() when it has none.
  cudaStream_t StreamOf(const ExecutionContext& ctx) const {
    return ctx.stream != nullptr ? static_cast<cudaStream_t>(ctx.stream) : stream_;
  }

 private:
  cudaStream_t stream_ = nullptr;
};

// `backend` as a CudaBackend (to set its stream), or nullptr when it is not one.
inline CudaBackend* AsCudaBackend(AttentionBackend* backend) {
  return dynamic_cast<CudaBackend*>(backend);
}

// ---- Transitional (issue #12): the former factories and backward names ----------------------
// "cuda" or "cuda_reference"; InvalidArgument for another name.
absl::StatusOr<std::unique_ptr<AttentionBackend>> MakeCudaBackend(std::string_view name);
// "cuda".
std::unique_ptr<AttentionBackend> MakeCudaBackwardBackend();
using CudaBackwardBackend = CudaBackend;
inline CudaBackend* AsCudaBackwardBackend(AttentionBackend* backend) {
  return AsCudaBackend(backend);
}

}  // namespace ringattn
