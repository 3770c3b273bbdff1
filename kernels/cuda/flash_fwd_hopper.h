// Host entry points of the Hopper forward kernel (flash_fwd_hopper_kernel.cuh): wgmma, TMA and
// warp specialisation, head dims 64 and 128, bf16 and fp16, every option of the mma.sync
// kernel. FlashForward (flash_fwd.h) dispatches to it as the tiling named kHopperForwardConfig.
// Plain C++ (no device code).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention_params.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/dtype.h"

namespace ringattn {

// The Hopper kernel's variants, rows of FlashForwardConfigs after the mma.sync table's: 2
// consumer warpgroups of 64 rows, 128 keys per step; "_ovl" with intra-warpgroup overlap,
// "_pp" with that and the consumers' ping-pong (HopperFwdTraits' kSchedule 0, 1, 2).
struct HopperForwardVariant {
  const char* name;
  int schedule;
};
inline constexpr HopperForwardVariant kHopperForwardVariants[] = {
    {"wgmma_2x64_n128", 0},
    {"wgmma_2x64_n128_ovl", 1},
    {"wgmma_2x64_n128_pp", 2},
};
inline constexpr char kHopperForwardConfig[] = "wgmma_2x64_n128";  // variant 0's name

// Whether FlashForward runs the Hopper kernel (variant kHopperForwardDefaultVariant) for
// `head_dim`, unless RINGATTN_FLASH_FWD_CONFIG names a table tiling: where it is the faster
// (d 128; at d 64 the mma.sync kernel is level with it: docs/performance.md).
constexpr bool HopperForwardIsDefault(int head_dim) { return head_dim == 128; }
inline constexpr int kHopperForwardDefaultVariant = 0;

// Index into kHopperForwardVariants of `name`; -1 for none.
int HopperForwardVariantIndex(std::string_view name);

// Whether this build has the Hopper kernel for `head_dim`.
bool HopperForwardHasHeadDim(int head_dim);

// Enqueues the Hopper kernel; `p` has passed CheckFlashForwardSupport and its head dim is one
// HopperForwardHasHeadDim accepts. Encodes the three TMA maps first: an operand layout that the
// copy engine refuses is InvalidArgument naming it (FlashForward then runs the mma.sync
// kernel). Otherwise as FlashForward.
absl::Status LaunchFlashForwardHopper(const AttentionParams& p, int variant,
                                      const uint32_t* skip_if_set, cudaStream_t stream);

// FlashForwardResources for the Hopper kernel.
absl::StatusOr<FlashKernelResources> FlashForwardHopperResources(int head_dim, DType dtype,
                                                                 int variant);

}  // namespace ringattn
