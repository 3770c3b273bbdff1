// Device-side pieces shared by the GPU benchmarks (gpu_kernel_bench, gpu_backward_bench,
// gpu_ring_bench): inputs filled on the device, a scoped allocation, one timed call, the
// params of a self-attention shape. CUDA
// sources only (it holds a kernel); one benchmark translation unit each, so the definitions
// below live in that unit's anonymous namespace.
#ifndef RINGATTN_BENCH_GPU_BENCH_UTIL_CUH_
#define RINGATTN_BENCH_GPU_BENCH_UTIL_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "bench/gpu_timing.h"
#include "kernels/attention_params.h"
#include "kernels/params_check.h"

namespace ringattn::bench {
namespace {

// Uniform values in [-sqrt(3), sqrt(3)] (unit variance) from a hash of the index: inputs need
// no host round trip at these sizes.
__global__ void FillUniformBf16(__nv_bfloat16* x, int64_t n, uint32_t seed) {  // x: [n]
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9e3779b9u ^ static_cast<uint32_t>(i >> 32) ^ seed;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    const float u = static_cast<float>(h >> 8) * (1.0f / 16777216.0f);  // [0, 1)
    x[i] = __float2bfloat16((2.0f * u - 1.0f) * 1.7320508f);
  }
}

// x[0, n) bf16 <- FillUniformBf16 with `seed`, on `stream`.
void FillBf16(void* x, int64_t n, uint32_t seed, cudaStream_t stream) {
  if (n == 0) return;
  FillUniformBf16<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(x), n, seed);
  BENCH_CUDA_CHECK(cudaGetLastError());
}

// One device allocation, freed on scope exit; null for zero bytes.
struct DeviceMemory {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceMemory(size_t n) : bytes(n) {
    if (n > 0) BENCH_CUDA_CHECK(cudaMalloc(&ptr, n));
  }
  ~DeviceMemory() {
    if (ptr != nullptr) BENCH_CUDA_CHECK(cudaFree(ptr));
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
};

// Milliseconds of one call of `run` on `stream`, timed alone between two events.
template <typename Run>
double TimeOnce(const Run& run, cudaStream_t stream, cudaEvent_t start, cudaEvent_t stop) {
  BENCH_CUDA_CHECK(cudaEventRecord(start, stream));
  run();
  BENCH_CUDA_CHECK(cudaEventRecord(stop, stream));
  BENCH_CUDA_CHECK(cudaEventSynchronize(stop));
  float elapsed = 0.0f;
  BENCH_CUDA_CHECK(cudaEventElapsedTime(&elapsed, start, stop));
  return elapsed;
}

// Self-attention over [batch, seqlen, heads, head_dim] bf16 tensors, contiguous, bf16 output,
// softmax scale 1 / sqrt(head_dim); tensor pointers left null.
AttentionParams SelfAttentionParams(int batch, int64_t seqlen, int heads, int head_dim,
                                    bool causal) {
  AttentionParams p;
  p.batch = batch;
  p.seqlen_q = p.seqlen_k = seqlen;
  p.heads = p.heads_k = heads;
  p.head_dim = head_dim;
  p.dtype = p.o_dtype = DType::kBF16;
  p.causal = causal;
  p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  SetContiguousStrides(&p);
  return p;
}

}  // namespace
}  // namespace ringattn::bench

#endif  // RINGATTN_BENCH_GPU_BENCH_UTIL_CUH_
