// The backward kernel: FlashAttention-2's backward schedule on the forward's sm_80-class
// instructions (mma.sync m16n8k16, ldmatrix, cp.async), built for sm_90a. One CTA owns
// Traits::kBlockN keys of one (batch, K/V head), walks every (query head of its GQA group,
// live query block) that may see them, keeps dK and dV in registers (deterministic, no
// atomics) and adds dQ into the fp32 dq with float2 atomics. The schedule and its reasons:
// docs/kernels.md.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"
#include "kernels/cuda/block_ranges.cuh"
#include "kernels/cuda/flash_bwd_tile_math.cuh"
#include "kernels/cuda/kernel_primitives.cuh"
#include "kernels/cuda/smem_tile.cuh"
#include "kernels/score_mod.h"

namespace ringattn {
namespace flash_bwd {

// Grid: one CTA per (key block, K/V head, batch), in the tiling's order (KeyBlockOf; key
// blocks ascend, so that under a causal mask, where the first key blocks are seen by the most
// queries, the heaviest CTAs of a head start first); block Traits::kThreads; dynamic shared
// memory Traits::kSmemBytes, 1 KB aligned. dq must be zero or hold what is to
// be added to (the launcher zeroes it without accumulate); bp.delta is set (the launcher
// computes it when the caller did not). kScoreMods: softcap, ALiBi, dropout or packed
// sequences may be set (the plain instantiation carries none of their code).
template <typename Traits, DType kDType, bool kScoreMods>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
    FlashBwdKernel(const __grid_constant__ AttentionBackwardParams bp) {
  using T = typename flash::Element<kDType>::T;
  using E = flash::Element<kDType>;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kBlockM = Traits::kBlockM;
  const AttentionParams& p = bp.fwd;

  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t smem_k = flash::SmemAddr(smem);                 // [kBlockN, d]
  const uint32_t smem_v = smem_k + Traits::kKVTileBytes;         // [kBlockN, d]
  const uint32_t smem_q = smem_v + Traits::kKVTileBytes;         // [2][kBlockM, d]
  const uint32_t smem_do = smem_q + 2 * Traits::kQTileBytes;     // [2][kBlockM, d]
  const uint32_t smem_ds = smem_do + 2 * Traits::kQTileBytes;    // [kBlockN, kBlockM]
  const uint32_t smem_lse = smem_ds + Traits::kDsBytes;          // [2][kBlockM] fp32
  const uint32_t smem_delta = smem_lse + 2 * Traits::kVecBytes;  // [2][kBlockM] fp32
  if ((smem_k & 1023u) != 0) __trap();                           // LaneBase's addressing

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int group = warp / Traits::kDSplit;  // key group: keys 16 group .. 16 group + 15
  const int col0 = (warp % Traits::kDSplit) * Traits::kCols;  // the warp's dK/dV columns
  const bool stores_ds = warp % Traits::kDSplit == 0;

  const flash::KeyBlockWork work = flash::KeyBlockOf<Traits::kHeadMajor>(p);
  const uint32_t n_block = work.n_block;
  const int kv_head = work.kv_head;
  const int b = work.batch;
  const int group_heads = p.heads / p.heads_k;  // query heads per K/V head
  const int64_t n0 = static_cast<int64_t>(n_block) * kBlockN;
  const int64_t n_last = flash::Min64(n0 + kBlockN, p.seqlen_k) - 1;
  const int64_t warp_key0 = n0 + 16 * group;  // the warp's first key

  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + kv_head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + kv_head * p.v_head_stride;

  const flash::BlockRange range =
      flash::LiveQueryBlocks<kBlockM, kScoreMods>(p, KeyPos(p, n0), KeyPos(p, n_last));
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
      flash::LoadTile<Traits, kBlockM>(smem_q + buf * Traits::kQTileBytes, q, p.q_row_stride, m0,
                                       p.seqlen_q, tid);
      flash::LoadTile<Traits, kBlockM>(smem_do + buf * Traits::kQTileBytes, dout,
                                       bp.dout_row_stride, m0, p.seqlen_q, tid);
      if (tid < kBlockM) {
        const uint32_t at = buf * Traits::kVecBytes + tid * 4;
        const int64_t row = m0 + tid;
        if (row < p.seqlen_q) {
          const int64_t off = b * bp.lse_batch_stride + h * bp.lse_head_stride + row;
          flash::CpAsync4(smem_lse + at, bp.lse + off);
          flash::CpAsync4(smem_delta + at, bp.delta + off);
        } else {
          // Padding rows: P = 2^(x - inf) = 0, and their dO is zero-filled.
          flash::StoreSharedF32(smem_lse + at, __int_as_float(0x7f800000));
          flash::StoreSharedF32(smem_delta + at, 0.0f);
        }
      }
    };

    flash::LoadTile<Traits, kBlockN>(smem_k, k, p.k_row_stride, n0, p.seqlen_k, tid);
    flash::LoadTile<Traits, kBlockN>(smem_v, v, p.v_row_stride, n0, p.seqlen_k, tid);
    load_step(0, 0);
    flash::CpAsyncCommit();

    const float score_to_log2 = kScoreMods ? flash::kLog2e : p.softmax_scale * flash::kLog2e;
    for (int64_t i = 0; i < steps; ++i) {
      const int buf = static_cast<int>(i & 1);
      flash::CpAsyncWait<0>();
      // Step i's tiles are visible; every warp is done with step i - 1 (its dS^T reads and its
      // buffers, which the prefetch below refills).
      __syncthreads();
      if (i + 1 < steps) load_step(i + 1, buf ^ 1);
      flash::CpAsyncCommit();

      const int h = kv_head * group_heads + static_cast<int>(i / num_m);
      const int64_t m0 = query_block(i) * kBlockM;
      const uint32_t q_tile = smem_q + buf * Traits::kQTileBytes;
      const uint32_t do_tile = smem_do + buf * Traits::kQTileBytes;

      // Does the warp's 16 x kBlockM block hold an allowed pair; is it cut by the mask or by
      // the end of the keys? (Padding query rows need no mask: their P is 0 by lse = +inf.)
      bool any = warp_key0 < p.seqlen_k;
      bool cut = false;
      // The query block's packed sequence, when one holds all its rows (no search per pair).
      SeqClamp clamp{kMinPos, kMaxPos, true};
      if (any) {
        const int64_t wk_last = flash::Min64(warp_key0 + 16, p.seqlen_k) - 1;
        const int64_t q_lo = QueryPos(p, m0);
        const int64_t q_hi = QueryPos(p, flash::Min64(m0 + kBlockM, p.seqlen_q) - 1);
        clamp = SequenceClamp<kScoreMods>(p, q_lo, q_hi);
        const BlockMask mask = ClassifyBlock<kScoreMods>(p, clamp, q_lo, q_hi, KeyPos(p, warp_key0),
                                                         KeyPos(p, wk_last));
        any = mask.any;
        cut = !mask.all || warp_key0 + 16 > p.seqlen_k;
      }
      if (any) {
        SAcc<Traits> s;  // S^T, then P^T, then dS^T
        MmaRowsByRows<Traits, kDType>(s, smem_k, 16 * group, q_tile, lane);
        float dmod[kScoreMods ? Traits::kNTilesS : 1][4];  // softcap's 1 - tanh^2
        // Dropout (mods only): bit 4 j + e set where pair (j, e) is kept (DropoutFactor
        // nonzero), as the forward dropped it.
        static_assert(Traits::kNTilesS * 4 <= 64, "one bit per element of s");
        const bool dropout = kScoreMods && p.dropout_p > 0.0f;
        uint64_t kept = 0;
        // Scores, mask, probabilities. Element (j, e): key warp_key0 + g + 8 (e / 2), query
        // row m0 + 8 j + 2 t + e % 2.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t key = warp_key0 + lane / 4 + 8 * r;
          const int64_t k_pos = KeyPos(p, key);
          const bool key_exists = key < p.seqlen_k;
#pragma unroll
          for (int j = 0; j < Traits::kNTilesS; ++j) {
            const float2 lse = flash::LoadSharedF32x2(smem_lse + buf * Traits::kVecBytes +
                                                      (8 * j + 2 * (lane & 3)) * 4);
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float& x = s[j][2 * r + c];
              const float row_lse = c == 0 ? lse.x : lse.y;
              // A fully masked row (lse -inf) has no allowed key here either; +inf keeps
              // 2^(x - lse) at 0 rather than inf.
              const float lse_log2 =
                  row_lse == flash::NegInf() ? -flash::NegInf() : row_lse * flash::kLog2e;
              bool allowed = true;
              int64_t q_pos = 0;
              if (cut || kScoreMods) q_pos = QueryPos(p, m0 + 8 * j + 2 * (lane & 3) + c);
              if (cut) {
                const KeySpan span = AllowedKeySpan<kScoreMods>(p, clamp, q_pos);
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
                if (dropout && DropoutFactor(p, b, h, q_pos, k_pos) != 0.0f) {
                  kept |= uint64_t{1} << (4 * j + 2 * r + c);
                }
              }
              x = allowed ? flash::Exp2(fmaf(x, score_to_log2, -lse_log2)) : 0.0f;
            }
          }
        }
        // dV += P^T dO (with dropout, Z^T dO below, Z = P m: m the pair's DropoutFactor).
        if (!dropout) MmaAccByRows<Traits, kDType>(acc_dv, s, do_tile, col0, lane);
        // dP^T = V dO^T, then dS^T = P^T (m dP^T - D) [(1 - tanh^2)]; D = dO . O is dropout's
        // already (docs/kernels.md, "Dropout").
        {
          SAcc<Traits> dp;
          MmaRowsByRows<Traits, kDType>(dp, smem_v, 16 * group, do_tile, lane);
          const float keep_scale = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
#pragma unroll
          for (int j = 0; j < Traits::kNTilesS; ++j) {
            const float2 dd = flash::LoadSharedF32x2(smem_delta + buf * Traits::kVecBytes +
                                                     (8 * j + 2 * (lane & 3)) * 4);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float m = 1.0f;
              if constexpr (kScoreMods) {
                if (dropout) m = (kept >> (4 * j + e)) & 1 ? keep_scale : 0.0f;
              }
              float ds = s[j][e] * (m * dp[j][e] - ((e & 1) == 0 ? dd.x : dd.y));
              if constexpr (kScoreMods) {
                ds *= dmod[j][e];
                if (dropout) dp[j][e] = s[j][e] * m;  // Z^T, for dV
              }
              s[j][e] = ds;
            }
          }
          if constexpr (kScoreMods) {
            if (dropout) MmaAccByRows<Traits, kDType>(acc_dv, dp, do_tile, col0, lane);
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
              flash::StoreShared32(smem_ds + DsOffset<Traits>(key, j) + 4 * (lane & 3),
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
            flash::StoreShared32(smem_ds + DsOffset<Traits>(key, j) + 4 * (lane & 3), 0u);
          }
        }
      }
      __syncthreads();  // dS^T complete

      // dQ[m0 .., :] += scale * dS K: items of 16 rows x 32 columns over the warps. A = dS
      // (queries x keys) is dS^T's tile read transposed; B = K (keys x columns) transposed.
      const uint32_t k_lane_t = flash::LaneBase(smem_k, (((lane >> 3) & 1) << 3) + (lane & 7),
                                                lane >> 4, Traits::kRowBytes);
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
          flash::Ldmatrix4Trans(a, smem_ds + DsOffset<Traits>(key, 2 * mt + (quad & 1)));
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            uint32_t bb[4];
            flash::Ldmatrix4Trans(bb,
                                  (k_lane_t ^ (32u * (2 * cc + u))) + ks * 16 * Traits::kRowBytes);
            flash::Mma16816<kDType>(acc[2 * u], a, bb[0], bb[1]);
            flash::Mma16816<kDType>(acc[2 * u + 1], a, bb[2], bb[3]);
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
            atomicAdd(
                reinterpret_cast<float2*>(dq + 8 * j),
                make_float2(p.softmax_scale * acc[j][2 * r], p.softmax_scale * acc[j][2 * r + 1]));
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
      float2 gk =
          make_float2(p.softmax_scale * acc_dk[j][2 * r], p.softmax_scale * acc_dk[j][2 * r + 1]);
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

}  // namespace flash_bwd
}  // namespace ringattn
