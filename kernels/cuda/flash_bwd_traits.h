// The compile-time constants of one backward kernel instantiation: row kConfig of
// Tilings<kHeadDim> (flash_bwd_configs.h) and what follows from it, with the static checks that
// the tiling fits the kernel's fragment layouts and sm_90's shared memory. Plain C++.
#pragma once

#include "kernels/cuda/flash_bwd_configs.h"

namespace ringattn {
namespace flash_bwd {

// Shared memory: K and V [kBlockN, kHeadDim], Q and dO [2][kBlockM, kHeadDim] (double
// buffered), dS^T [kBlockN, kBlockM], lse and D [2][kBlockM] fp32; tiles swizzled
// (smem_tile.cuh, DsOffset).
template <int kHeadDim_, int kConfig_>
struct FlashBwdTraits {
  static constexpr Tiling kTiling = Tilings<kHeadDim_>::kList[kConfig_];
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kTiling.block_n;  // keys per CTA
  static constexpr int kBlockM = kTiling.block_m;  // query rows per step
  static constexpr int kWarps = kTiling.warps;
  static constexpr int kDSplit = kTiling.d_split;
  static constexpr int kMinBlocksPerSm = kTiling.min_ctas_per_sm;
  static constexpr bool kHeadMajor = kTiling.head_major;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kKeyGroups = kWarps / kDSplit;  // 16 keys each
  static constexpr int kChunks = kHeadDim / 8;         // 16-byte chunks per Q/K/V/dO row
  static constexpr int kRowBytes = kHeadDim * 2;

  static constexpr int kNTilesS = kBlockM / 8;      // n8 tiles of S^T, dP^T (queries)
  static constexpr int kKStepsD = kHeadDim / 16;    // k16 steps over head_dim (S^T, dP^T)
  static constexpr int kKStepsM = kBlockM / 16;     // k16 steps over queries (dV, dK)
  static constexpr int kCols = kHeadDim / kDSplit;  // dK/dV columns per warp
  static constexpr int kNTilesC = kCols / 8;
  static constexpr int kKStepsN = kBlockN / 16;    // k16 steps over keys (dQ)
  static constexpr int kDqChunks = kHeadDim / 32;  // dQ work: 16 rows x 32 columns per item
  static constexpr int kDqItems = (kBlockM / 16) * kDqChunks;
  static constexpr int kDsRowBytes = kBlockM * 2;

  static constexpr int kKVTileBytes = kBlockN * kRowBytes;
  static constexpr int kQTileBytes = kBlockM * kRowBytes;
  static constexpr int kDsBytes = kBlockN * kDsRowBytes;
  static constexpr int kVecBytes = kBlockM * 4;  // lse or D of one step, fp32
  // K, V, Q[2], dO[2], dS^T, lse[2], D[2].
  static constexpr int kSmemBytes = 2 * kKVTileBytes + 4 * kQTileBytes + kDsBytes + 4 * kVecBytes;

  static_assert(kHeadDim % 64 == 0, "the swizzle needs a multiple of 8 chunks per row");
  static_assert(kKeyGroups * 16 == kBlockN, "16 keys per key group");
  static_assert(kWarps % kDSplit == 0 && kNTilesC % 2 == 0, "whole n8 pairs of dK/dV per warp");
  static_assert(kBlockM == 64, "dS^T rows are 8 swizzled 16-byte chunks");
  static_assert(kThreads >= kBlockM, "one thread per query row loads lse and D");
  static_assert(kSmemBytes <= 227 * 1024, "exceeds sm_90's 227 KB of shared memory per CTA");
};

}  // namespace flash_bwd
}  // namespace ringattn
