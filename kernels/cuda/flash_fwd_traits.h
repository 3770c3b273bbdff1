// The compile-time constants of one forward kernel instantiation: row kConfig of
// Tilings<kHeadDim> (flash_fwd_configs.h) and what follows from it, with the static checks that
// the tiling fits the kernel's fragment layouts and sm_90's shared memory. Plain C++.
#pragma once

#include "kernels/cuda/flash_fwd_configs.h"

namespace ringattn {
namespace flash_fwd {

// Shared memory: Q [kBlockM, kHeadDim] once, then K[kStages] and V[kStages], each
// [kBlockN, kHeadDim], swizzled (smem_tile.cuh).
template <int kHeadDim_, int kConfig_>
struct FlashFwdTraits {
  static constexpr Tiling kTiling = Tilings<kHeadDim_>::kList[kConfig_];
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConfig = kConfig_;
  static constexpr int kBlockM = kTiling.block_m;  // query rows per CTA
  static constexpr int kBlockN = kTiling.block_n;  // keys per pipeline step
  static constexpr int kWarps = kTiling.warps;
  static constexpr bool kQInRegs = kTiling.q_in_regs;  // Q's mma fragments in registers
  static constexpr int kStages = kTiling.stages;       // K/V buffers
  static constexpr int kMinBlocksPerSm = kTiling.min_ctas_per_sm;
  static constexpr bool kOneBarrier = kTiling.one_barrier;  // else v1's two per key block
  static constexpr bool kEx2Combine = kTiling.ex2_combine;  // CombineWith(Ex2Exp) vs Combine
  static constexpr bool kGlobalHeavyFirst = kTiling.global_heavy_first;  // grid order
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM / kWarps;  // query rows per warp
  static constexpr int kMTiles = kWarpRows / 16;      // m16n8k16 row tiles per warp
  static constexpr int kRows = 2 * kMTiles;           // query rows per thread
  static constexpr int kChunks = kHeadDim / 8;        // 16-byte chunks per row (8 elements)
  static constexpr int kRowBytes = kHeadDim * 2;

  static constexpr int kKStepsS = kHeadDim / 16;  // k16 steps of S = Q K^T
  static constexpr int kNTilesS = kBlockN / 8;    // n8 tiles of S: S regs = kMTiles kBlockN / 2
  static constexpr int kKStepsPV = kBlockN / 16;  // k16 steps of O += P V
  static constexpr int kNTilesO = kHeadDim / 8;   // n8 tiles of O: O regs = kMTiles kHeadDim / 2

  static constexpr int kQTileBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVTileBytes = kBlockN * kHeadDim * 2;
  static constexpr int kSmemBytes = kQTileBytes + 2 * kStages * kKVTileBytes;  // Q, K[], V[]

  static_assert(kHeadDim % 64 == 0, "the swizzle needs a multiple of 8 chunks per row");
  static_assert(kBlockM % kWarps == 0 && kWarpRows % 16 == 0, "whole m16 row tiles per warp");
  static_assert(kBlockN % 16 == 0 && kNTilesS % 2 == 0, "ldmatrix.x4 loads n8 tiles in pairs");
  static_assert(kNTilesO % 2 == 0, "ldmatrix.x4.trans loads O's n8 tiles in pairs");
  static_assert((kBlockM * kChunks) % kThreads == 0, "Q tile splits evenly over the threads");
  static_assert((kBlockN * kChunks) % kThreads == 0, "K/V tiles split evenly over the threads");
  static_assert(kStages >= 2, "the K/V pipeline needs at least two buffers");
  static_assert(kQTileBytes % 1024 == 0 && kKVTileBytes % 1024 == 0,
                "tiles start 1 KB aligned (LaneBase's XOR addressing)");
  static_assert(kOneBarrier || kStages == 2, "v1's two-barrier loop is a two-stage pipeline");
  // sm_90: 228 KB of shared memory per SM, at most 227 KB per CTA, 1 KB reserved per CTA.
  static_assert(kSmemBytes <= 227 * 1024, "exceeds sm_90's 227 KB of shared memory per CTA");
  static_assert(kMinBlocksPerSm * (kSmemBytes + 1024) <= 228 * 1024,
                "kMinBlocksPerSm CTAs of this tiling do not fit an SM's shared memory");
};

}  // namespace flash_fwd
}  // namespace ringattn
