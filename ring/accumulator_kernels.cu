#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "ring/accumulator_kernels.h"

namespace ringattn {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops: enough blocks to fill an H100 (132 SMs x 2048 threads) several times
// over; more only adds scheduling.
constexpr int64_t kMaxBlocks = 8192;

int BlocksFor(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
}

// ---- Kernels --------------------------------------------------------------------------------

__global__ void FillFloatKernel(float* __restrict__ x, int64_t n, float value) {  // x: [n]
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    x[i] = value;
  }
}

template <DType kOut>
__device__ __forceinline__ uint16_t To16(float x) {
  static_assert(kOut == DType::kBF16 || kOut == DType::kF16, "16-bit output types only");
  if constexpr (kOut == DType::kBF16) {
    return FloatToBf16(x);
  } else {
    return FloatToF16(x);
  }
}

// dst[i] = round(src[i]) for i < n, four elements per thread per iteration: one 16-byte load,
// one 8-byte store (the launcher checks the alignment), then the n % 4 tail one by one. The
// rounding is dtype.h's, the same code as the host executor's StoreFromFloat.
template <DType kOut>
__global__ void ConvertFromFloatKernel(const float* __restrict__ src,  // [n] fp32
                                       uint16_t* __restrict__ dst,     // [n] kOut
                                       int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t groups = n / 4;
  const auto* src4 = reinterpret_cast<const float4*>(src);
  auto* dst4 = reinterpret_cast<uint2*>(dst);
  for (int64_t g = first; g < groups; g += stride) {
    const float4 v = src4[g];
    uint2 packed;  // little-endian: element 4g in the low half of .x
    packed.x =
        static_cast<uint32_t>(To16<kOut>(v.x)) | (static_cast<uint32_t>(To16<kOut>(v.y)) << 16);
    packed.y =
        static_cast<uint32_t>(To16<kOut>(v.z)) | (static_cast<uint32_t>(To16<kOut>(v.w)) << 16);
    dst4[g] = packed;
  }
  for (int64_t i = groups * 4 + first; i < n; i += stride) dst[i] = To16<kOut>(src[i]);
}

// The same without alignment requirements, one element per thread per iteration.
template <DType kOut>
__global__ void ConvertFromFloatScalarKernel(const float* __restrict__ src,  // [n] fp32
                                             uint16_t* __restrict__ dst,     // [n] kOut
                                             int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    dst[i] = To16<kOut>(src[i]);
  }
}

template <DType kOut>
absl::Status LaunchConvert16(const float* src, void* dst, int64_t n, cudaStream_t stream) {
  auto* out = static_cast<uint16_t*>(dst);
  const bool aligned =
      reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 8 == 0;
  if (aligned) {
    ConvertFromFloatKernel<kOut>
        <<<BlocksFor(std::max<int64_t>(n / 4, 1)), kThreads, 0, stream>>>(src, out, n);
  } else {
    ConvertFromFloatScalarKernel<kOut><<<BlocksFor(n), kThreads, 0, stream>>>(src, out, n);
  }
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

// into[i] += from[i] for i < n, four floats per thread per iteration (16-byte loads and
// stores; the launcher checks the alignment), then the n % 4 tail one by one.
__global__ void AddFloatKernel(float* __restrict__ into,        // [n]
                               const float* __restrict__ from,  // [n]
                               int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t groups = n / 4;
  auto* into4 = reinterpret_cast<float4*>(into);
  const auto* from4 = reinterpret_cast<const float4*>(from);
  for (int64_t g = first; g < groups; g += stride) {
    float4 a = into4[g];
    const float4 b = from4[g];
    a.x += b.x;
    a.y += b.y;
    a.z += b.z;
    a.w += b.w;
    into4[g] = a;
  }
  for (int64_t i = groups * 4 + first; i < n; i += stride) into[i] += from[i];
}

// The same without alignment requirements, one float per thread per iteration.
__global__ void AddFloatScalarKernel(float* __restrict__ into,        // [n]
                                     const float* __restrict__ from,  // [n]
                                     int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    into[i] += from[i];
  }
}

}  // namespace

absl::Status LaunchFillFloat(float* x, int64_t n, float value, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  FillFloatKernel<<<BlocksFor(n), kThreads, 0, stream>>>(x, n, value);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchConvertFromFloat(const float* src, void* dst, DType dtype, int64_t n,
                                    cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  switch (dtype) {
    case DType::kF32:
      RA_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream));
      return absl::OkStatus();
    case DType::kBF16:
      return LaunchConvert16<DType::kBF16>(src, dst, n, stream);
    case DType::kF16:
      return LaunchConvert16<DType::kF16>(src, dst, n, stream);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("no conversion from fp32 to dtype ", static_cast<int>(dtype)));
}

absl::Status LaunchAddFloat(float* into, const float* from, int64_t n, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  const bool aligned =
      reinterpret_cast<uintptr_t>(into) % 16 == 0 && reinterpret_cast<uintptr_t>(from) % 16 == 0;
  if (aligned) {
    AddFloatKernel<<<BlocksFor(std::max<int64_t>(n / 4, 1)), kThreads, 0, stream>>>(into, from, n);
  } else {
    AddFloatScalarKernel<<<BlocksFor(n), kThreads, 0, stream>>>(into, from, n);
  }
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace ringattn
