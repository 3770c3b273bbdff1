// Host-side setup shared by the flash kernels' launches: a kernel's dynamic shared-memory
// opt-in, and what the device makes of one tiling (registers, spills, occupancy).
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/cuda/flash_fwd.h"

namespace ringattn {
namespace flash {

// Both take a kernel's Traits (flash_fwd_traits.h, flash_bwd_traits.h): kSmemBytes of dynamic
// shared memory and kThreads per CTA, kMinBlocksPerSm CTAs per SM planned.

// Raises `kernel`'s dynamic shared-memory limit to Traits::kSmemBytes (above 48 KB a kernel must
// opt in; per device, cheap to repeat) and, for tilings meant to run several CTAs per SM, asks
// for the largest shared-memory carveout so that they fit beside each other (a hint the driver
// may override; TilingResources reports the occupancy it gives).
template <typename Traits, typename KernelFn>
absl::Status PrepareSharedMemory(KernelFn* kernel) {
  RA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               Traits::kSmemBytes));
  if (Traits::kMinBlocksPerSm > 1) {
    RA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
  }
  return absl::OkStatus();
}

// What the device makes of a tiling's two kernels, `plain` and `mods` (with score mods):
// registers and local memory of each, CTAs per SM of the plain one.
template <typename Traits, typename KernelFn>
absl::StatusOr<FlashKernelResources> TilingResources(KernelFn* plain, KernelFn* mods) {
  FlashKernelResources r;
  r.smem_bytes = Traits::kSmemBytes;
  r.threads = Traits::kThreads;
  cudaFuncAttributes attributes;
  RA_RETURN_IF_ERROR(PrepareSharedMemory<Traits>(mods));
  RA_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attributes, mods));
  r.mods_registers = attributes.numRegs;
  r.mods_local_bytes = static_cast<int>(attributes.localSizeBytes);
  RA_RETURN_IF_ERROR(PrepareSharedMemory<Traits>(plain));
  RA_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attributes, plain));
  r.registers = attributes.numRegs;
  r.local_bytes = static_cast<int>(attributes.localSizeBytes);
  RA_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &r.ctas_per_sm, plain, Traits::kThreads, Traits::kSmemBytes));
  return r;
}

}  // namespace flash
}  // namespace ringattn
