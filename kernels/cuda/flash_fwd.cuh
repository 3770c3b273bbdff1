// The fast forward kernel: FlashAttention-2's schedule written with sm_80-class instructions
// (mma.sync.m16n8k16 with fp32 accumulators, ldmatrix, cp.async), built for sm_90a.
//
// Schedule. A CTA owns kBlockM query rows of one (batch, head); each of its warps owns
// kWarpRows of them, one or two m16 row tiles (kMTiles). The CTA walks the key blocks that its
// rows may see (the live range, from the mask), kBlockN keys at a time, K and V in kStages
// shared-memory buffers filled by cp.async so that the next blocks load while this one is
// computed. Per key block and warp:
//   S = Q K^T                       (mma.sync; Q fragments in registers or re-read from smem)
//   scores: scale, softcap, ALiBi, mask   (only where needed: see ScoresAndMask)
//   online softmax: the block's row max is combined into the running SoftmaxState by Combine's
//     code (softmax_state.h, the ring merge's code), the accumulator rescaled by its factor, and
//     P = exp(score - new max) summed into the state
//   O += P V                        (P re-used from the S accumulator registers as bf16/fp16)
// Epilogue: O / l and lse = m + log(l) (StateLse / StateNormalizer), written in o_dtype, or
// merged into the fp32 (o, lse) already there by MergeLse (the ring's accumulation), or merged
// with a read-only fp32 partial and then written in o_dtype (the ring's last step).
//
// Why two m16 tiles per warp: every warp reads the whole K and V tile from shared memory
// (ldmatrix) whatever its row count, so the tensor-core FLOPs per shared-memory byte grow with
// the rows per warp: each K/V fragment feeds kMTiles mma instead of one. With 16 rows per warp
// (v1) the kernel is bound by shared-memory bandwidth (docs/performance_notes.md).
// The tilings are a closed set per head dim (flash_fwd_configs.h); FlashFwdTraits derives the
// rest from one of them.
//
// Register fragments follow the PTX ISA's m16n8k16 layouts: lane = 4 * g + t (g the "group",
// t the thread in the quad). In each m16 tile a thread holds rows g and g + 8, and in each
// 8-column tile of S or O the columns 2t and 2t + 1. A row is thus shared by the 4 lanes of a
// quad, whose maxima and sums are combined with __shfl_xor_sync over lane bits 0 and 1. A
// thread's rows are indexed i = 2 mi + r: row 16 mi + 8 r + g of its warp.
//
// Hopper (a later version): wgmma.mma_async from shared-memory descriptors for both GEMMs with
// a warpgroup per 64 rows, TMA (cp.async.bulk.tensor) loads with mbarrier pipelines issued by a
// producer warp, and consumer warpgroups that overlap the softmax of one block with the GEMMs
// of the next (FlashAttention-3's ping-pong). That replaces MmaS / MmaPV / LoadTile below; the
// mask, the score mods, the SoftmaxState update and the epilogue stay as they are.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/attention_params.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/cuda/flash_fwd_configs.h"
#include "kernels/score_mod.h"
#include "kernels/softmax_state.h"

namespace ringattn {
namespace flash_fwd {

// exp(x) = 2^(x * log2(e)): the kernel exponentiates with the ex2 instruction and folds log2(e)
// into the factor that already turns a dot product into a score (see UpdateSoftmax).
inline constexpr float kLog2e = 1.4426950408889634f;

// ---- Element types --------------------------------------------------------------------------

template <DType kDType>
struct Element;

template <>
struct Element<DType::kBF16> {
  using T = __nv_bfloat16;
  // Two floats as one 32-bit mma operand register: `lo` in the low half (the lower column).
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
};

template <>
struct Element<DType::kF16> {
  using T = __half;
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
};

// ---- Tiling traits --------------------------------------------------------------------------

// The tiling of one instantiation: entry kConfig of Tilings<kHeadDim> (flash_fwd_configs.h) and
// what follows from it. Shared memory holds Q once and K, V in kStages buffers, each tile
// stored as rows of kHeadDim 2-byte elements in 16-byte chunks, XOR-swizzled (chunk c of row r
// at position c ^ (r % 8)) so that the 8 row addresses of every ldmatrix phase and the chunks
// of every cp.async row fall in distinct banks.
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

// ---- PTX wrappers ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy, bypassing L1; with `fill` false nothing is read and the 16
// bytes are zero-filled (rows past the end of the sequence).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool fill) {
  const int src_bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i of
// every lane receives (row lane / 4, columns 2 (lane % 4) + {0, 1}) of matrix i.
__device__ __forceinline__ void Ldmatrix4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// The same, transposed: register i receives (rows 2 (lane % 4) + {0, 1}, column lane / 4).
__device__ __forceinline__ void Ldmatrix4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one m16n8k16 tile: a 16x16 (row-major fragment, 4 regs), b 16x8 (column
// fragment, 2 regs), d 16x8 fp32 (4 regs).
template <DType kDType>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (kDType == DType::kBF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(kDType == DType::kF16, "mma operands are bf16 or fp16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 2^x by the SFU (relative error ~2^-22; flushes subnormal results to 0; 2^-inf = +0).
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// e^x as 2^(x log2 e) by the SFU: the exponential the kernel hands to Combine's code
// (CombineWith, softmax_state.h) in place of std::exp's accurate expf, which compiles to ~10
// instructions and a branch per call. Host-callable too (std::exp2), only so that
// CombineWith's host/device template accepts it.
struct Ex2Exp {
  __host__ __device__ __forceinline__ float operator()(float x) const {
#ifdef __CUDA_ARCH__
    return Exp2(x * kLog2e);
#else
    return std::exp2(x * kLog2e);
#endif
  }
};

__device__ __forceinline__ float NegInf() { return -std::numeric_limits<float>::infinity(); }

__device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- Shared-memory tiles --------------------------------------------------------------------

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of kChunks chunks per
// row. The XOR changes only the low 3 bits of the chunk, so it stays within its row.
template <int kChunks>
__device__ __forceinline__ uint32_t SwizzledOffset(int row, int chunk) {
  return static_cast<uint32_t>(row * kChunks + (chunk ^ (row & 7))) * 16u;
}

// Starts copying rows [row0, row0 + kRows) of a [num_rows, kHeadDim] global matrix (rows
// `row_stride` elements apart, 16-byte aligned; row0 < num_rows) into the swizzled tile at
// `tile`; rows at or past num_rows are zero-filled, so that padding keys score 0 (then masked)
// and contribute 0 * V = 0 rather than stale NaN bits. Thread `tid` copies chunks tid,
// tid + kThreads, ...: consecutive threads read consecutive 16 bytes of a row, and a thread's
// chunks are kRowStep rows apart in the same column, so that one source pointer stepped by
// kRowStep rows and one shared-memory offset (the swizzle term r % 8 is the same for all of
// them) address them all. Written that way because ptxas otherwise keeps a 64-bit address per
// chunk live across the key loop: at 4 warps (8 + 8 chunks per thread and block) that spilled.
template <typename Traits, int kRows, typename T>
__device__ __forceinline__ void LoadTile(uint32_t tile, const T* gmem, int64_t row_stride,
                                         int64_t row0, int64_t num_rows, int tid) {
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

// ---- Key blocks ----------------------------------------------------------------------------

// The key blocks [begin, end) that may hold an allowed key for some query position in
// [q_pos_lo, q_pos_hi]: exactly the blocks for which ClassifyBlock(...).any holds. Positions grow
// with the row index, so "last key >= first.lo" and "first key <= last.hi" are both monotone in
// the block index and two binary searches find the range (also when it is empty).
struct KeyBlockRange {
  int64_t begin;
  int64_t end;
};

template <int kBlockN>
__device__ __forceinline__ KeyBlockRange LiveKeyBlocks(const AttentionParams& p, int64_t q_pos_lo,
                                                       int64_t q_pos_hi) {
  const int64_t num_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const KeySpan first = AllowedKeySpan(p, q_pos_lo);
  const KeySpan last = AllowedKeySpan(p, q_pos_hi);
  int64_t lo = 0, hi = num_blocks;  // first block whose last key is at or after first.lo
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    const int64_t last_key = Min64((mid + 1) * kBlockN, p.seqlen_k) - 1;
    if (KeyPos(p, last_key) >= first.lo) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int64_t begin = lo;
  hi = num_blocks;  // first block from `begin` on whose first key is after last.hi
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (KeyPos(p, mid * kBlockN) > last.hi) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return {begin, lo};
}

// ---- Per-warp tile operations ---------------------------------------------------------------

// ldmatrix addressing. A lane always addresses rows whose index is its own row plus a multiple
// of 8, so its swizzle term (row % 8) is fixed: chunk c = 2 i + half (half in {0, 1}) of such a
// row sits at byte 16 (c ^ (row % 8)) = 32 i ^ 16 (half ^ (row % 8)) of it. Tiles start at
// multiples of 1 KB (the dynamic shared memory is 1 KB aligned, tile sizes are multiples of
// 1 KB) and rows at multiples of kRowBytes = 16 kChunks, so a row's start address has zero bits
// 4 .. log2(kRowBytes) - 1, which hold the chunk: the lane's address of chunk pair i is
// LaneBase(...) ^ (32 i), one LOP3 per k-step, and rows 16 m further fold into the
// instruction's immediate offset.
__device__ __forceinline__ uint32_t LaneBase(uint32_t tile, int row, int half, int row_bytes) {
  return tile + static_cast<uint32_t>(row * row_bytes + (half ^ (row & 7)) * 16);
}

// `x` through a mov the compiler cannot see through, inside the key loop. Values derived from
// a loop-invariant one (Q's ldmatrix addresses, one per k-step; the rows' query positions and
// key spans of the mask) would otherwise be computed once before the loop and held in
// registers throughout: at 2 m16 tiles per warp (O 128 + S 64 registers) they spilled at 255.
// From the opaque copy they are recomputed where used, a few integer operations per block.
__device__ __forceinline__ uint32_t Opaque(uint32_t x) {
  uint32_t y;
  asm volatile("mov.b32 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}
__device__ __forceinline__ int64_t Opaque64(int64_t x) {
  int64_t y;
  asm volatile("mov.b64 %0, %1;\n" : "=l"(y) : "l"(x));
  return y;
}

// Q's A fragment for k-step kk (columns 16 kk .. 16 kk + 15) of row tile mi of the warp whose
// lane base is `q_lane` (QLaneBase): matrices (rows 0-7 | 8-15) x (chunk 2 kk | 2 kk + 1) ->
// a0, a1, a2, a3; lane l addresses row l % 16 of the tile, chunk 2 kk + l / 16.
template <typename Traits>
__device__ __forceinline__ uint32_t QLaneBase(uint32_t smem_q, int warp, int lane) {
  return LaneBase(smem_q, warp * Traits::kWarpRows + (lane & 15), lane >> 4, Traits::kRowBytes);
}
template <typename Traits>
__device__ __forceinline__ void LoadQFragment(uint32_t (&a)[4], uint32_t q_lane, int mi, int kk) {
  Ldmatrix4(a, (q_lane ^ (32u * kk)) + mi * 16 * Traits::kRowBytes);
}

// Fragment arrays of one warp, per row tile mi: S (then P) and O accumulators, Q's fragments.
template <typename Traits>
using STile = float[Traits::kMTiles][Traits::kNTilesS][4];  // keys n0 + 8 j + 2 t + {0, 1}
template <typename Traits>
using OTile = float[Traits::kMTiles][Traits::kNTilesO][4];  // columns 8 j + 2 t + {0, 1}
template <typename Traits>
using QFrags = uint32_t[Traits::kMTiles][Traits::kKStepsS][4];  // [tile][k-step][a0..a3]

// S = Q K^T for the warp's rows and the kBlockN keys of the K tile at `smem_k` ([kBlockN,
// kHeadDim], swizzled). B = K^T is K's rows read untransposed: one ldmatrix.x4 gives the
// (b0, b1) of two n8 tiles: matrices (keys 0-7 | keys 8-15 of the pair) x (chunk 2 kk |
// 2 kk + 1); lane l addresses key 8 (l / 16) + l % 8 of chunk 2 kk + (l / 8) % 2. Each B
// fragment feeds the mma of every row tile of the warp (the point of kMTiles > 1).
template <typename Traits, DType kDType>
__device__ __forceinline__ void MmaS(STile<Traits>& s, const QFrags<Traits>& q_frag,
                                     uint32_t smem_q, uint32_t smem_k, int warp, int lane) {
  uint32_t q_lane = 0;  // Q fragments from shared memory
  if constexpr (!Traits::kQInRegs) q_lane = QLaneBase<Traits>(Opaque(smem_q), warp, lane);
#pragma unroll
  for (int mi = 0; mi < Traits::kMTiles; ++mi) {
#pragma unroll
    for (int j = 0; j < Traits::kNTilesS; ++j) {
      s[mi][j][0] = s[mi][j][1] = s[mi][j][2] = s[mi][j][3] = 0.0f;
    }
  }
  const int key_in_pair = ((lane >> 4) << 3) + (lane & 7);
  const uint32_t k_lane = LaneBase(smem_k, key_in_pair, (lane >> 3) & 1, Traits::kRowBytes);
#pragma unroll
  for (int kk = 0; kk < Traits::kKStepsS; ++kk) {
    uint32_t a[Traits::kMTiles][4];
#pragma unroll
    for (int mi = 0; mi < Traits::kMTiles; ++mi) {
      if constexpr (Traits::kQInRegs) {
#pragma unroll
        for (int x = 0; x < 4; ++x) a[mi][x] = q_frag[mi][kk][x];
      } else {
        LoadQFragment<Traits>(a[mi], q_lane, mi, kk);
      }
    }
#pragma unroll
    for (int jp = 0; jp < Traits::kNTilesS / 2; ++jp) {
      uint32_t b[4];
      Ldmatrix4(b, (k_lane ^ (32u * kk)) + jp * 16 * Traits::kRowBytes);
#pragma unroll
      for (int mi = 0; mi < Traits::kMTiles; ++mi) {
        Mma16816<kDType>(s[mi][2 * jp], a[mi], b[0], b[1]);
        Mma16816<kDType>(s[mi][2 * jp + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

// Turns the block's dot products (keys from n0) into what UpdateSoftmax reads. Three cases, per
// warp and key block:
//   neither flag (the common case): S stays q.k; the softmax scale is applied in UpdateSoftmax,
//     folded into the exponent's factor; this function is not called;
//   `mask_pairs` alone (a causal/window edge, or keys past seqlen_k): S stays q.k, with -inf
//     where the pair is not allowed;
//   `mod_scores` (softcap or ALiBi): S becomes ModScore (natural-log units), -inf where masked.
// Element (mi, j, e) of s is query row warp_row0 + 16 mi + 8 (e / 2) + g and key
// n0 + 8 j + 2 t + e % 2. The rows' positions and spans are recomputed here (a few integer
// operations per row, only in cut or modded blocks) rather than held in registers throughout.
template <typename Traits>
__device__ __forceinline__ void ScoresAndMask(STile<Traits>& s, bool mod_scores, bool mask_pairs,
                                              const AttentionParams& p, int h, int64_t warp_row0,
                                              int64_t n0, int lane) {
  // The thread's rows, i = 2 mi + r. Key columns are the outer loop below, so that each key's
  // position is computed once and dies after its kRows tests (rows outer would let the
  // compiler keep all kBlockN / 4 column positions live at once).
  int64_t q_pos[Traits::kRows];
  KeySpan span[Traits::kRows];
#pragma unroll
  for (int i = 0; i < Traits::kRows; ++i) {
    q_pos[i] = QueryPos(p, warp_row0 + 16 * (i / 2) + 8 * (i % 2) + lane / 4);
    span[i] = AllowedKeySpan(p, q_pos[i]);
  }
#pragma unroll
  for (int j = 0; j < Traits::kNTilesS; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t key = n0 + j * 8 + 2 * (lane & 3) + c;
      const int64_t k_pos = KeyPos(p, key);
      const bool key_exists = key < p.seqlen_k;
#pragma unroll
      for (int i = 0; i < Traits::kRows; ++i) {
        float& x = s[i / 2][j][2 * (i % 2) + c];
        const bool allowed =
            !mask_pairs || (key_exists && k_pos >= span[i].lo && k_pos <= span[i].hi);
        if (!allowed) {
          x = NegInf();
        } else if (mod_scores) {
          x = ModScore(p, h, x, q_pos[i], k_pos);
        }
      }
    }
  }
}

// One online-softmax step for the warp's block of S (dots or scores, as ScoresAndMask left them;
// `to_score` turns an entry into natural-log score units: the softmax scale for dots, 1 for
// scores). For each of the thread's rows i = 2 mi + r:
//   1. m_blk = the block's row max (over the quad), in score units;
//   2. Combine(state, {m_blk, 0}): the state moves to the new max m' = max(m, m_blk), and the
//      factor exp(m - m') (0 while the state is empty) is what the accumulator must be scaled
//      by -- this is the ring merge's code, not a copy of it (with kEx2Combine through
//      CombineWith and the SFU's exp, Ex2Exp);
//   3. P = exp(score - m') = 2^(entry * to_score * log2 e - m' log2 e): one FFMA and one ex2
//      per entry; masked entries (-inf) give 0. While m' is -inf (every key so far masked, so
//      every entry is -inf) the subtrahend is 0 instead, which keeps 2^(-inf - -inf) = NaN out;
//   4. the state's l gets this thread's partial sum of P (its 2 columns per tile); the 4 lanes
//      of a quad carry partial sums that the epilogue adds (Combine's rescaling is linear in l,
//      so partials rescale like the whole).
// Overwrites s with P and scales acc_o by step 2's factors.
template <typename Traits>
__device__ __forceinline__ void UpdateSoftmax(STile<Traits>& s, OTile<Traits>& acc_o,
                                              SoftmaxState (&state)[Traits::kRows],
                                              float to_score) {
  float m_log2[Traits::kRows];  // m' log2(e) per row
  float rescale[Traits::kRows];
#pragma unroll
  for (int mi = 0; mi < Traits::kMTiles; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = 2 * mi + r;
      float mx = NegInf();
#pragma unroll
      for (int j = 0; j < Traits::kNTilesS; ++j) {
        mx = fmaxf(mx, fmaxf(s[mi][j][2 * r], s[mi][j][2 * r + 1]));
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_blk = mx * to_score;  // to_score > 0, so -inf stays -inf
      if constexpr (Traits::kEx2Combine) {
        rescale[i] = CombineWith(&state[i], SoftmaxState{m_blk, 0.0f}, Ex2Exp{}).a;
      } else {
        rescale[i] = Combine(&state[i], SoftmaxState{m_blk, 0.0f}).a;
      }
      m_log2[i] = state[i].m == NegInf() ? 0.0f : state[i].m * kLog2e;
    }
  }
  const float factor = to_score * kLog2e;
  float row_sum[Traits::kRows];
#pragma unroll
  for (int i = 0; i < Traits::kRows; ++i) row_sum[i] = 0.0f;
#pragma unroll
  for (int mi = 0; mi < Traits::kMTiles; ++mi) {
#pragma unroll
    for (int j = 0; j < Traits::kNTilesS; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 2 * mi + (e >> 1);
        const float prob = Exp2(fmaf(s[mi][j][e], factor, -m_log2[i]));
        s[mi][j][e] = prob;
        row_sum[i] += prob;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < Traits::kRows; ++i) state[i].l += row_sum[i];
#pragma unroll
  for (int mi = 0; mi < Traits::kMTiles; ++mi) {
#pragma unroll
    for (int t = 0; t < Traits::kNTilesO; ++t) {
      acc_o[mi][t][0] *= rescale[2 * mi];
      acc_o[mi][t][1] *= rescale[2 * mi];
      acc_o[mi][t][2] *= rescale[2 * mi + 1];
      acc_o[mi][t][3] *= rescale[2 * mi + 1];
    }
  }
}

// O += P V for the V tile at `smem_v` ([kBlockN, kHeadDim], swizzled). P's A fragment for
// k-step kb (keys 16 kb .. 16 kb + 15) is S tiles 2 kb and 2 kb + 1 packed to 16 bits: the
// accumulator layout of an n8 tile equals the A layout of half a k16 step. B = V (rows = keys)
// needs pairs of consecutive keys per register: ldmatrix.trans; one x4 gives (b0, b1) of two
// n8 tiles of O: matrices (keys 0-7 | 8-15) x (chunk 2 tp | 2 tp + 1); lane l addresses key
// 8 ((l / 8) % 2) + l % 8 of chunk 2 tp + l / 16. Each B fragment feeds every row tile.
template <typename Traits, DType kDType>
__device__ __forceinline__ void MmaPV(OTile<Traits>& acc_o, const STile<Traits>& prob,
                                      uint32_t smem_v, int lane) {
  using E = Element<kDType>;
  const int key_in_step = (((lane >> 3) & 1) << 3) + (lane & 7);
  const uint32_t v_lane = LaneBase(smem_v, key_in_step, lane >> 4, Traits::kRowBytes);
#pragma unroll
  for (int kb = 0; kb < Traits::kKStepsPV; ++kb) {
    uint32_t a[Traits::kMTiles][4];
#pragma unroll
    for (int mi = 0; mi < Traits::kMTiles; ++mi) {
      const float(&p0)[4] = prob[mi][2 * kb];
      const float(&p1)[4] = prob[mi][2 * kb + 1];
      a[mi][0] = E::Pack(p0[0], p0[1]);  // row g,     keys 2t, 2t+1
      a[mi][1] = E::Pack(p0[2], p0[3]);  // row g + 8, keys 2t, 2t+1
      a[mi][2] = E::Pack(p1[0], p1[1]);  // row g,     keys 8+2t, 8+2t+1
      a[mi][3] = E::Pack(p1[2], p1[3]);  // row g + 8, keys 8+2t, 8+2t+1
    }
#pragma unroll
    for (int tp = 0; tp < Traits::kNTilesO / 2; ++tp) {
      uint32_t b[4];
      Ldmatrix4Trans(b, (v_lane ^ (32u * tp)) + kb * 16 * Traits::kRowBytes);
#pragma unroll
      for (int mi = 0; mi < Traits::kMTiles; ++mi) {
        Mma16816<kDType>(acc_o[mi][2 * tp], a[mi], b[0], b[1]);
        Mma16816<kDType>(acc_o[mi][2 * tp + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

// Stores two adjacent output elements (offset even; o aligned to two elements, by the host
// check) in o_dtype.
__device__ __forceinline__ void StorePair(void* o, int64_t offset, DType o_dtype, float x0,
                                          float x1) {
  switch (o_dtype) {
    case DType::kF32:
      *reinterpret_cast<float2*>(static_cast<float*>(o) + offset) = make_float2(x0, x1);
      return;
    case DType::kBF16:
      *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(o) + offset) =
          __floats2bfloat162_rn(x0, x1);
      return;
    case DType::kF16:
      *reinterpret_cast<__half2*>(static_cast<__half*>(o) + offset) = __floats2half2_rn(x0, x1);
      return;
  }
}

// ---- The kernel -----------------------------------------------------------------------------

// Which query block, head and batch this CTA computes. Heaviest query blocks first: under a
// causal mask the last query block sees the most keys, so starting it first shortens the
// grid's tail. Two grid orders, by the tiling:
//   v1's, (m_blocks, heads, batch): heaviest first within each (batch, head), so the heavy
//     blocks of the last heads start near the end: at 2 CTAs per SM a list-scheduling model
//     puts causal b1 s8192 h32 at 1.14x the ideal makespan;
//   kGlobalHeavyFirst, (m_blocks * batch * heads) in one dimension, (batch, head) fastest:
//     every pair's heaviest block before any lighter one (longest first across the grid;
//     1.004x in that model).
struct CtaWork {
  int64_t m_block;
  int head;
  int batch;
};
template <bool kGlobalHeavyFirst>
__device__ __forceinline__ CtaWork QueryBlockOf(const AttentionParams& p) {
  if constexpr (kGlobalHeavyFirst) {
    // 32-bit: gridDim.x = m_blocks * pairs < 2^31 (checked at launch).
    const uint32_t heads = static_cast<uint32_t>(p.heads);
    const uint32_t pairs = static_cast<uint32_t>(p.batch) * heads;
    const uint32_t m_rev = blockIdx.x / pairs;
    const uint32_t pair = blockIdx.x - m_rev * pairs;
    return {static_cast<int64_t>(gridDim.x / pairs - 1 - m_rev), static_cast<int>(pair % heads),
            static_cast<int>(pair / heads)};
  } else {
    return {static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x, static_cast<int>(blockIdx.y),
            static_cast<int>(blockIdx.z)};
  }
}

// Grid: one CTA per (query block, head, batch), in the tiling's order (see QueryBlockOf);
// block: kThreads; dynamic shared memory Traits::kSmemBytes. `p` is validated and
// CheckFlashForwardSupport'ed on the host.
// kScoreMods: p has a softcap or ALiBi slopes (the launch picks the instantiation). A compile-
// time switch because the mods' code (tanh, per-pair positions) in the same kernel as the plain
// path raised register pressure past 255 at two m16 tiles per warp, and ptxas then spilled S
// in the plain path too.
template <typename Traits, DType kDType, bool kScoreMods>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
    FlashFwdKernel(const __grid_constant__ AttentionParams p) {
  using T = typename Element<kDType>::T;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;

  extern __shared__ __align__(1024) unsigned char smem[];           // 1 KB: see LaneBase
  const uint32_t smem_q = SmemAddr(smem);                           // [kBlockM, kHeadDim]
  const uint32_t smem_k = smem_q + Traits::kQTileBytes;             // [kStages, kBlockN, kHeadDim]
  const uint32_t smem_v = smem_k + kStages * Traits::kKVTileBytes;  // as smem_k
  if ((smem_q & 1023u) != 0) __trap();  // LaneBase's addressing: fail loudly, never silently

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const CtaWork work = QueryBlockOf<Traits::kGlobalHeavyFirst>(p);
  const int64_t m_block = work.m_block;
  const int h = work.head;
  const int b = work.batch;
  const int kv_head = h / (p.heads / p.heads_k);  // GQA: heads / heads_k query heads per KV head
  const int64_t m0 = m_block * kBlockM;
  const int64_t m_last = Min64(m0 + kBlockM, p.seqlen_q) - 1;  // last valid row of the block

  // This (batch, head)'s rows; row i of each at i * row_stride, head_dim contiguous.
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  // [seqlen_q, head_dim]
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + kv_head * p.k_head_stride;
  // [seqlen_k, head_dim]
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + kv_head * p.v_head_stride;
  // [seqlen_k, head_dim]

  const KeyBlockRange blocks = LiveKeyBlocks<kBlockN>(p, QueryPos(p, m0), QueryPos(p, m_last));

  // The warp's rows [warp_row0, warp_row0 + kWarpRows) (those < seqlen_q are real); the
  // thread's rows are warp_row0 + 16 mi + 8 r + lane / 4.
  const int64_t warp_row0 = m0 + warp * Traits::kWarpRows;
  const bool warp_has_rows = warp_row0 < p.seqlen_q;

  OTile<Traits> acc_o;  // O accumulator, per row tile: rows g, g + 8; columns 8 t + 2 t' + {0,1}
#pragma unroll
  for (int mi = 0; mi < Traits::kMTiles; ++mi) {
#pragma unroll
    for (int t = 0; t < Traits::kNTilesO; ++t) {
      acc_o[mi][t][0] = acc_o[mi][t][1] = acc_o[mi][t][2] = acc_o[mi][t][3] = 0.0f;
    }
  }
  SoftmaxState state[Traits::kRows];  // row i = 2 mi + r; m quad-uniform, l this lane's partial

  if (blocks.begin < blocks.end) {
    QFrags<Traits> q_frag;  // unused (and dropped) unless kQInRegs

    // One key block from the stage at (stage_k, stage_v), for the warp's rows.
    auto compute_block = [&](int64_t n, uint32_t stage_k, uint32_t stage_v) {
      // Skip a block whose pairs are all masked for this warp; mask only where it is cut.
      const int64_t n0 = n * kBlockN;
      const int64_t n_last = Min64(n0 + kBlockN, p.seqlen_k) - 1;
      if (!warp_has_rows) return;
      // The warp's query positions and their spans, recomputed per block from an opaque copy
      // of its first row (see Opaque): held across the key loop they spilled at 255 registers.
      const int64_t row0 = Opaque64(warp_row0);
      const int64_t pos_lo = QueryPos(p, row0);
      const int64_t pos_hi = QueryPos(p, Min64(row0 + Traits::kWarpRows, p.seqlen_q) - 1);
      const BlockMask mask = ClassifyBlock(p, pos_lo, pos_hi, KeyPos(p, n0), KeyPos(p, n_last));
      if (!mask.any) return;
      // Mask only where the block is cut by the mask or by the end of the keys.
      const bool cut = !mask.all || n0 + kBlockN > p.seqlen_k;
      STile<Traits> s;  // S, then P
      MmaS<Traits, kDType>(s, q_frag, smem_q, stage_k, warp, lane);
      if (kScoreMods || cut) ScoresAndMask<Traits>(s, kScoreMods, cut, p, h, row0, n0, lane);
      UpdateSoftmax<Traits>(s, acc_o, state, kScoreMods ? 1.0f : p.softmax_scale);
      MmaPV<Traits, kDType>(acc_o, s, stage_v, lane);
    };
    auto load_block = [&](int64_t n, int stage) {
      const uint32_t offset = stage * Traits::kKVTileBytes;
      LoadTile<Traits, kBlockN>(smem_k + offset, k, p.k_row_stride, n * kBlockN, p.seqlen_k, tid);
      LoadTile<Traits, kBlockN>(smem_v + offset, v, p.v_row_stride, n * kBlockN, p.seqlen_k, tid);
    };
    auto load_q_frags = [&] {
      if constexpr (Traits::kQInRegs) {
#pragma unroll
        for (int mi = 0; mi < Traits::kMTiles; ++mi) {
#pragma unroll
          for (int kk = 0; kk < Traits::kKStepsS; ++kk) {
            LoadQFragment<Traits>(q_frag[mi][kk], QLaneBase<Traits>(smem_q, warp, lane), mi, kk);
          }
        }
      }
    };

    if constexpr (Traits::kOneBarrier) {
      // kStages-deep pipeline, one barrier per key block. Commit groups in order: Q, blocks
      // begin .. begin + kStages - 2 (the prologue), then one per iteration (empty near the
      // end, so that the counting below holds on every iteration).
      LoadTile<Traits, kBlockM>(smem_q, q, p.q_row_stride, m0, p.seqlen_q, tid);
      CpAsyncCommit();
#pragma unroll
      for (int st = 0; st < kStages - 1; ++st) {
        if (blocks.begin + st < blocks.end) load_block(blocks.begin + st, st);
        CpAsyncCommit();
      }
      if constexpr (Traits::kQInRegs) {
        CpAsyncWait<kStages - 1>();  // Q's group has landed
        __syncthreads();
        load_q_frags();
      }
      int read_stage = 0;             // the stage of block n
      int write_stage = kStages - 1;  // the stage block n + kStages - 1 goes to
      for (int64_t n = blocks.begin; n < blocks.end; ++n) {
        CpAsyncWait<kStages - 2>();  // block n's group has landed (this thread's copies)
        // Every thread's copies of block n are visible, and every warp is done with block
        // n - 1, whose stage (write_stage) is refilled next.
        __syncthreads();
        if (n + kStages - 1 < blocks.end) load_block(n + kStages - 1, write_stage);
        CpAsyncCommit();
        compute_block(n, smem_k + read_stage * Traits::kKVTileBytes,
                      smem_v + read_stage * Traits::kKVTileBytes);
        read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
        write_stage = write_stage == kStages - 1 ? 0 : write_stage + 1;
      }
    } else {
      // v1's loop: double buffering with a barrier after the copies land and another after
      // the compute. Prologue: Q and the first K/V block, then Q's fragments into registers.
      LoadTile<Traits, kBlockM>(smem_q, q, p.q_row_stride, m0, p.seqlen_q, tid);
      load_block(blocks.begin, 0);
      CpAsyncCommit();
      CpAsyncWait<0>();
      __syncthreads();
      load_q_frags();
      for (int64_t n = blocks.begin; n < blocks.end; ++n) {
        const int stage = static_cast<int>((n - blocks.begin) & 1);
        // Start the next block into the other stage: every warp finished reading it at the end
        // of the previous iteration (the trailing barrier). Always commit, so that
        // wait_group<1> below means "this block's group has landed" also on the last iteration.
        if (n + 1 < blocks.end) load_block(n + 1, stage ^ 1);
        CpAsyncCommit();
        CpAsyncWait<1>();
        __syncthreads();  // this block's K/V copies from every thread are visible
        compute_block(n, smem_k + stage * Traits::kKVTileBytes,
                      smem_v + stage * Traits::kKVTileBytes);
        __syncthreads();  // every warp is done with this stage before it is refilled
      }
    }
  }

  // ---- Epilogue: normalise and write, or merge. Warp-uniform from here on.
  if (!warp_has_rows) return;
  float lse[Traits::kRows];
  float norm[Traits::kRows];
  int64_t row[Traits::kRows];
#pragma unroll
  for (int i = 0; i < Traits::kRows; ++i) {
    row[i] = warp_row0 + 16 * (i / 2) + 8 * (i % 2) + lane / 4;
    float l = state[i].l;  // the quad's partial sums -> the row's
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const SoftmaxState finished{state[i].m, l};
    lse[i] = StateLse(finished);          // -inf for a fully masked row
    norm[i] = StateNormalizer(finished);  // 0 for a fully masked row: o = 0
  }
  const int col0 = 2 * (lane & 3);  // this lane's first column in each n8 tile
  if (!p.merge_into_output) {
#pragma unroll
    for (int i = 0; i < Traits::kRows; ++i) {
      if (row[i] >= p.seqlen_q) continue;
      const int mi = i / 2, r = i % 2;
      const int64_t o_row = b * p.o_batch_stride + row[i] * p.o_row_stride + h * p.o_head_stride;
      // lse: [batch, heads, seqlen_q], seqlen_q contiguous.
      const int64_t lse_at = b * p.lse_batch_stride + h * p.lse_head_stride + row[i];
      float w_new = norm[i];
      float w_old = 0.0f;  // weight of the read-only partial; 0: not read
      float out_lse = lse[i];
      if (p.partial_o != nullptr) {  // merged with it first (the ring's last step)
        const float old_lse = p.partial_lse[lse_at];
        if (lse[i] == NegInf()) {  // nothing here: the partial as it is
          w_new = 0.0f;
          w_old = old_lse == NegInf() ? 0.0f : 1.0f;
          out_lse = old_lse;
        } else {
          const LseMerge merge = MergeLse(old_lse, lse[i]);
          w_new = merge.wb * norm[i];
          w_old = merge.wa;
          out_lse = merge.lse;
        }
      }
#pragma unroll
      for (int t = 0; t < Traits::kNTilesO; ++t) {
        float x0 = acc_o[mi][t][2 * r] * w_new;
        float x1 = acc_o[mi][t][2 * r + 1] * w_new;
        if (w_old != 0.0f) {
          const float2 old = *reinterpret_cast<const float2*>(p.partial_o + o_row + t * 8 + col0);
          x0 += w_old * old.x;
          x1 += w_old * old.y;
        }
        StorePair(p.o, o_row + t * 8 + col0, p.o_dtype, x0, x1);
      }
      if ((lane & 3) == 0 && p.lse != nullptr) p.lse[lse_at] = out_lse;
    }
    return;
  }

  // Merge into the fp32 partial (o, lse) by MergeLse, as WriteOutputRow does on the CPU. All
  // four lanes of a quad read the old lse before its lane 0 overwrites it (__syncwarp).
  float old_lse[Traits::kRows];
#pragma unroll
  for (int i = 0; i < Traits::kRows; ++i) {
    old_lse[i] =
        row[i] < p.seqlen_q ? p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row[i]] : 0.0f;
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < Traits::kRows; ++i) {
    // Nothing to add (row fully masked here): the partial stays bit for bit.
    if (row[i] >= p.seqlen_q || lse[i] == NegInf()) continue;
    const int mi = i / 2, r = i % 2;
    const LseMerge merge = MergeLse(old_lse[i], lse[i]);
    const float w_new = merge.wb * norm[i];
    float* o = static_cast<float*>(p.o) + b * p.o_batch_stride + row[i] * p.o_row_stride +
               h * p.o_head_stride;  // [head_dim] fp32, by validation
#pragma unroll
    for (int t = 0; t < Traits::kNTilesO; ++t) {
      float2* slot = reinterpret_cast<float2*>(o + t * 8 + col0);
      float2 out = make_float2(w_new * acc_o[mi][t][2 * r], w_new * acc_o[mi][t][2 * r + 1]);
      if (merge.wa != 0.0f) {  // an empty old partial (weight 0) is not read: no NaN leaks in
        const float2 old = *slot;
        out.x += merge.wa * old.x;
        out.y += merge.wa * old.y;
      }
      *slot = out;
    }
    if ((lane & 3) == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row[i]] = merge.lse;
  }
}

// ---- Launch ---------------------------------------------------------------------------------

// Raises `kernel`'s dynamic shared-memory limit to smem_bytes (above 48 KB a kernel must opt in;
// per device, cheap to repeat) and, for tilings meant to run several CTAs per SM, asks for the
// largest shared-memory carveout so that they fit beside each other (a hint the driver may
// override; TilingResources reports the occupancy it gives). Shared with the backward kernel.
template <typename KernelFn>
absl::Status PrepareSharedMemory(KernelFn* kernel, int smem_bytes, int min_ctas_per_sm) {
  RA_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  if (min_ctas_per_sm > 1) {
    RA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
  }
  return absl::OkStatus();
}

// What the device makes of a tiling's two kernels, `plain` and `mods` (with score mods):
// registers and local memory of each, CTAs per SM of the plain one.
template <typename KernelFn>
absl::StatusOr<FlashKernelResources> TilingResources(KernelFn* plain, KernelFn* mods,
                                                     int smem_bytes, int threads,
                                                     int min_ctas_per_sm) {
  FlashKernelResources r;
  r.smem_bytes = smem_bytes;
  r.threads = threads;
  cudaFuncAttributes attributes;
  RA_RETURN_IF_ERROR(PrepareSharedMemory(mods, smem_bytes, min_ctas_per_sm));
  RA_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attributes, mods));
  r.mods_registers = attributes.numRegs;
  r.mods_local_bytes = static_cast<int>(attributes.localSizeBytes);
  RA_RETURN_IF_ERROR(PrepareSharedMemory(plain, smem_bytes, min_ctas_per_sm));
  RA_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attributes, plain));
  r.registers = attributes.numRegs;
  r.local_bytes = static_cast<int>(attributes.localSizeBytes);
  RA_CUDA_RETURN_IF_ERROR(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r.ctas_per_sm, plain, threads, smem_bytes));
  return r;
}

template <typename Traits, DType kDType, bool kScoreMods>
absl::Status PrepareKernel() {
  return PrepareSharedMemory(&FlashFwdKernel<Traits, kDType, kScoreMods>, Traits::kSmemBytes,
                             Traits::kMinBlocksPerSm);
}

template <typename Traits, DType kDType, bool kScoreMods>
absl::Status Launch(const AttentionParams& p, cudaStream_t stream) {
  const int64_t m_blocks = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  // QueryBlockOf's order. The one-dimensional grid's limit, 2^31 - 1 CTAs, is 2.7e11 query
  // rows over all (batch, head) pairs: tensors far past any device memory.
  const int64_t ctas = Traits::kGlobalHeavyFirst ? m_blocks * p.batch * p.heads : m_blocks;
  if (ctas > int64_t{0x7fffffff}) {
    return absl::InvalidArgumentError("cuda: seqlen_q too large for the grid (2^31 - 1 blocks)");
  }
  const dim3 grid = Traits::kGlobalHeavyFirst
                        ? dim3(static_cast<unsigned>(ctas))
                        : dim3(static_cast<unsigned>(m_blocks), static_cast<unsigned>(p.heads),
                               static_cast<unsigned>(p.batch));
  RA_RETURN_IF_ERROR((PrepareKernel<Traits, kDType, kScoreMods>()));
  FlashFwdKernel<Traits, kDType, kScoreMods>
      <<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <typename Traits, DType kDType>
absl::Status LaunchWithTraits(const AttentionParams& p, cudaStream_t stream) {
  if (p.seqlen_q == 0) return absl::OkStatus();
  const bool score_mods = p.softcap > 0.0f || p.alibi_slopes != nullptr;
  return score_mods ? Launch<Traits, kDType, true>(p, stream)
                    : Launch<Traits, kDType, false>(p, stream);
}

template <typename Traits, DType kDType>
absl::StatusOr<FlashKernelResources> ResourcesWithTraits() {
  return TilingResources(&FlashFwdKernel<Traits, kDType, false>,
                         &FlashFwdKernel<Traits, kDType, true>, Traits::kSmemBytes,
                         Traits::kThreads, Traits::kMinBlocksPerSm);
}

// Runtime tiling index -> the instantiation: every entry of Tilings<kHeadDim> is compiled.
template <int kHeadDim, DType kDType, int kIndex = 0>
absl::Status LaunchByIndex(const AttentionParams& p, int config, cudaStream_t stream) {
  if constexpr (kIndex == kNumTilings<kHeadDim>) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda: no tiling ", config, " for head_dim ", kHeadDim));
  } else {
    if (config == kIndex) {
      return LaunchWithTraits<FlashFwdTraits<kHeadDim, kIndex>, kDType>(p, stream);
    }
    return LaunchByIndex<kHeadDim, kDType, kIndex + 1>(p, config, stream);
  }
}

template <int kHeadDim, DType kDType, int kIndex = 0>
absl::StatusOr<FlashKernelResources> ResourcesByIndex(int config) {
  if constexpr (kIndex == kNumTilings<kHeadDim>) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda: no tiling ", config, " for head_dim ", kHeadDim));
  } else {
    if (config == kIndex) return ResourcesWithTraits<FlashFwdTraits<kHeadDim, kIndex>, kDType>();
    return ResourcesByIndex<kHeadDim, kDType, kIndex + 1>(config);
  }
}

}  // namespace flash_fwd

// The definitions behind flash_fwd.h's declarations; each flash_fwd_hdim*_*.cu instantiates
// them for its (head_dim, dtype), every tiling of that head dim.
template <int kHeadDim, DType kDType>
absl::Status LaunchFlashForward(const AttentionParams& p, int config, cudaStream_t stream) {
  return flash_fwd::LaunchByIndex<kHeadDim, kDType>(p, config, stream);
}

template <int kHeadDim, DType kDType>
absl::StatusOr<FlashKernelResources> FlashForwardKernelResources(int config) {
  return flash_fwd::ResourcesByIndex<kHeadDim, kDType>(config);
}

}  // namespace ringattn
