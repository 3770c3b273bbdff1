// The device executor's elementwise kernels on its fp32 accumulators (device_ring.h): fill,
// add, and round into the caller's dtype. Each enqueues on `stream` and returns launch errors;
// n == 0 enqueues nothing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace ringattn {

// x[i] = value for i < n.                                                  x: [n] fp32
absl::Status LaunchFillFloat(float* x, int64_t n, float value, cudaStream_t stream);

// into[i] += from[i] for i < n.                                into, from: [n] fp32
absl::Status LaunchAddFloat(float* into, const float* from, int64_t n, cudaStream_t stream);

// dst[i] = src[i] rounded to `dtype` (round to nearest even, as StoreFromFloat on the host; a
// copy for fp32).                                          src: [n] fp32, dst: [n] dtype
absl::Status LaunchConvertFromFloat(const float* src, void* dst, DType dtype, int64_t n,
                                    cudaStream_t stream);

}  // namespace ringattn
