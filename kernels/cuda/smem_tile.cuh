// Shared-memory tiles of the flash kernels: [rows, head_dim] blocks of 2-byte elements stored
// as rows of 16-byte chunks, XOR-swizzled (chunk c of row r at position c ^ (r % 8)) so that the
// 8 row addresses of every ldmatrix phase and the chunks of every cp.async row fall in distinct
// banks. Tiles start at multiples of 1 KB (the kernels align their dynamic shared memory and
// size tiles in whole KB), which LaneBase's addressing relies on.
#pragma once

#include <cstdint>

#include "kernels/cuda/kernel_primitives.cuh"

namespace ringattn {
namespace flash {

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of kChunks chunks per
// row. The XOR changes only the low 3 bits of the chunk, so it stays within its row.
template <int kChunks>
__device__ __forceinline__ uint32_t SwizzledOffset(int row, int chunk) {
  return static_cast<uint32_t>(row * kChunks + (chunk ^ (row & 7))) * 16u;
}

// Starts copying rows [row0, row0 + kRows) of a [num_rows, kHeadDim] global matrix (rows
// `row_stride` elements apart, 16-byte aligned; row0 < num_rows) into the swizzled tile at
// `tile` with Traits::kThreads threads (this one `tid`), kChunks chunks and kRowBytes bytes per
// row. Rows at or past num_rows are zero-filled, so that padding keys score 0 (then masked)
// and contribute 0 * V = 0 rather than stale NaN bits. Commits nothing: the caller groups the
// copies (CpAsyncCommit).
template <typename Traits, int kRows, typename T>
__device__ __forceinline__ void LoadTile(uint32_t tile, const T* gmem, int64_t row_stride,
                                         int64_t row0, int64_t num_rows, int tid) {
  // Thread tid copies chunks tid, tid + kThreads, ...: consecutive threads read consecutive 16
  // bytes of a row, and a thread's chunks are kRowStep rows apart in one column, so that one
  // source pointer and one swizzled offset address them all (docs/kernels.md, "Registers").
  constexpr int kChunks = Traits::kChunks;
  constexpr int kRowStep = Traits::kThreads / kChunks;  // rows between a thread's chunks
  constexpr int kPerThread = kRows / kRowStep;
  static_assert(Traits::kThreads % kChunks == 0 && kRows % kRowStep == 0,
                "a tile splits into whole rows per pass of the threads");
  static_assert(kRowStep % 8 == 0, "a thread's chunks share one swizzle term");
  const int r0 = tid / kChunks;
  const int chunk = tid % kChunks;
  // Rows of the thread's column that exist, counted from r0 (compared with constants below).
  const int rows_left = static_cast<int>(Min64(num_rows - row0, kRows)) - r0;
  const T* src = gmem + (row0 + r0) * row_stride + chunk * 8;
  const int64_t step = kRowStep * row_stride;
  const uint32_t dst = tile + SwizzledOffset<kChunks>(r0, chunk);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const bool fill = i * kRowStep < rows_left;
    // A row past the end reads nothing (src-size 0); any valid address will do.
    CpAsync16(dst + i * kRowStep * Traits::kRowBytes, fill ? src : gmem, fill);
    src += step;
  }
}

// A lane's ldmatrix address of chunk `half` (0 or 1) of row `row` in the tile at `tile` (rows
// `row_bytes` apart). A lane always addresses rows whose index is its own plus a multiple of 8,
// so its swizzle term is fixed: chunk pair i of such a row is at LaneBase(...) ^ (32 i), and
// rows 16 m further at + 16 m row_bytes (one LOP3 per k-step; docs/kernels.md, "Addressing").
__device__ __forceinline__ uint32_t LaneBase(uint32_t tile, int row, int half, int row_bytes) {
  return tile + static_cast<uint32_t>(row * row_bytes + (half ^ (row & 7)) * 16);
}

}  // namespace flash
}  // namespace ringattn
