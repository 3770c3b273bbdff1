// The CUDA kernel backends, in device memory (MemorySpace::kDevice), registered by name:
//   "cuda"            our kernels: the forward (flash_fwd.h) and the backward (flash_bwd.h,
//                     FlashAttention-2's on mma.sync tensor cores); bf16/fp16 inputs, head_dim
//                     64/128/256, every score option (causal and window masks on global
//                     positions, ALiBi, softcap, GQA), two runs of positions, a partial input;
//                     anything else is InvalidArgument (no silent fallback). The forward runs
//                     behind the non-finite guard (non_finite_guard.h): calls holding NaN,
//                     infinities or huge values are computed by the simple kernel;
//   "cuda_reference"  the simple forward kernel (reference_attention.h): any dtype, slow; no
//                     backward.
// Calls validate `p`, enqueue on the context's stream and return without synchronising.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/attention_backend.h"

namespace ringattn {

// What every device backend shares: device memory, and the stream of a call's context.
class CudaBackend : public AttentionBackend {
 public:
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }

 protected:
  // ctx's stream; nullptr (no stream given) is the legacy default stream.
  static cudaStream_t StreamOf(const ExecutionContext& ctx) {
    return static_cast<cudaStream_t>(ctx.stream);
  }
};

}  // namespace ringattn
