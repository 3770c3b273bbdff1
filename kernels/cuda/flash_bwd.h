// Host entry points of the backward kernel (flash_bwd_kernel.cuh): FlashAttention-2's backward
// on mma.sync tensor cores, compiled for sm_90a. Plain C++, so that host-only files can call it.
#pragma once

#include <cuda_runtime_api.h>

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention_backward_params.h"
#include "kernels/cuda/flash_fwd.h"  // FlashKernelResources
#include "kernels/cuda/flash_instantiations.h"
#include "kernels/dtype.h"

namespace ringattn {

// Whether the kernel can compute `p` (already through ValidateBackwardParams): what the fast
// forward needs of q/k/v (CheckFlashForwardSupport, without o), out_dtype == fwd.dtype (dO is a
// tensor-core operand, O is read for D), dout with q's alignment rules, dq/dk/dv aligned to
// 8 bytes with even strides (they are written two floats at a time). InvalidArgument naming
// the field.
absl::Status CheckFlashBackwardSupport(const AttentionBackwardParams& p);

// Enqueues on `stream`: dq zeroed (unless p.accumulate), D = rowsum(dO * O) into `delta_scratch`
// when p.delta is null (the caller provides [batch, heads, seqlen_q] fp32 with lse's strides;
// unused when p.delta is set), then the kernel. Checks support first. Runs the default tiling of
// p.fwd.head_dim unless RINGATTN_FLASH_BWD_CONFIG names another (test hook), with
// FlashForward's rules for RINGATTN_FLASH_FWD_CONFIG.
absl::Status FlashBackward(const AttentionBackwardParams& p, float* delta_scratch,
                           cudaStream_t stream);
// FlashBackward for a single call: when p.delta is null, D goes into stream-ordered scratch
// from the device's memory pool (cudaMallocAsync / cudaFreeAsync on `stream`) spanning lse's
// view. (A ring computes D once per shard and passes it.)
absl::Status FlashBackwardAllocatingDelta(const AttentionBackwardParams& p, cudaStream_t stream);
// The same with the tiling named `config`, one of FlashBackwardConfigs (tests and benchmarks);
// InvalidArgument for an unknown name or a tiling this build does not compile.
absl::Status FlashBackwardWithConfig(const AttentionBackwardParams& p, float* delta_scratch,
                                     std::string_view config, cudaStream_t stream);

// D = rowsum(dout * out) in fp32 per (batch, head, query row) of p, into delta with p.lse's
// strides. One warp per row.
absl::Status LaunchComputeDelta(const AttentionBackwardParams& p, float* delta,
                                cudaStream_t stream);

// dq = 0 over p's view (batch, seqlen_q, heads, head_dim through dq's strides).
absl::Status LaunchZeroDq(const AttentionBackwardParams& p, cudaStream_t stream);

// The tilings this build compiles for one head dim (rows of flash_bwd_configs.h), the default
// first: the default alone, or every row with the CMake option RINGATTN_CUDA_ALL_TILINGS.
struct FlashBackwardConfig {
  std::string name;
  int head_dim = 0;
  int block_n = 0;
  int block_m = 0;
  int warps = 0;
  int d_split = 0;
  int min_ctas_per_sm = 0;
  bool head_major = false;  // grid order (flash_bwd_configs.h)
  bool is_default = false;
};
std::vector<FlashBackwardConfig> FlashBackwardConfigs(int head_dim);

// Registers, spills and occupancy of one tiling (plain kernel; mods_* with score mods): the
// forward's struct.
using FlashBackwardResources = FlashKernelResources;
absl::StatusOr<FlashBackwardResources> FlashBackwardKernelResources(int head_dim, DType dtype,
                                                                    std::string_view config);

// Instantiations, one file per (head_dim, dtype): flash_bwd_hdim*_*.cu.
template <int kHeadDim, DType kDType>
absl::Status LaunchFlashBackward(const AttentionBackwardParams& p, int config, cudaStream_t stream);
template <int kHeadDim, DType kDType>
absl::StatusOr<FlashBackwardResources> FlashBackwardResourcesOf(int config);

#define RA_FLASH_BWD_DECLARE(kHeadDim, kDType)                        \
  extern template absl::Status LaunchFlashBackward<kHeadDim, kDType>( \
      const AttentionBackwardParams&, int, cudaStream_t);             \
  extern template absl::StatusOr<FlashBackwardResources>              \
  FlashBackwardResourcesOf<kHeadDim, kDType>(int);
RA_FLASH_FOR_EACH_INSTANTIATION(RA_FLASH_BWD_DECLARE)
#undef RA_FLASH_BWD_DECLARE

}  // namespace ringattn
