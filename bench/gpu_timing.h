// Shared pieces of the GPU benchmarks (gpu_kernel_bench, gpu_ring_bench): exiting on a CUDA or
// status error, the median of timed calls, and the device they run on.
#ifndef RINGATTN_BENCH_GPU_TIMING_H_
#define RINGATTN_BENCH_GPU_TIMING_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/status/status.h"

// Exits with status 1, naming the call, the place and the CUDA error, when `expr` fails.
#define BENCH_CUDA_CHECK(expr)                                                        \
  do {                                                                                \
    const cudaError_t bench_error_ = (expr);                                          \
    if (bench_error_ != cudaSuccess) {                                                \
      std::fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", __FILE__, __LINE__, #expr,  \
                   cudaGetErrorName(bench_error_), cudaGetErrorString(bench_error_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

namespace ringattn::bench {

// Exits with status 1, naming `what`, when `s` is not OK.
inline void CheckStatus(const absl::Status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "%s failed: %s\n", what, s.ToString().c_str());
  std::exit(1);
}

// The median of `v` (the mean of the middle two for an even count).
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The properties of the current device, printed as "device: NAME (sm_XY, N SMs)". False, with
// "no CUDA device" on stderr, when there is none.
inline bool CurrentDevice(cudaDeviceProp* prop) {
  int device_count = 0;
  BENCH_CUDA_CHECK(cudaGetDeviceCount(&device_count));
  if (device_count == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return false;
  }
  int device = 0;
  BENCH_CUDA_CHECK(cudaGetDevice(&device));
  BENCH_CUDA_CHECK(cudaGetDeviceProperties(prop, device));
  std::printf("device: %s (sm_%d%d, %d SMs)\n", prop->name, prop->major, prop->minor,
              prop->multiProcessorCount);
  return true;
}

}  // namespace ringattn::bench

#endif  // RINGATTN_BENCH_GPU_TIMING_H_
