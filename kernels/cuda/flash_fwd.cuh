// The fast forward kernel: FlashAttention-2's schedule written with sm_80-class instructions
// (mma.sync.m16n8k16 with fp32 accumulators, ldmatrix, cp.async), built for sm_90a.
//
// Schedule. A CTA owns kBlockM query rows of one (batch, head); each of its warps owns 16 of
// them (one m16 row tile). The CTA walks the key blocks that its rows may see (the live range,
// from the mask), kBlockN keys at a time, K and V double-buffered in shared memory by cp.async
// so that the next block loads while this one is computed. Per key block and warp:
//   S = Q K^T                       (mma.sync; Q fragments kept in registers for d <= 128)
//   scores: scale, softcap, ALiBi, mask   (only where needed: see ScoresAndMask)
//   online softmax: the block's row max is combined into the running SoftmaxState by Combine
//     (softmax_state.h, the ring merge's code), the accumulator rescaled by its factor, and
//     P = exp(score - new max) summed into the state
//   O += P V                        (P re-used from the S accumulator registers as bf16/fp16)
// Epilogue: O / l and lse = m + log(l) (StateLse / StateNormalizer), written in o_dtype, or
// merged into the fp32 (o, lse) already there by MergeLse (the ring's accumulation).
//
// Register fragments follow the PTX ISA's m16n8k16 layouts: lane = 4 * g + t (g the "group",
// t the thread in the quad). A thread holds rows g and g + 8 of its warp's 16 rows, and in
// each 8-column tile of S or O the columns 2t and 2t + 1. A row is thus shared by the 4 lanes
// of a quad, whose maxima and sums are combined with __shfl_xor_sync over lane bits 0 and 1.
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

#include <cstdint>
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "kernels/attention_params.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/flash_fwd.h"
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

// The tiling of one instantiation. Shared memory holds Q once and K, V in kStages buffers, each
// tile stored as rows of kHeadDim 2-byte elements in 16-byte chunks, XOR-swizzled (chunk c of
// row r at position c ^ (r % 8)) so that the 8 row addresses of every ldmatrix phase and the
// chunks of every cp.async row fall in distinct banks.
template <int kHeadDim_, int kBlockM_, int kBlockN_, bool kQInRegs_>
struct FlashFwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;     // query rows per CTA
  static constexpr int kBlockN = kBlockN_;     // keys per pipeline step
  static constexpr bool kQInRegs = kQInRegs_;  // Q's mma fragments held in registers
  static constexpr int kWarpRows = 16;         // one m16n8k16 row tile per warp
  static constexpr int kWarps = kBlockM / kWarpRows;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 2;  // K/V double buffering
  // One CTA (8 warps) per SM: ptxas gets up to 255 registers. Asking for 2 (a 128-register cap)
  // spills about 1 KB per thread at d 128 even with the mask and score mods compiled out: O (64)
  // + Q (32) + S (32) fill the 128 alone. Measured with -Xptxas -v, CUDA 13.0.
  static constexpr int kMinBlocksPerSm = 1;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row (8 elements)
  static constexpr int kRowBytes = kHeadDim * 2;

  static constexpr int kKStepsS = kHeadDim / 16;  // k16 steps of S = Q K^T
  static constexpr int kNTilesS = kBlockN / 8;    // n8 tiles of S: S regs = kBlockN / 2
  static constexpr int kKStepsPV = kBlockN / 16;  // k16 steps of O += P V
  static constexpr int kNTilesO = kHeadDim / 8;   // n8 tiles of O: O regs = kHeadDim / 2

  static constexpr int kQTileBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVTileBytes = kBlockN * kHeadDim * 2;
  static constexpr int kSmemBytes = kQTileBytes + 2 * kStages * kKVTileBytes;  // Q, K[], V[]

  static_assert(kHeadDim % 64 == 0, "the swizzle needs a multiple of 8 chunks per row");
  static_assert(kBlockM % kWarpRows == 0, "whole warps of 16 rows");
  static_assert(kBlockN % 16 == 0 && kNTilesS % 2 == 0, "ldmatrix.x4 loads n8 tiles in pairs");
  static_assert(kNTilesO % 2 == 0, "ldmatrix.x4.trans loads O's n8 tiles in pairs");
  static_assert((kBlockM * kChunks) % kThreads == 0, "Q tile splits evenly over the threads");
  static_assert((kBlockN * kChunks) % kThreads == 0, "K/V tiles split evenly over the threads");
  static_assert(kMinBlocksPerSm * kSmemBytes <= 227 * 1024,
                "exceeds sm_90's 227 KB of shared memory per SM for kMinBlocksPerSm CTAs");
};

// The instantiated tilings. Every config runs 8 warps (256 threads) of 16 rows each, so a CTA
// reads each K/V tile once for 128 query rows; register use is what picks kBlockN (S takes
// kBlockN / 2 fp32 registers per thread, O kHeadDim / 2, Q in registers kHeadDim / 4). The
// choices are by budget, not yet by measurement on the H100 (to do with gpu_kernel_bench):
//   d 64:  kBlockN 128: S 64 + O 32 + Q 16 regs; the larger key block halves the barriers and
//          quad reductions per key. Smem 16 + 4 x 16 = 80 KB.
//   d 128: kBlockN 64: S 32 + O 64 + Q 32 regs (FlashAttention-2's 128 x 64 on sm_80). Smem
//          32 + 4 x 16 = 96 KB.
//   d 256: kBlockN 32, Q re-read from shared memory per k-step: O alone takes 128 regs, and
//          Q in registers (64 more) would spill. Smem 64 + 4 x 16 = 128 KB.
template <int kHeadDim>
struct FlashFwdConfig;
template <>
struct FlashFwdConfig<64> {
  using Traits = FlashFwdTraits<64, 128, 128, true>;
};
template <>
struct FlashFwdConfig<128> {
  using Traits = FlashFwdTraits<128, 128, 64, true>;
};
template <>
struct FlashFwdConfig<256> {
  using Traits = FlashFwdTraits<256, 128, 32, false>;
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
// `row_stride` elements apart, 16-byte aligned) into the swizzled tile at `tile`; rows at or
// past num_rows are zero-filled, so that padding keys score 0 (then masked) and contribute
// 0 * V = 0 rather than stale NaN bits. Thread `tid` copies chunks tid, tid + kThreads, ...:
// consecutive threads read consecutive 16 bytes of a row.
template <typename Traits, int kRows, typename T>
__device__ __forceinline__ void LoadTile(uint32_t tile, const T* gmem, int64_t row_stride,
                                         int64_t row0, int64_t num_rows, int tid) {
  constexpr int kChunks = Traits::kChunks;
  constexpr int kPerThread = kRows * kChunks / Traits::kThreads;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = tid + i * Traits::kThreads;
    const int r = c / kChunks;
    const int chunk = c % kChunks;
    const int64_t row = row0 + r;
    const bool fill = row < num_rows;
    const T* src = fill ? gmem + row * row_stride + chunk * 8 : gmem;  // any valid address
    CpAsync16(tile + SwizzledOffset<kChunks>(r, chunk), src, fill);
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
// of 8, so its swizzle term (row % 8) is fixed, and chunk c of such a row sits at byte
// 16 c ^ 16 (row % 8) within it (the XOR only touches bits 4-6). With c = 2 i + half (half in
// {0, 1}), that is 32 i ^ LaneChunkXor(half, row): one XOR with a constant per k-step, and the
// row part folds into the instruction's immediate offset.
__device__ __forceinline__ uint32_t LaneChunkXor(int half, int row) {
  return static_cast<uint32_t>((half ^ (row & 7)) * 16);
}

// Q's A fragment for k-step kk (columns 16 kk .. 16 kk + 15) of warp `warp`'s 16 rows: matrices
// (rows 0-7 | 8-15) x (chunk 2 kk | 2 kk + 1) -> a0, a1, a2, a3; lane l addresses row l % 16 of
// chunk 2 kk + l / 16.
template <typename Traits>
__device__ __forceinline__ void LoadQFragment(uint32_t (&a)[4], uint32_t smem_q, int warp, int lane,
                                              int kk) {
  const int row = warp * Traits::kWarpRows + (lane & 15);
  const uint32_t row_addr = smem_q + static_cast<uint32_t>(row * Traits::kRowBytes);
  Ldmatrix4(a, row_addr + ((32u * kk) ^ LaneChunkXor(lane >> 4, row)));
}

// S = Q K^T for the warp's 16 rows and the kBlockN keys of the K tile at `smem_k`
// ([kBlockN, kHeadDim], swizzled). B = K^T is K's rows read untransposed: one ldmatrix.x4 gives
// the (b0, b1) of two n8 tiles: matrices (keys 0-7 | keys 8-15 of the pair) x (chunk 2 kk |
// 2 kk + 1); lane l addresses key 8 (l / 16) + l % 8 of chunk 2 kk + (l / 8) % 2.
template <typename Traits, DType kDType>
__device__ __forceinline__ void MmaS(float (&s)[Traits::kNTilesS][4],
                                     const uint32_t (&q_frag)[Traits::kKStepsS][4], uint32_t smem_q,
                                     uint32_t smem_k, int warp, int lane) {
#pragma unroll
  for (int j = 0; j < Traits::kNTilesS; ++j) {
    s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
  }
  const int key_in_pair = ((lane >> 4) << 3) + (lane & 7);
  const uint32_t lane_row = smem_k + static_cast<uint32_t>(key_in_pair * Traits::kRowBytes);
  const uint32_t lane_xor = LaneChunkXor((lane >> 3) & 1, key_in_pair);
#pragma unroll
  for (int kk = 0; kk < Traits::kKStepsS; ++kk) {
    uint32_t a[4];
    if constexpr (Traits::kQInRegs) {
      a[0] = q_frag[kk][0];
      a[1] = q_frag[kk][1];
      a[2] = q_frag[kk][2];
      a[3] = q_frag[kk][3];
    } else {
      LoadQFragment<Traits>(a, smem_q, warp, lane, kk);
    }
#pragma unroll
    for (int jp = 0; jp < Traits::kNTilesS / 2; ++jp) {
      uint32_t b[4];
      Ldmatrix4(b, lane_row + jp * 16 * Traits::kRowBytes + ((32u * kk) ^ lane_xor));
      Mma16816<kDType>(s[2 * jp], a, b[0], b[1]);
      Mma16816<kDType>(s[2 * jp + 1], a, b[2], b[3]);
    }
  }
}

// The thread's two query rows (g and g + 8 of its warp) and what the mask needs of them.
struct ThreadRows {
  int64_t q_pos[2];  // global query positions
  KeySpan span[2];   // allowed key positions (AllowedKeySpan)
};

// Turns the block's dot products (keys from n0) into what UpdateSoftmax reads. Three cases, per
// warp and key block:
//   neither flag (the common case): S stays q.k; the softmax scale is applied in UpdateSoftmax,
//     folded into the exponent's factor; this function is not called;
//   `mask_pairs` alone (a causal/window edge, or keys past seqlen_k): S stays q.k, with -inf
//     where the pair is not allowed;
//   `mod_scores` (softcap or ALiBi): S becomes ModScore (natural-log units), -inf where masked.
// Element (j, e) of s is row e / 2 (g or g + 8) and key n0 + 8 j + 2 t + e % 2.
template <typename Traits>
__device__ __forceinline__ void ScoresAndMask(float (&s)[Traits::kNTilesS][4], bool mod_scores,
                                              bool mask_pairs, const AttentionParams& p, int h,
                                              const ThreadRows& rows, int64_t n0, int lane) {
#pragma unroll
  for (int j = 0; j < Traits::kNTilesS; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1;
      const int64_t key = n0 + j * 8 + 2 * (lane & 3) + (e & 1);
      const int64_t k_pos = KeyPos(p, key);
      const bool allowed =
          !mask_pairs || (key < p.seqlen_k && k_pos >= rows.span[r].lo && k_pos <= rows.span[r].hi);
      if (!allowed) {
        s[j][e] = NegInf();
      } else if (mod_scores) {
        s[j][e] = ModScore(p, h, s[j][e], rows.q_pos[r], k_pos);
      }
    }
  }
}

// One online-softmax step for the warp's block of S (dots or scores, as ScoresAndMask left them;
// `to_score` turns an entry into natural-log score units: the softmax scale for dots, 1 for
// scores). For each of the thread's two rows:
//   1. m_blk = the block's row max (over the quad), in score units;
//   2. Combine(state, {m_blk, 0}): the state moves to the new max m' = max(m, m_blk), and the
//      factor exp(m - m') (0 while the state is empty) is what the accumulator must be scaled
//      by -- this is the ring merge's code, not a copy of it;
//   3. P = exp(score - m') = 2^(entry * to_score * log2 e - m' log2 e): one FFMA and one ex2
//      per entry; masked entries (-inf) give 0. While m' is -inf (every key so far masked, so
//      every entry is -inf) the subtrahend is 0 instead, which keeps 2^(-inf - -inf) = NaN out;
//   4. the state's l gets this thread's partial sum of P (its 2 columns per tile); the 4 lanes
//      of a quad carry partial sums that the epilogue adds (Combine's rescaling is linear in l,
//      so partials rescale like the whole).
// Overwrites s with P and scales acc_o by step 2's factors.
template <typename Traits>
__device__ __forceinline__ void UpdateSoftmax(float (&s)[Traits::kNTilesS][4],
                                              float (&acc_o)[Traits::kNTilesO][4],
                                              SoftmaxState (&state)[2], float to_score) {
  float m_log2[2];  // m' log2(e) per row
  float rescale[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = NegInf();
#pragma unroll
    for (int j = 0; j < Traits::kNTilesS; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_blk = mx * to_score;  // to_score > 0, so -inf stays -inf
    rescale[r] = Combine(&state[r], SoftmaxState{m_blk, 0.0f}).a;
    m_log2[r] = state[r].m == NegInf() ? 0.0f : state[r].m * kLog2e;
  }
  const float factor = to_score * kLog2e;
  float row_sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < Traits::kNTilesS; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float prob = Exp2(fmaf(s[j][e], factor, -m_log2[e >> 1]));
      s[j][e] = prob;
      row_sum[e >> 1] += prob;
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) state[r].l += row_sum[r];
#pragma unroll
  for (int t = 0; t < Traits::kNTilesO; ++t) {
    acc_o[t][0] *= rescale[0];
    acc_o[t][1] *= rescale[0];
    acc_o[t][2] *= rescale[1];
    acc_o[t][3] *= rescale[1];
  }
}

// O += P V for the V tile at `smem_v` ([kBlockN, kHeadDim], swizzled). P's A fragment for
// k-step kb (keys 16 kb .. 16 kb + 15) is S tiles 2 kb and 2 kb + 1 packed to 16 bits: the
// accumulator layout of an n8 tile equals the A layout of half a k16 step. B = V (rows = keys)
// needs pairs of consecutive keys per register: ldmatrix.trans; one x4 gives (b0, b1) of two
// n8 tiles of O: matrices (keys 0-7 | 8-15) x (chunk 2 tp | 2 tp + 1); lane l addresses key
// 8 ((l / 8) % 2) + l % 8 of chunk 2 tp + l / 16.
template <typename Traits, DType kDType>
__device__ __forceinline__ void MmaPV(float (&acc_o)[Traits::kNTilesO][4],
                                      const float (&prob)[Traits::kNTilesS][4], uint32_t smem_v,
                                      int lane) {
  using E = Element<kDType>;
  const int key_in_step = (((lane >> 3) & 1) << 3) + (lane & 7);
  const uint32_t lane_row = smem_v + static_cast<uint32_t>(key_in_step * Traits::kRowBytes);
  const uint32_t lane_xor = LaneChunkXor(lane >> 4, key_in_step);
#pragma unroll
  for (int kb = 0; kb < Traits::kKStepsPV; ++kb) {
    const uint32_t a[4] = {
        E::Pack(prob[2 * kb][0], prob[2 * kb][1]),          // row g,     keys 2t, 2t+1
        E::Pack(prob[2 * kb][2], prob[2 * kb][3]),          // row g + 8, keys 2t, 2t+1
        E::Pack(prob[2 * kb + 1][0], prob[2 * kb + 1][1]),  // row g,     keys 8+2t, 8+2t+1
        E::Pack(prob[2 * kb + 1][2], prob[2 * kb + 1][3]),  // row g + 8, keys 8+2t, 8+2t+1
    };
#pragma unroll
    for (int tp = 0; tp < Traits::kNTilesO / 2; ++tp) {
      uint32_t b[4];
      Ldmatrix4Trans(b, lane_row + kb * 16 * Traits::kRowBytes + ((32u * tp) ^ lane_xor));
      Mma16816<kDType>(acc_o[2 * tp], a, b[0], b[1]);
      Mma16816<kDType>(acc_o[2 * tp + 1], a, b[2], b[3]);
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

// Grid: (ceil(seqlen_q / kBlockM), heads, batch); block: kThreads; dynamic shared memory
// Traits::kSmemBytes. `p` is validated and CheckFlashForwardSupport'ed on the host.
template <typename Traits, DType kDType>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
    FlashFwdKernel(const __grid_constant__ AttentionParams p) {
  using T = typename Element<kDType>::T;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_q = SmemAddr(smem);                // [kBlockM, kHeadDim]
  const uint32_t smem_k = smem_q + Traits::kQTileBytes;  // [kStages, kBlockN, kHeadDim]
  const uint32_t smem_v = smem_k + Traits::kStages * Traits::kKVTileBytes;  // as smem_k

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  // Heaviest query blocks first: under a causal mask the last query block sees the most keys,
  // so starting it first shortens the grid's tail.
  const int64_t m_block = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
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

  // The warp's rows [warp_row0, warp_row0 + 16) (those < seqlen_q are real) and the thread's two.
  const int64_t warp_row0 = m0 + warp * Traits::kWarpRows;
  const bool warp_has_rows = warp_row0 < p.seqlen_q;
  const int64_t warp_pos_lo = QueryPos(p, warp_row0);
  const int64_t warp_pos_hi = QueryPos(p, Min64(warp_row0 + Traits::kWarpRows, p.seqlen_q) - 1);
  const int64_t row[2] = {warp_row0 + lane / 4, warp_row0 + lane / 4 + 8};
  ThreadRows rows;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rows.q_pos[r] = QueryPos(p, row[r]);
    rows.span[r] = AllowedKeySpan(p, rows.q_pos[r]);
  }
  const bool score_mods = p.softcap > 0.0f || p.alibi_slopes != nullptr;

  float acc_o[Traits::kNTilesO][4];  // O accumulator: rows g, g + 8; columns 8 t + 2 t' + {0,1}
#pragma unroll
  for (int t = 0; t < Traits::kNTilesO; ++t) {
    acc_o[t][0] = acc_o[t][1] = acc_o[t][2] = acc_o[t][3] = 0.0f;
  }
  SoftmaxState state[2];  // rows g, g + 8; m quad-uniform, l this lane's partial sum

  if (blocks.begin < blocks.end) {
    // Prologue: Q and the first K/V block, then Q's fragments into registers.
    LoadTile<Traits, kBlockM>(smem_q, q, p.q_row_stride, m0, p.seqlen_q, tid);
    LoadTile<Traits, kBlockN>(smem_k, k, p.k_row_stride, blocks.begin * kBlockN, p.seqlen_k, tid);
    LoadTile<Traits, kBlockN>(smem_v, v, p.v_row_stride, blocks.begin * kBlockN, p.seqlen_k, tid);
    CpAsyncCommit();
    CpAsyncWait<0>();
    __syncthreads();
    uint32_t q_frag[Traits::kKStepsS][4];  // [k-step][a0..a3]; unused (and dropped) unless kQInRegs
    if constexpr (Traits::kQInRegs) {
#pragma unroll
      for (int kk = 0; kk < Traits::kKStepsS; ++kk) {
        LoadQFragment<Traits>(q_frag[kk], smem_q, warp, lane, kk);
      }
    }

    for (int64_t n = blocks.begin; n < blocks.end; ++n) {
      const int stage = static_cast<int>((n - blocks.begin) & 1);
      const uint32_t stage_k = smem_k + stage * Traits::kKVTileBytes;
      const uint32_t stage_v = smem_v + stage * Traits::kKVTileBytes;
      // Start the next block into the other stage: every warp finished reading it at the end of
      // the previous iteration (the trailing barrier). Always commit, so that wait_group<1>
      // below means "this block's group has landed" also on the last iteration.
      if (n + 1 < blocks.end) {
        const uint32_t next = (stage ^ 1) * Traits::kKVTileBytes;
        LoadTile<Traits, kBlockN>(smem_k + next, k, p.k_row_stride, (n + 1) * kBlockN, p.seqlen_k,
                                  tid);
        LoadTile<Traits, kBlockN>(smem_v + next, v, p.v_row_stride, (n + 1) * kBlockN, p.seqlen_k,
                                  tid);
      }
      CpAsyncCommit();
      CpAsyncWait<1>();
      __syncthreads();  // this block's K/V copies from every thread are visible

      // Per warp: skip a block whose pairs are all masked; mask only where the block is cut.
      const int64_t n0 = n * kBlockN;
      const int64_t n_last = Min64(n0 + kBlockN, p.seqlen_k) - 1;
      const BlockMask mask =
          ClassifyBlock(p, warp_pos_lo, warp_pos_hi, KeyPos(p, n0), KeyPos(p, n_last));
      if (warp_has_rows && mask.any) {
        // Mask only where the block is cut by the mask or by the end of the keys.
        const bool cut = !mask.all || n0 + kBlockN > p.seqlen_k;
        float s[Traits::kNTilesS][4];  // S, then P: rows g, g + 8; keys n0 + 8 j + 2 t + {0,1}
        MmaS<Traits, kDType>(s, q_frag, smem_q, stage_k, warp, lane);
        if (score_mods || cut) ScoresAndMask<Traits>(s, score_mods, cut, p, h, rows, n0, lane);
        UpdateSoftmax<Traits>(s, acc_o, state, score_mods ? 1.0f : p.softmax_scale);
        MmaPV<Traits, kDType>(acc_o, s, stage_v, lane);
      }
      __syncthreads();  // every warp is done with this stage before it is refilled
    }
  }

  // ---- Epilogue: normalise and write, or merge. Warp-uniform from here on.
  if (!warp_has_rows) return;
  float lse[2];
  float norm[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = state[r].l;  // the quad's partial sums -> the row's
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const SoftmaxState finished{state[r].m, l};
    lse[r] = StateLse(finished);          // -inf for a fully masked row
    norm[r] = StateNormalizer(finished);  // 0 for a fully masked row: o = 0
  }
  const int col0 = 2 * (lane & 3);  // this lane's first column in each n8 tile
  if (!p.merge_into_output) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row[r] >= p.seqlen_q) continue;
      const int64_t o_row = b * p.o_batch_stride + row[r] * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
      for (int t = 0; t < Traits::kNTilesO; ++t) {
        StorePair(p.o, o_row + t * 8 + col0, p.o_dtype, acc_o[t][2 * r] * norm[r],
                  acc_o[t][2 * r + 1] * norm[r]);
      }
      // lse: [batch, heads, seqlen_q], seqlen_q contiguous.
      if ((lane & 3) == 0 && p.lse != nullptr) {
        p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row[r]] = lse[r];
      }
    }
    return;
  }

  // Merge into the fp32 partial (o, lse) by MergeLse, as WriteOutputRow does on the CPU. All
  // four lanes of a quad read the old lse before its lane 0 overwrites it (__syncwarp).
  float old_lse[2] = {0.0f, 0.0f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] < p.seqlen_q) {
      old_lse[r] = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row[r]];
    }
  }
  __syncwarp();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // Nothing to add (row fully masked here): the partial stays bit for bit.
    if (row[r] >= p.seqlen_q || lse[r] == NegInf()) continue;
    const LseMerge merge = MergeLse(old_lse[r], lse[r]);
    const float w_new = merge.wb * norm[r];
    float* o = static_cast<float*>(p.o) + b * p.o_batch_stride + row[r] * p.o_row_stride +
               h * p.o_head_stride;  // [head_dim] fp32, by validation
#pragma unroll
    for (int t = 0; t < Traits::kNTilesO; ++t) {
      float2* slot = reinterpret_cast<float2*>(o + t * 8 + col0);
      float2 out = make_float2(w_new * acc_o[t][2 * r], w_new * acc_o[t][2 * r + 1]);
      if (merge.wa != 0.0f) {  // an empty old partial (weight 0) is not read: no NaN leaks in
        const float2 old = *slot;
        out.x += merge.wa * old.x;
        out.y += merge.wa * old.y;
      }
      *slot = out;
    }
    if ((lane & 3) == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row[r]] = merge.lse;
  }
}

// ---- Launch ---------------------------------------------------------------------------------

template <int kHeadDim, DType kDType>
absl::Status LaunchFlashForwardImpl(const AttentionParams& p, cudaStream_t stream) {
  using Traits = typename FlashFwdConfig<kHeadDim>::Traits;
  static_assert(Traits::kHeadDim == kHeadDim, "config for the wrong head_dim");
  if (p.seqlen_q == 0) return absl::OkStatus();
  const int64_t m_blocks = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  if (m_blocks > int64_t{0x7fffffff}) {
    return absl::InvalidArgumentError("cuda: seqlen_q too large for the grid (2^31 - 1 blocks)");
  }
  const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  auto* kernel = &FlashFwdKernel<Traits, kDType>;
  // Above 48 KB of dynamic shared memory a kernel must opt in (per device; cheap to repeat).
  RA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               Traits::kSmemBytes));
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace flash_fwd

// The definition behind flash_fwd.h's declaration; each flash_fwd_hdim*_*.cu instantiates one.
template <int kHeadDim, DType kDType>
absl::Status LaunchFlashForward(const AttentionParams& p, cudaStream_t stream) {
  return flash_fwd::LaunchFlashForwardImpl<kHeadDim, kDType>(p, stream);
}

}  // namespace ringattn
