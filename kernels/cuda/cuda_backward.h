// The device attention backward backends behind AttentionBackwardBackend:
//   "cuda"   our kernel (flash_bwd.h): FlashAttention-2's backward on mma.sync tensor cores;
//            bf16/fp16 inputs, head_dim 64/128/256, every option of the forward (causal and
//            window masks on global positions, ALiBi, softcap, GQA); fp32 gradients;
//   "cudnn"  cuDNN's fused backward (kernels/cudnn/cudnn_backward.h), a subclass of this one.
// Both take device pointers (MemorySpace::kDevice), enqueue on the backend's stream and return
// without synchronising.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>

#include "kernels/attention_backward_params.h"

namespace ringattn {

class CudaBackwardBackend : public AttentionBackwardBackend {
 public:
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }
  // The stream Backward and ComputeDelta enqueue on; nullptr (the default) is the legacy
  // default stream. Not owned. The device ring sets its compute stream here.
  void SetStream(cudaStream_t stream) { stream_ = stream; }
  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// Named "cuda". Creating it touches no device.
std::unique_ptr<AttentionBackwardBackend> MakeCudaBackwardBackend();

// `b` as a CudaBackwardBackend (to set its stream), or nullptr when it is not one.
inline CudaBackwardBackend* AsCudaBackwardBackend(AttentionBackwardBackend* b) {
  return dynamic_cast<CudaBackwardBackend*>(b);
}

}  // namespace ringattn
