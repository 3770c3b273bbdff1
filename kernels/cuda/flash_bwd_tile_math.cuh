// The backward kernel's per-warp tile math: the two shapes of its per-warp products
// (MmaRowsByRows: S^T and dP^T, 16 rows of K or V against the block's Q or dO rows;
// MmaAccByRows: dV and dK, an accumulator-layout block, P^T or dS^T, times dO or Q) and the
// dS^T tile's addressing (DsOffset).
// Fragments follow the PTX ISA's m16n8k16 layouts (docs/kernels.md).
#pragma once

#include <cstdint>

#include "kernels/cuda/kernel_primitives.cuh"
#include "kernels/cuda/smem_tile.cuh"
#include "kernels/dtype.h"

namespace ringattn {
namespace flash_bwd {

// 16 keys x kBlockM queries: keys g, g + 8; queries 8 j + 2 t + {0, 1}.
template <typename Traits>
using SAcc = float[Traits::kNTilesS][4];
template <typename Traits>
using CAcc = float[Traits::kNTilesC][4];  // 16 keys x kCols columns

// acc (16 rows x kBlockM) = A B^T for the 16 rows of `smem_a` from row `a_row0` (K or V) and
// the kBlockM rows of `smem_b` (Q or dO), both [rows, kHeadDim] swizzled. The forward's MmaS
// with one row tile: A fragments by ldmatrix (lane l: row l % 16, chunk 2 kk + l / 16), B = rows
// of smem_b untransposed, two n8 tiles per ldmatrix.x4.
template <typename Traits, DType kDType>
__device__ __forceinline__ void MmaRowsByRows(SAcc<Traits>& acc, uint32_t smem_a, int a_row0,
                                              uint32_t smem_b, int lane) {
#pragma unroll
  for (int j = 0; j < Traits::kNTilesS; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  const uint32_t a_lane =
      flash::LaneBase(smem_a, a_row0 + (lane & 15), lane >> 4, Traits::kRowBytes);
  const uint32_t b_lane =
      flash::LaneBase(smem_b, ((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1, Traits::kRowBytes);
#pragma unroll
  for (int kk = 0; kk < Traits::kKStepsD; ++kk) {
    uint32_t a[4];
    flash::Ldmatrix4(a, a_lane ^ (32u * kk));
#pragma unroll
    for (int jp = 0; jp < Traits::kNTilesS / 2; ++jp) {
      uint32_t b[4];
      flash::Ldmatrix4(b, (b_lane ^ (32u * kk)) + jp * 16 * Traits::kRowBytes);
      flash::Mma16816<kDType>(acc[2 * jp], a, b[0], b[1]);
      flash::Mma16816<kDType>(acc[2 * jp + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 keys x the warp's kCols columns from col0) += X B, X = the 16 x kBlockM block in `x`
// (P^T or dS^T, accumulator layout, packed to 16 bits as A fragments: the forward's MmaPV),
// B = kBlockM rows of `smem_b` (dO or Q) read transposed (rows are the k dimension).
template <typename Traits, DType kDType>
__device__ __forceinline__ void MmaAccByRows(CAcc<Traits>& acc, const SAcc<Traits>& x,
                                             uint32_t smem_b, int col0, int lane) {
  using E = flash::Element<kDType>;
  const uint32_t b_lane =
      flash::LaneBase(smem_b, (((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4, Traits::kRowBytes);
  const int tp0 = col0 / 16;
#pragma unroll
  for (int kb = 0; kb < Traits::kKStepsM; ++kb) {
    uint32_t a[4];
    a[0] = E::Pack(x[2 * kb][0], x[2 * kb][1]);
    a[1] = E::Pack(x[2 * kb][2], x[2 * kb][3]);
    a[2] = E::Pack(x[2 * kb + 1][0], x[2 * kb + 1][1]);
    a[3] = E::Pack(x[2 * kb + 1][2], x[2 * kb + 1][3]);
#pragma unroll
    for (int tp = 0; tp < Traits::kNTilesC / 2; ++tp) {
      uint32_t b[4];
      flash::Ldmatrix4Trans(b, (b_lane ^ (32u * (tp0 + tp))) + kb * 16 * Traits::kRowBytes);
      flash::Mma16816<kDType>(acc[2 * tp], a, b[0], b[1]);
      flash::Mma16816<kDType>(acc[2 * tp + 1], a, b[2], b[3]);
    }
  }
}

// Byte offset of element (key, query) of the dS^T tile: [kBlockN keys, kBlockM queries], rows
// of 8 16-byte chunks, chunk c of row r at c ^ (r % 8) (bank-conflict-free for both the
// per-thread 4-byte stores and the transposed ldmatrix reads).
template <typename Traits>
__device__ __forceinline__ uint32_t DsOffset(int key, int chunk) {
  return static_cast<uint32_t>(key * Traits::kDsRowBytes + ((chunk ^ (key & 7)) << 4));
}

}  // namespace flash_bwd
}  // namespace ringattn
