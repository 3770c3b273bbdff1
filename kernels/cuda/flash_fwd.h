// Host entry points of the fast forward kernel (flash_fwd_kernel.cuh): FlashAttention-2's
// schedule on mma.sync tensor cores, compiled for sm_90a. Plain C++ (no device code), so that
// host-only files can call it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention_params.h"
#include "kernels/cuda/flash_instantiations.h"
#include "kernels/dtype.h"

namespace ringattn {

// Whether the fast kernel can compute `p` (already through ValidateParams): q/k/v in bf16 or
// fp16, head_dim 64, 128 or 256, 16-byte aligned q/k/v rows (pointers 16-byte aligned, strides
// multiples of 8 elements: the kernel copies 16-byte chunks), o pointer aligned to two elements
// and o strides even (it stores pairs), heads and batch <= 65535 (grid y and z). Each refusal is
// InvalidArgument naming the field.
absl::Status CheckFlashForwardSupport(const AttentionParams& p);

// One input tensor of the fast kernels (q, k, v, dout): a 16-byte aligned base (or null for an
// empty one) and batch/row/head strides that are multiples of 8 elements, so that every row of
// every head starts on a 16-byte boundary. InvalidArgument naming `name` otherwise.
absl::Status CheckFastKernelRows(const char* name, const void* ptr, int64_t batch_stride,
                                 int64_t row_stride, int64_t head_stride);

// Checks support, then enqueues the kernel on `stream` and returns; pointers are device memory.
// Writes o (p.o_dtype: fp32, fp16 or bf16) and lse (when non-null), or merges into fp32 o and
// lse with p.merge_into_output. Launch errors are returned; errors while the kernel runs surface
// at the caller's next synchronising call. Runs the default tiling of p.head_dim (the first of
// FlashForwardConfigs: the Hopper kernel at d 128, flash_fwd_hopper.h; it falls back to the
// table's default when the copy engine refuses an operand's layout), unless the environment
// variable RINGATTN_FLASH_FWD_CONFIG (read once) names another tiling (a table row or a Hopper
// variant): a test hook, so that the whole GPU test suite can run on each tiling.
// A name that only other head dims have leaves p.head_dim's default; a name this build does not
// compile for p.head_dim (see FlashForwardConfigs), or that no head dim has, is InvalidArgument.
// `skip_if_set`, when non-null, is the non-finite guard's device word (non_finite_guard.h): the
// kernel writes nothing when it is set. Without the guard, non-finite inputs (and scores beyond
// ~1e30) may give rows that the rule of reference_attention.h does not.
absl::Status FlashForward(const AttentionParams& p, cudaStream_t stream,
                          const uint32_t* skip_if_set = nullptr);

// A compiled tiling of the fast kernel (a row of flash_fwd_configs.h's table).
struct FlashForwardConfig {
  std::string name;  // unique per head dim; "v1" is the first version's tiling
  int head_dim = 0;
  int block_m = 0;        // query rows per CTA
  int block_n = 0;        // keys per pipeline step
  int warps = 0;          // per CTA
  int rows_per_warp = 0;  // 16 or 32 (one or two m16 tiles)
  bool q_in_regs = false;
  int stages = 0;           // K/V shared-memory buffers
  int min_ctas_per_sm = 0;  // asked of ptxas through __launch_bounds__
  bool one_barrier = false;
  bool ex2_combine = false;
  bool global_heavy_first = false;  // grid order: heaviest query blocks of all heads first
  bool is_default = false;          // what FlashForward runs for this head dim
  bool hopper = false;  // the Hopper kernel (flash_fwd_hopper.h); warps = its consumer warps
  // E.g. "M128 N64, 4 warps x 32 rows, Q smem, 2 stages, >=2 CTA/SM, 1 barrier, ex2 Combine,
  // global grid order".
  std::string Describe() const;
};

// Every tiling this build compiles for `head_dim` (both dtypes), the default first: the default
// alone, or every row of the table with the CMake option RINGATTN_CUDA_ALL_TILINGS. Empty for
// an unsupported head dim.
std::vector<FlashForwardConfig> FlashForwardConfigs(int head_dim);

// FlashForward with the tiling named `config` (one of FlashForwardConfigs(p.head_dim)), for
// tests and benchmarks. InvalidArgument for an unknown name, or for a tiling of the table that
// this build does not compile.
absl::Status FlashForwardWithConfig(const AttentionParams& p, std::string_view config,
                                    cudaStream_t stream);

// What the device makes of one compiled tiling: registers per thread and local memory (spills)
// from cudaFuncGetAttributes, resident CTAs per SM from the occupancy calculator. Each tiling is
// two kernels: the plain one, and one with score mods (softcap or ALiBi), mods_* below.
struct FlashKernelResources {
  int registers = 0;
  int local_bytes = 0;  // per thread; nonzero means spills or a stack array
  int mods_registers = 0;
  int mods_local_bytes = 0;
  int smem_bytes = 0;   // dynamic shared memory per CTA
  int threads = 0;      // per CTA
  int ctas_per_sm = 0;  // of the plain kernel
};
absl::StatusOr<FlashKernelResources> FlashForwardResources(int head_dim, DType dtype,
                                                           std::string_view config);

// One instantiation of the kernel per (head_dim, dtype), every compiled tiling of that head dim
// (index `config` into flash_fwd_configs.h's table); defined in flash_fwd_hdim*_*.cu (one file
// each, so that they build in parallel). FlashForward dispatches to them.
template <int kHeadDim, DType kDType>
absl::Status LaunchFlashForward(const AttentionParams& p, int config, const uint32_t* skip_if_set,
                                cudaStream_t stream);
template <int kHeadDim, DType kDType>
absl::StatusOr<FlashKernelResources> FlashForwardKernelResources(int config);

#define RA_FLASH_FWD_DECLARE(kHeadDim, kDType)                       \
  extern template absl::Status LaunchFlashForward<kHeadDim, kDType>( \
      const AttentionParams&, int, const uint32_t*, cudaStream_t);   \
  extern template absl::StatusOr<FlashKernelResources>               \
  FlashForwardKernelResources<kHeadDim, kDType>(int);
RA_FLASH_FOR_EACH_INSTANTIATION(RA_FLASH_FWD_DECLARE)
#undef RA_FLASH_FWD_DECLARE

}  // namespace ringattn
