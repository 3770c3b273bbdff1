// The backward kernel: FlashAttention-2's backward schedule with the forward's sm_80-class
// instructions (mma.sync.m16n8k16, ldmatrix, cp.async; flash_fwd.cuh's wrappers), built for
// sm_90a.
//
// Schedule. A CTA owns kBlockN keys of one (batch, K/V head): it loads K and V once, then walks
// every (query head of the K/V head's GQA group, query block of kBlockM rows) that may see its
// keys (the live range, from the mask), with Q, dO, lse and D double-buffered by cp.async. Its
// warps form key groups of 16 keys (kDSplit warps per group, each holding kCols of the
// group's dK/dV columns). Per query block, each warp, for its 16 keys:
//   S^T  = K Q^T                 (16 keys x kBlockM queries; mma, A = K rows, B = Q rows)
//   P^T  = exp(S^T - lse)        (the forward's probabilities, recomputed from its lse; scale,
//                                 softcap, ALiBi and the mask as the forward applies them)
//   dV  += P^T dO                (P^T re-used from the accumulator registers as the A operand)
//   dP^T = V dO^T
//   dS^T = P^T (dP^T - D)        (D = rowsum(dO * O), per query; times 1 - tanh^2 with softcap)
//   dK  += dS^T Q
// and the first warp of each group stores its dS^T (bf16/fp16) into shared memory; after a
// barrier the CTA computes dQ = dS K for the block (warps split rows x 32-column chunks) and
// adds it into the fp32 dq with float2 atomics (other CTAs, other key blocks, add to the same
// rows). dK and dV stay in registers for the whole walk: every (query head, query block) adds
// into them in a fixed order, so dK and dV are deterministic and GQA's sum over the group's
// query heads needs no atomics; dQ's order across CTAs is not fixed (fp32 atomics).
// The softmax scale is applied once, to dK and dQ at their stores (dS here is the gradient
// with respect to the score, not to the dot product).
//
// Why warps own keys rather than queries: P^T and dS^T then come out of the mma in the layout
// the next two products (dV, dK) take as A operands, so they never leave registers; only dS
// goes through shared memory, for dQ, which needs the sum over the CTA's key groups.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/attention_backward_params.h"
#include "kernels/cuda/flash_bwd.h"
#include "kernels/cuda/flash_bwd_configs.h"
#include "kernels/cuda/flash_fwd.cuh"
#include "kernels/score_mod.h"

namespace ringattn {
namespace flash_bwd {

using flash_fwd::CpAsync16;
using flash_fwd::CpAsyncCommit;
using flash_fwd::CpAsyncWait;
using flash_fwd::Element;
using flash_fwd::Exp2;
using flash_fwd::kLog2e;
using flash_fwd::LaneBase;
using flash_fwd::Ldmatrix4;
using flash_fwd::Ldmatrix4Trans;
using flash_fwd::LoadTile;
using flash_fwd::Min64;
using flash_fwd::Mma16816;
using flash_fwd::NegInf;
using flash_fwd::SmemAddr;

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

  static constexpr int kNTilesS = kBlockM / 8;   // n8 tiles of S^T, dP^T (queries)
  static constexpr int kKStepsD = kHeadDim / 16;  // k16 steps over head_dim (S^T, dP^T)
  static constexpr int kKStepsM = kBlockM / 16;   // k16 steps over queries (dV, dK)
  static constexpr int kCols = kHeadDim / kDSplit;  // dK/dV columns per warp
  static constexpr int kNTilesC = kCols / 8;
  static constexpr int kKStepsN = kBlockN / 16;  // k16 steps over keys (dQ)
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

// 4-byte global -> shared copy (lse and D).
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void StoreShared32(uint32_t addr, uint32_t value) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(value) : "memory");
}
__device__ __forceinline__ void StoreSharedF32(uint32_t addr, float value) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(value) : "memory");
}
__device__ __forceinline__ float2 LoadSharedF32x2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}

// The query blocks [begin, end) that may hold a query allowed to see some key position in
// [k_lo, k_hi]: ClassifyBlock(...).any over the block's first and last rows. Spans grow with the
// row, so "last row's span ends at or after k_lo" and "first row's span starts after k_hi" are
// monotone in the block index; two binary searches (as LiveKeyBlocks for the forward).
struct QueryBlockRange {
  int64_t begin;
  int64_t end;
};
template <int kBlockM>
__device__ __forceinline__ QueryBlockRange LiveQueryBlocks(const AttentionParams& p, int64_t k_lo,
                                                           int64_t k_hi) {
  const int64_t num_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  int64_t lo = 0, hi = num_blocks;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    const int64_t last_row = Min64((mid + 1) * kBlockM, p.seqlen_q) - 1;
    if (AllowedKeySpan(p, QueryPos(p, last_row)).hi >= k_lo) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int64_t begin = lo;
  hi = num_blocks;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (AllowedKeySpan(p, QueryPos(p, mid * kBlockM)).lo > k_hi) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return {begin, lo};
}

template <typename Traits>
using SAcc = float[Traits::kNTilesS][4];  // 16 keys x kBlockM queries: keys g, g + 8; queries 8 j + 2 t + {0, 1}
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
  const uint32_t a_lane = LaneBase(smem_a, a_row0 + (lane & 15), lane >> 4, Traits::kRowBytes);
  const uint32_t b_lane =
      LaneBase(smem_b, ((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1, Traits::kRowBytes);
#pragma unroll
  for (int kk = 0; kk < Traits::kKStepsD; ++kk) {
    uint32_t a[4];
    Ldmatrix4(a, a_lane ^ (32u * kk));
#pragma unroll
    for (int jp = 0; jp < Traits::kNTilesS / 2; ++jp) {
      uint32_t b[4];
      Ldmatrix4(b, (b_lane ^ (32u * kk)) + jp * 16 * Traits::kRowBytes);
      Mma16816<kDType>(acc[2 * jp], a, b[0], b[1]);
      Mma16816<kDType>(acc[2 * jp + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 keys x the warp's kCols columns from col0) += X B, X = the 16 x kBlockM block in `x`
// (P^T or dS^T, accumulator layout, packed to 16 bits as A fragments: the forward's MmaPV),
// B = kBlockM rows of `smem_b` (dO or Q) read transposed (rows are the k dimension).
template <typename Traits, DType kDType>
__device__ __forceinline__ void MmaAccByRows(CAcc<Traits>& acc, const SAcc<Traits>& x,
                                             uint32_t smem_b, int col0, int lane) {
  using E = Element<kDType>;
  const uint32_t b_lane =
      LaneBase(smem_b, (((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4, Traits::kRowBytes);
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
      Ldmatrix4Trans(b, (b_lane ^ (32u * (tp0 + tp))) + kb * 16 * Traits::kRowBytes);
      Mma16816<kDType>(acc[2 * tp], a, b[0], b[1]);
      Mma16816<kDType>(acc[2 * tp + 1], a, b[2], b[3]);
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

// Grid: one CTA per (key block, K/V head, batch), in the tiling's order (head_major in
// flash_bwd_configs.h; either way key blocks ascend, so that under a causal mask, where the
// first key blocks are seen by the most queries, the heaviest CTAs of a head start first);
// block kThreads; dynamic shared memory kSmemBytes. dq must be zero or hold what is to
// be added to (the launcher zeroes it without accumulate); bp.delta is set (the launcher
// computes it when the caller did not).
template <typename Traits, DType kDType, bool kScoreMods>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
    FlashBwdKernel(const __grid_constant__ AttentionBackwardParams bp) {
  using T = typename Element<kDType>::T;
  using E = Element<kDType>;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kBlockM = Traits::kBlockM;
  const AttentionParams& p = bp.fwd;

  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t smem_k = SmemAddr(smem);                            // [kBlockN, d]
  const uint32_t smem_v = smem_k + Traits::kKVTileBytes;             // [kBlockN, d]
  const uint32_t smem_q = smem_v + Traits::kKVTileBytes;             // [2][kBlockM, d]
  const uint32_t smem_do = smem_q + 2 * Traits::kQTileBytes;         // [2][kBlockM, d]
  const uint32_t smem_ds = smem_do + 2 * Traits::kQTileBytes;        // [kBlockN, kBlockM]
  const uint32_t smem_lse = smem_ds + Traits::kDsBytes;              // [2][kBlockM] fp32
  const uint32_t smem_delta = smem_lse + 2 * Traits::kVecBytes;      // [2][kBlockM] fp32
  if ((smem_k & 1023u) != 0) __trap();  // LaneBase's addressing

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int group = warp / Traits::kDSplit;  // key group: keys 16 group .. 16 group + 15
  const int col0 = (warp % Traits::kDSplit) * Traits::kCols;  // the warp's dK/dV columns
  const bool stores_ds = warp % Traits::kDSplit == 0;

  const uint32_t pairs = static_cast<uint32_t>(p.batch) * static_cast<uint32_t>(p.heads_k);
  const uint32_t n_blocks = gridDim.x / pairs;
  uint32_t n_block, pair;
  if constexpr (Traits::kHeadMajor) {
    pair = blockIdx.x / n_blocks;
    n_block = blockIdx.x - pair * n_blocks;
  } else {
    n_block = blockIdx.x / pairs;
    pair = blockIdx.x - n_block * pairs;
  }
  const int kv_head = static_cast<int>(pair % static_cast<uint32_t>(p.heads_k));
  const int b = static_cast<int>(pair / static_cast<uint32_t>(p.heads_k));
  const int group_heads = p.heads / p.heads_k;  // query heads per K/V head
  const int64_t n0 = static_cast<int64_t>(n_block) * kBlockN;
  const int64_t n_last = Min64(n0 + kBlockN, p.seqlen_k) - 1;
  const int64_t warp_key0 = n0 + 16 * group;  // the warp's first key

  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + kv_head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + kv_head * p.v_head_stride;

  const QueryBlockRange range = LiveQueryBlocks<kBlockM>(p, KeyPos(p, n0), KeyPos(p, n_last));
  const int64_t num_m = range.end - range.begin;
  const int64_t steps = num_m * group_heads;  // (query head, query block) pairs
  // Each CTA starts its walk at a different query block (key block n at n mod num_m of its
  // range), so that the CTAs of one head resident together add their dQ into different rows
  // rather than contending for the same addresses. (Under a causal mask the ranges already
  // start apart.) The order of dK/dV's sums stays fixed per CTA: still deterministic.
  const int64_t rotate = num_m > 0 ? static_cast<int64_t>(n_block) % num_m : 0;
  // Step i: query head kv_head * group_heads + i / num_m, query block of the range
  // (i + rotate) % num_m.
  auto query_block = [&](int64_t i) { return range.begin + (i % num_m + rotate) % num_m; };

  CAcc<Traits> acc_dk, acc_dv;
#pragma unroll
  for (int j = 0; j < Traits::kNTilesC; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[j][e] = acc_dv[j][e] = 0.0f;
  }

  if (steps > 0) {
    auto load_step = [&](int64_t i, int buf) {
      const int h = kv_head * group_heads + static_cast<int>(i / num_m);
      const int64_t m0 = query_block(i) * kBlockM;
      const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
      const T* dout =
          static_cast<const T*>(bp.dout) + b * bp.dout_batch_stride + h * bp.dout_head_stride;
      LoadTile<Traits, kBlockM>(smem_q + buf * Traits::kQTileBytes, q, p.q_row_stride, m0,
                                p.seqlen_q, tid);
      LoadTile<Traits, kBlockM>(smem_do + buf * Traits::kQTileBytes, dout, bp.dout_row_stride, m0,
                                p.seqlen_q, tid);
      if (tid < kBlockM) {
        const uint32_t at = buf * Traits::kVecBytes + tid * 4;
        const int64_t row = m0 + tid;
        if (row < p.seqlen_q) {
          const int64_t off = b * bp.lse_batch_stride + h * bp.lse_head_stride + row;
          CpAsync4(smem_lse + at, bp.lse + off);
          CpAsync4(smem_delta + at, bp.delta + off);
        } else {
          // Padding rows: P = 2^(x - inf) = 0, and their dO is zero-filled.
          StoreSharedF32(smem_lse + at, __int_as_float(0x7f800000));
          StoreSharedF32(smem_delta + at, 0.0f);
        }
      }
    };

    LoadTile<Traits, kBlockN>(smem_k, k, p.k_row_stride, n0, p.seqlen_k, tid);
    LoadTile<Traits, kBlockN>(smem_v, v, p.v_row_stride, n0, p.seqlen_k, tid);
    load_step(0, 0);
    CpAsyncCommit();

    const float score_to_log2 = kScoreMods ? kLog2e : p.softmax_scale * kLog2e;
    for (int64_t i = 0; i < steps; ++i) {
      const int buf = static_cast<int>(i & 1);
      CpAsyncWait<0>();
      // Step i's tiles are visible; every warp is done with step i - 1 (its dS^T reads and its
      // buffers, which the prefetch below refills).
      __syncthreads();
      if (i + 1 < steps) load_step(i + 1, buf ^ 1);
      CpAsyncCommit();

      const int h = kv_head * group_heads + static_cast<int>(i / num_m);
      const int64_t m0 = query_block(i) * kBlockM;
      const uint32_t q_tile = smem_q + buf * Traits::kQTileBytes;
      const uint32_t do_tile = smem_do + buf * Traits::kQTileBytes;

      // Does the warp's 16 x kBlockM block hold an allowed pair; is it cut by the mask or by
      // the end of the keys? (Padding query rows need no mask: their P is 0 by lse = +inf.)
      bool any = warp_key0 < p.seqlen_k;
      bool cut = false;
      if (any) {
        const int64_t wk_last = Min64(warp_key0 + 16, p.seqlen_k) - 1;
        const BlockMask mask =
            ClassifyBlock(p, QueryPos(p, m0), QueryPos(p, Min64(m0 + kBlockM, p.seqlen_q) - 1),
                          KeyPos(p, warp_key0), KeyPos(p, wk_last));
        any = mask.any;
        cut = !mask.all || warp_key0 + 16 > p.seqlen_k;
      }
      if (any) {
        SAcc<Traits> s;  // S^T, then P^T, then dS^T
        MmaRowsByRows<Traits, kDType>(s, smem_k, 16 * group, q_tile, lane);
        float dmod[kScoreMods ? Traits::kNTilesS : 1][4];  // softcap's 1 - tanh^2
        // Scores, mask, probabilities. Element (j, e): key warp_key0 + g + 8 (e / 2), query
        // row m0 + 8 j + 2 t + e % 2.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t key = warp_key0 + lane / 4 + 8 * r;
          const int64_t k_pos = KeyPos(p, key);
          const bool key_exists = key < p.seqlen_k;
#pragma unroll
          for (int j = 0; j < Traits::kNTilesS; ++j) {
            const float2 lse =
                LoadSharedF32x2(smem_lse + buf * Traits::kVecBytes + (8 * j + 2 * (lane & 3)) * 4);
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float& x = s[j][2 * r + c];
              const float row_lse = c == 0 ? lse.x : lse.y;
              // A fully masked row (lse -inf) has no allowed key here either; +inf keeps
              // 2^(x - lse) at 0 rather than inf.
              const float lse_log2 = row_lse == NegInf() ? -NegInf() : row_lse * kLog2e;
              bool allowed = true;
              int64_t q_pos = 0;
              if (cut || kScoreMods) q_pos = QueryPos(p, m0 + 8 * j + 2 * (lane & 3) + c);
              if (cut) {
                const KeySpan span = AllowedKeySpan(p, q_pos);
                allowed = key_exists && k_pos >= span.lo && k_pos <= span.hi;
              }
              if constexpr (kScoreMods) {
                float d = 1.0f;
                if (p.softcap > 0.0f) {
                  const float t = tanhf(x * p.softmax_scale / p.softcap);
                  d = 1.0f - t * t;
                }
                dmod[j][2 * r + c] = d;
                x = ModScore(p, h, x, q_pos, k_pos);
              }
              x = allowed ? Exp2(fmaf(x, score_to_log2, -lse_log2)) : 0.0f;
            }
          }
        }
        // dV += P^T dO.
        MmaAccByRows<Traits, kDType>(acc_dv, s, do_tile, col0, lane);
        // dP^T = V dO^T, then dS^T = P^T (dP^T - D) [(1 - tanh^2)].
        {
          SAcc<Traits> dp;
          MmaRowsByRows<Traits, kDType>(dp, smem_v, 16 * group, do_tile, lane);
#pragma unroll
          for (int j = 0; j < Traits::kNTilesS; ++j) {
            const float2 dd = LoadSharedF32x2(smem_delta + buf * Traits::kVecBytes +
                                              (8 * j + 2 * (lane & 3)) * 4);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float ds = s[j][e] * (dp[j][e] - ((e & 1) == 0 ? dd.x : dd.y));
              if constexpr (kScoreMods) ds *= dmod[j][e];
              s[j][e] = ds;
            }
          }
        }
        // dK += dS^T Q.
        MmaAccByRows<Traits, kDType>(acc_dk, s, q_tile, col0, lane);
        if (stores_ds) {
#pragma unroll
          for (int j = 0; j < Traits::kNTilesS; ++j) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int key = 16 * group + lane / 4 + 8 * r;
              StoreShared32(smem_ds + DsOffset<Traits>(key, j) + 4 * (lane & 3),
                            E::Pack(s[j][2 * r], s[j][2 * r + 1]));
            }
          }
        }
      } else if (stores_ds) {
        // Nothing allowed: the group's dS^T rows are 0 for dQ.
#pragma unroll
        for (int j = 0; j < Traits::kNTilesS; ++j) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int key = 16 * group + lane / 4 + 8 * r;
            StoreShared32(smem_ds + DsOffset<Traits>(key, j) + 4 * (lane & 3), 0u);
          }
        }
      }
      __syncthreads();  // dS^T complete

      // dQ[m0 .., :] += scale * dS K: items of 16 rows x 32 columns over the warps. A = dS
      // (queries x keys) is dS^T's tile read transposed; B = K (keys x columns) transposed.
      const uint32_t k_lane_t =
          LaneBase(smem_k, (((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4, Traits::kRowBytes);
      for (int item = warp; item < Traits::kDqItems; item += Traits::kWarps) {
        const int mt = item / Traits::kDqChunks;
        const int cc = item % Traits::kDqChunks;
        float acc[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
        const int quad = lane >> 3;  // ldmatrix matrix: keys +8 (quad / 2), queries +8 (quad % 2)
#pragma unroll
        for (int ks = 0; ks < Traits::kKStepsN; ++ks) {
          uint32_t a[4];
          const int key = 16 * ks + 8 * (quad >> 1) + (lane & 7);
          Ldmatrix4Trans(a, smem_ds + DsOffset<Traits>(key, 2 * mt + (quad & 1)));
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            uint32_t bb[4];
            Ldmatrix4Trans(bb, (k_lane_t ^ (32u * (2 * cc + u))) + ks * 16 * Traits::kRowBytes);
            Mma16816<kDType>(acc[2 * u], a, bb[0], bb[1]);
            Mma16816<kDType>(acc[2 * u + 1], a, bb[2], bb[3]);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t row = m0 + 16 * mt + lane / 4 + 8 * r;
          if (row >= p.seqlen_q) continue;
          float* dq = bp.dq + b * bp.dq_batch_stride + row * bp.dq_row_stride +
                      h * bp.dq_head_stride + 32 * cc + 2 * (lane & 3);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            atomicAdd(reinterpret_cast<float2*>(dq + 8 * j),
                      make_float2(p.softmax_scale * acc[j][2 * r],
                                  p.softmax_scale * acc[j][2 * r + 1]));
          }
        }
      }
    }
  }

  // ---- dK and dV of the warp's keys and columns: written (zeros where no query saw them) or
  // added.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = warp_key0 + lane / 4 + 8 * r;
    if (key >= p.seqlen_k) continue;
    float* dk = bp.dk + b * bp.dk_batch_stride + key * bp.dk_row_stride +
                kv_head * bp.dk_head_stride + col0 + 2 * (lane & 3);
    float* dv = bp.dv + b * bp.dv_batch_stride + key * bp.dv_row_stride +
                kv_head * bp.dv_head_stride + col0 + 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < Traits::kNTilesC; ++j) {
      float2 gk = make_float2(p.softmax_scale * acc_dk[j][2 * r],
                              p.softmax_scale * acc_dk[j][2 * r + 1]);
      float2 gv = make_float2(acc_dv[j][2 * r], acc_dv[j][2 * r + 1]);
      float2* k_slot = reinterpret_cast<float2*>(dk + 8 * j);
      float2* v_slot = reinterpret_cast<float2*>(dv + 8 * j);
      if (bp.accumulate) {
        const float2 ok = *k_slot, ov = *v_slot;
        gk.x += ok.x;
        gk.y += ok.y;
        gv.x += ov.x;
        gv.y += ov.y;
      }
      *k_slot = gk;
      *v_slot = gv;
    }
  }
}

// ---- Launch ---------------------------------------------------------------------------------

template <typename Traits, DType kDType, bool kScoreMods>
absl::Status PrepareKernel() {
  return flash_fwd::PrepareSharedMemory(&FlashBwdKernel<Traits, kDType, kScoreMods>,
                                        Traits::kSmemBytes, Traits::kMinBlocksPerSm);
}

template <typename Traits, DType kDType, bool kScoreMods>
absl::Status Launch(const AttentionBackwardParams& p, cudaStream_t stream) {
  const int64_t n_blocks = (p.fwd.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  const int64_t ctas = n_blocks * p.fwd.batch * p.fwd.heads_k;
  if (ctas == 0) return absl::OkStatus();
  if (ctas > int64_t{0x7fffffff}) {
    return absl::InvalidArgumentError("cuda: seqlen_k too large for the grid (2^31 - 1 blocks)");
  }
  RA_RETURN_IF_ERROR((PrepareKernel<Traits, kDType, kScoreMods>()));
  FlashBwdKernel<Traits, kDType, kScoreMods>
      <<<static_cast<unsigned>(ctas), Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <int kHeadDim, DType kDType, int kIndex = 0>
absl::Status LaunchByIndex(const AttentionBackwardParams& p, int config, cudaStream_t stream) {
  if constexpr (kIndex == kNumTilings<kHeadDim>) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda: no backward tiling ", config, " for head_dim ", kHeadDim));
  } else {
    if (config == kIndex) {
      using Traits = FlashBwdTraits<kHeadDim, kIndex>;
      const bool mods = p.fwd.softcap > 0.0f || p.fwd.alibi_slopes != nullptr;
      return mods ? Launch<Traits, kDType, true>(p, stream)
                  : Launch<Traits, kDType, false>(p, stream);
    }
    return LaunchByIndex<kHeadDim, kDType, kIndex + 1>(p, config, stream);
  }
}

template <typename Traits, DType kDType>
absl::StatusOr<FlashBackwardResources> ResourcesWithTraits() {
  return flash_fwd::TilingResources(&FlashBwdKernel<Traits, kDType, false>,
                                    &FlashBwdKernel<Traits, kDType, true>, Traits::kSmemBytes,
                                    Traits::kThreads, Traits::kMinBlocksPerSm);
}

template <int kHeadDim, DType kDType, int kIndex = 0>
absl::StatusOr<FlashBackwardResources> ResourcesByIndex(int config) {
  if constexpr (kIndex == kNumTilings<kHeadDim>) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda: no backward tiling ", config, " for head_dim ", kHeadDim));
  } else {
    if (config == kIndex) return ResourcesWithTraits<FlashBwdTraits<kHeadDim, kIndex>, kDType>();
    return ResourcesByIndex<kHeadDim, kDType, kIndex + 1>(config);
  }
}

}  // namespace flash_bwd

template <int kHeadDim, DType kDType>
absl::Status LaunchFlashBackward(const AttentionBackwardParams& p, int config,
                                 cudaStream_t stream) {
  return flash_bwd::LaunchByIndex<kHeadDim, kDType>(p, config, stream);
}

template <int kHeadDim, DType kDType>
absl::StatusOr<FlashBackwardResources> FlashBackwardResourcesOf(int config) {
  return flash_bwd::ResourcesByIndex<kHeadDim, kDType>(config);
}

}  // namespace ringattn
