// Building blocks shared by the fast CPU kernels (flash_cpu.cc forward, flash_cpu_backward.cc
// backward): row conversions between the storage dtypes and fp32, the register-blocked
// product of fp32 tiles, and the thread pool that hands out work items.
//
// Everything here is inline or a template, so each kernel's translation unit compiles it with
// its own flags (-O3 -march=x86-64-v2); none of it is part of the public kernel API.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "kernels/cpu/flash_cpu.h"  // F16ToFloatBranchless
#include "kernels/dtype.h"

namespace ringattn::cpu_tiles {

constexpr int kMicroRows = 4;  // micro-kernel tile height (rows of the left operand)
constexpr int kMicroCols = 8;  // micro-kernel tile width: 8 floats = 2 SSE vectors
// With 4 x 8 accumulators (8 vectors) plus operands the tile fits the 16 SSE registers.

inline int64_t RoundUp(int64_t x, int64_t multiple) {
  return (x + multiple - 1) / multiple * multiple;
}

// ---- Conversions ----------------------------------------------------------------------------
// The dtype switch sits outside the loops so that each case is a plain loop.

// Reads n contiguous elements of type `dtype` starting at element `offset` of `base`.
inline void LoadRowAsFloat(const void* base, int64_t offset, DType dtype, int n,
                           float* out) {  // out: [n]
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out, static_cast<const float*>(base) + offset, n * sizeof(float));
      return;
    case DType::kF16: {
      const uint16_t* in = static_cast<const uint16_t*>(base) + offset;
      for (int i = 0; i < n; ++i) out[i] = F16ToFloatBranchless(in[i]);
      return;
    }
    case DType::kBF16: {
      const uint16_t* in = static_cast<const uint16_t*>(base) + offset;
      for (int i = 0; i < n; ++i) out[i] = Bf16ToFloat(in[i]);
      return;
    }
  }
}

// Writes n floats as contiguous elements of type `dtype` starting at element `offset`.
inline void StoreRowFromFloat(const float* in,  // [n]
                              void* base, int64_t offset, DType dtype, int n) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(static_cast<float*>(base) + offset, in, n * sizeof(float));
      return;
    case DType::kF16: {
      uint16_t* out = static_cast<uint16_t*>(base) + offset;
      for (int i = 0; i < n; ++i) out[i] = FloatToF16(in[i]);
      return;
    }
    case DType::kBF16: {
      uint16_t* out = static_cast<uint16_t*>(base) + offset;
      for (int i = 0; i < n; ++i) out[i] = FloatToBf16(in[i]);
      return;
    }
  }
}

// ---- Products -------------------------------------------------------------------------------

// One register tile of c (+)= a * b over kDepth terms:
//   a: [kMicroRows, kDepth], row stride lda
//   b: [kDepth, kMicroCols], row stride ldb
//   c: [kMicroRows, kMicroCols], row stride ldc
// The accumulators start at zero and stay in registers across the depth loop; the innermost
// loop is over the contiguous columns of b (one broadcast of a times a vector of b). With
// kAccumulate the tile's sum is added to c at the end. Both the compile-time depth and the
// zero start matter: with a run-time depth, or accumulators loaded from c, GCC 12 vectorised
// only some of the rows (and a 2 x 16 tile none of them: 4 x 8 is the shape it handles).
// Measured single-threaded at head_dim 64: 16 GFLOP/s before, 24 after these two changes.
// Every element of c sums its terms in a fixed order (t = 0, 1, ...), whoever calls it.
template <int kDepth, bool kAccumulate>
inline void MicroKernel(const float* __restrict a, int64_t lda, const float* __restrict b,
                        int64_t ldb, float* __restrict c, int64_t ldc) {
  float acc[kMicroRows][kMicroCols] = {};
  for (int t = 0; t < kDepth; ++t) {
    const float* b_row = b + t * ldb;
    for (int r = 0; r < kMicroRows; ++r) {
      const float a_rt = a[r * lda + t];
      for (int col = 0; col < kMicroCols; ++col) acc[r][col] += a_rt * b_row[col];
    }
  }
  for (int r = 0; r < kMicroRows; ++r) {
    for (int col = 0; col < kMicroCols; ++col) {
      c[r * ldc + col] = kAccumulate ? c[r * ldc + col] + acc[r][col] : acc[r][col];
    }
  }
}

// c (+)= a * b for whole tiles; rows a multiple of kMicroRows, cols of kMicroCols.
//   a: [rows, kDepth], b: [kDepth, cols], c: [rows, cols], with the given row strides.
template <int kDepth, bool kAccumulate>
void MultiplyTilesSse(const float* a, int64_t lda, const float* b, int64_t ldb, int rows,
                      int cols, float* c, int64_t ldc) {
  for (int i = 0; i < rows; i += kMicroRows) {
    for (int j = 0; j < cols; j += kMicroCols) {
      MicroKernel<kDepth, kAccumulate>(a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc);
    }
  }
}

#if defined(__x86_64__)
// Whether this machine has AVX2 and FMA (read once).
inline bool HasAvx2Fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// MultiplyTilesSse with AVX2 and FMA: a tile row is one 8-float vector, each term one broadcast
// and one fused multiply-add (written with intrinsics: GCC's own AVX2 code for MicroKernel
// spilled its accumulators and ran ten times slower). Fused multiply-adds round once per term,
// so the sums differ from MultiplyTilesSse's in their last bits; a process uses one of the two
// throughout (MultiplyTiles), and each element still sums its terms in order t = 0, 1, ...
template <int kDepth, bool kAccumulate>
__attribute__((target("avx2,fma"))) void MultiplyTilesAvx2(const float* a, int64_t lda,
                                                           const float* b, int64_t ldb, int rows,
                                                           int cols, float* c, int64_t ldc) {
  static_assert(kMicroRows == 4 && kMicroCols == 8, "one 8-float vector per tile row");
  for (int i = 0; i < rows; i += kMicroRows) {
    const float* a0 = a + i * lda;
    int j = 0;
    // Two vectors per tile row where the columns allow: 8 accumulators, more terms per load.
    for (; j + 2 * kMicroCols <= cols; j += 2 * kMicroCols) {
      __m256 acc[kMicroRows][2];
      for (int r = 0; r < kMicroRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      const float* bj = b + j;
      for (int t = 0; t < kDepth; ++t) {
        const __m256 b0 = _mm256_loadu_ps(bj + t * ldb);
        const __m256 b1 = _mm256_loadu_ps(bj + t * ldb + kMicroCols);
        for (int r = 0; r < kMicroRows; ++r) {
          const __m256 ar = _mm256_broadcast_ss(a0 + r * lda + t);
          acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
        }
      }
      for (int r = 0; r < kMicroRows; ++r) {
        for (int h = 0; h < 2; ++h) {
          float* cr = c + (i + r) * ldc + j + h * kMicroCols;
          _mm256_storeu_ps(cr, kAccumulate ? _mm256_add_ps(_mm256_loadu_ps(cr), acc[r][h])
                                           : acc[r][h]);
        }
      }
    }
    for (; j < cols; j += kMicroCols) {
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
      const float* bj = b + j;
      for (int t = 0; t < kDepth; ++t) {
        const __m256 bt = _mm256_loadu_ps(bj + t * ldb);
        acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(a0 + t), bt, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(a0 + lda + t), bt, acc1);
        acc2 = _mm256_fmadd_ps(_mm256_broadcast_ss(a0 + 2 * lda + t), bt, acc2);
        acc3 = _mm256_fmadd_ps(_mm256_broadcast_ss(a0 + 3 * lda + t), bt, acc3);
      }
      float* cj = c + i * ldc + j;
      const __m256 accs[kMicroRows] = {acc0, acc1, acc2, acc3};
      for (int r = 0; r < kMicroRows; ++r) {
        float* cr = cj + r * ldc;
        _mm256_storeu_ps(cr, kAccumulate ? _mm256_add_ps(_mm256_loadu_ps(cr), accs[r]) : accs[r]);
      }
    }
  }
}
#endif

#if defined(__x86_64__)
// Whether this machine has AVX-512F (read once).
inline bool HasAvx512() {
  static const bool has = HasAvx2Fma() && __builtin_cpu_supports("avx512f");
  return has;
}

// MultiplyTilesAvx2 with AVX-512: a tile row is up to four 16-float vectors (16 accumulators
// for 4 x 64), so that each broadcast of a feeds four fused multiply-adds. Every element sums
// its terms in the same order with the same fused operations as MultiplyTilesAvx2, so the two
// give identical bits; columns left over below 16 go through MultiplyTilesAvx2.
template <int kDepth, bool kAccumulate>
__attribute__((target("avx512f,avx2,fma"))) void MultiplyTilesAvx512(
    const float* a, int64_t lda, const float* b, int64_t ldb, int rows, int cols, float* c,
    int64_t ldc) {
  static_assert(kMicroRows == 4, "four rows per tile");
  constexpr int kV = 16;  // floats per vector
  int wide = 0;           // columns done here: whole 16-float vectors
  for (int i = 0; i < rows; i += kMicroRows) {
    const float* a0 = a + i * lda;
    int j = 0;
    for (; j + 4 * kV <= cols; j += 4 * kV) {
      __m512 acc[kMicroRows][4];
      for (int r = 0; r < kMicroRows; ++r) {
        for (int h = 0; h < 4; ++h) acc[r][h] = _mm512_setzero_ps();
      }
      const float* bj = b + j;
      for (int t = 0; t < kDepth; ++t) {
        __m512 bt[4];
        for (int h = 0; h < 4; ++h) bt[h] = _mm512_loadu_ps(bj + t * ldb + h * kV);
        for (int r = 0; r < kMicroRows; ++r) {
          const __m512 ar = _mm512_set1_ps(a0[r * lda + t]);
          for (int h = 0; h < 4; ++h) acc[r][h] = _mm512_fmadd_ps(ar, bt[h], acc[r][h]);
        }
      }
      for (int r = 0; r < kMicroRows; ++r) {
        for (int h = 0; h < 4; ++h) {
          float* cr = c + (i + r) * ldc + j + h * kV;
          _mm512_storeu_ps(cr, kAccumulate ? _mm512_add_ps(_mm512_loadu_ps(cr), acc[r][h])
                                           : acc[r][h]);
        }
      }
    }
    for (; j + kV <= cols; j += kV) {
      __m512 acc[kMicroRows];
      for (int r = 0; r < kMicroRows; ++r) acc[r] = _mm512_setzero_ps();
      const float* bj = b + j;
      for (int t = 0; t < kDepth; ++t) {
        const __m512 bt = _mm512_loadu_ps(bj + t * ldb);
        for (int r = 0; r < kMicroRows; ++r) {
          acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a0[r * lda + t]), bt, acc[r]);
        }
      }
      for (int r = 0; r < kMicroRows; ++r) {
        float* cr = c + (i + r) * ldc + j;
        _mm512_storeu_ps(cr, kAccumulate ? _mm512_add_ps(_mm512_loadu_ps(cr), acc[r]) : acc[r]);
      }
    }
    wide = j;
  }
  if (wide < cols) {  // the same columns in every row tile: one 8-wide strip left
    MultiplyTilesAvx2<kDepth, kAccumulate>(a, lda, b + wide, ldb, rows, cols - wide, c + wide,
                                           ldc);
  }
}

__attribute__((target("fma"))) inline float DotFma(const float* x, const float* y, int n) {
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum = __builtin_fmaf(x[i], y[i], sum);
  return sum;
}
#endif

// sum_i x[i] * y[i] in order i = 0, 1, ..., rounded as MultiplyTiles rounds each element of c
// (fused where it fuses): a dot product that must equal an element of a tile product bit for
// bit when the operands do (the backward's D = rowsum(dO o O) against dP = dO V^T: with one
// visible key O = V, and dP - D must be exactly 0).
inline float DotLikeTiles(const float* x, const float* y, int n) {
#if defined(__x86_64__)
  if (HasAvx2Fma()) return DotFma(x, y, n);
#endif
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += x[i] * y[i];
  return sum;
}

// c (+)= a * b for whole tiles (as MultiplyTilesSse): with AVX-512, or AVX2 and FMA (the same
// bits), where the machine has them, else SSE.
template <int kDepth, bool kAccumulate>
void MultiplyTiles(const float* a, int64_t lda, const float* b, int64_t ldb, int rows, int cols,
                   float* c, int64_t ldc) {
#if defined(__x86_64__)
  if (HasAvx512()) {
    MultiplyTilesAvx512<kDepth, kAccumulate>(a, lda, b, ldb, rows, cols, c, ldc);
    return;
  }
  if (HasAvx2Fma()) {
    MultiplyTilesAvx2<kDepth, kAccumulate>(a, lda, b, ldb, rows, cols, c, ldc);
    return;
  }
#endif
  MultiplyTilesSse<kDepth, kAccumulate>(a, lda, b, ldb, rows, cols, c, ldc);
}

// ---- Threading ------------------------------------------------------------------------------

// `requested` threads, or the hardware concurrency when it is 0 (1 when that is unknown).
inline int ResolveThreadCount(int requested) {
  if (requested > 0) return requested;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

// Runs run_item(item, &scratch) for every item in [0, num_items) on up to `num_threads`
// threads (the caller's included), each with its own scratch from make_scratch(). Items are
// handed out by an atomic counter in increasing order, so an item is only ever started after
// every lower-numbered one has been started: a kernel may let an item wait for a lower one
// (the backward's ordered dQ accumulation relies on this) without risking deadlock. Which
// thread takes an item must not change its result. Once *cancel (when given) reads true, no
// further item starts; those started run to their end (so an item waiting for a lower one is
// never left waiting).
template <typename MakeScratch, typename RunItem>
void RunWorkItems(int64_t num_items, int num_threads, const MakeScratch& make_scratch,
                  const RunItem& run_item, const std::atomic<bool>* cancel = nullptr) {
  std::atomic<int64_t> next_item{0};
  auto worker = [&]() {
    auto scratch = make_scratch();
    // Tested before taking an item, never after: every item taken is started.
    while (!Cancelled(cancel)) {
      const int64_t item = next_item.fetch_add(1);
      if (item >= num_items) break;
      run_item(item, &scratch);
    }
  };
  const int threads = static_cast<int>(std::min<int64_t>(num_threads, num_items));
  std::vector<std::thread> helpers;
  helpers.reserve(threads > 1 ? threads - 1 : 0);
  for (int t = 1; t < threads; ++t) helpers.emplace_back(worker);
  worker();
  for (std::thread& helper : helpers) helper.join();
}

}  // namespace ringattn::cpu_tiles
