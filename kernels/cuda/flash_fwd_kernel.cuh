// The fast forward kernel: FlashAttention-2's schedule on mma.sync tensor cores (sm_80-class
// instructions, built for sm_90a). One CTA computes Traits::kBlockM query rows of one
// (batch, head) against every live key block, K and V streamed through a Traits::kStages-deep
// cp.async pipeline, and writes O and lse, or merges them into the fp32 partial already there
// (the ring's steps). The schedule and its reasons: docs/kernels.md.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/attention_params.h"
#include "kernels/cuda/block_ranges.cuh"
#include "kernels/cuda/flash_fwd_tile_math.cuh"
#include "kernels/cuda/kernel_primitives.cuh"
#include "kernels/cuda/smem_tile.cuh"
#include "kernels/score_mod.h"
#include "kernels/softmax_state.h"

namespace ringattn {
namespace flash_fwd {

// Grid: one CTA per (query block, head, batch), in the tiling's order (QueryBlockOf); block:
// Traits::kThreads; dynamic shared memory Traits::kSmemBytes, 1 KB aligned. `p` is validated
// and CheckFlashForwardSupport'ed on the host. kScoreMods: p has a softcap, ALiBi slopes,
// dropout or packed sequences (the launch picks the instantiation; a compile-time switch so
// that the plain kernel carries none of the options' code or registers). `skip_if_set`, when
// non-null, is the non-finite guard's device word (non_finite_guard.h): set, the CTA returns before
// loading or writing anything.
template <typename Traits, DType kDType, bool kScoreMods>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
    FlashFwdKernel(const __grid_constant__ AttentionParams p, const uint32_t* skip_if_set) {
  using T = typename flash::Element<kDType>::T;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;

  extern __shared__ __align__(1024) unsigned char smem[];           // 1 KB: see LaneBase
  const uint32_t smem_q = flash::SmemAddr(smem);                    // [kBlockM, kHeadDim]
  const uint32_t smem_k = smem_q + Traits::kQTileBytes;             // [kStages, kBlockN, kHeadDim]
  const uint32_t smem_v = smem_k + kStages * Traits::kKVTileBytes;  // as smem_k
  if ((smem_q & 1023u) != 0) __trap();  // LaneBase's addressing: fail loudly, never silently

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const flash::QueryBlockWork work = flash::QueryBlockOf<Traits::kGlobalHeavyFirst>(p);
  const int64_t m_block = work.m_block;
  const int h = work.head;
  const int b = work.batch;
  const int kv_head = h / (p.heads / p.heads_k);  // GQA: heads / heads_k query heads per KV head
  const int64_t m0 = m_block * kBlockM;
  const int64_t m_last = flash::Min64(m0 + kBlockM, p.seqlen_q) - 1;  // last valid row of the block

  // This (batch, head)'s rows; row i of each at i * row_stride, head_dim contiguous.
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  // [seqlen_q, head_dim]
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + kv_head * p.k_head_stride;
  // [seqlen_k, head_dim]
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + kv_head * p.v_head_stride;
  // [seqlen_k, head_dim]

  const flash::BlockRange blocks =
      flash::LiveKeyBlocks<kBlockN, kScoreMods>(p, QueryPos(p, m0), QueryPos(p, m_last));
  // The block's packed sequence, when one holds all its rows: no search per row and key block.
  const SeqClamp clamp = SequenceClamp<kScoreMods>(p, QueryPos(p, m0), QueryPos(p, m_last));
  // The careful kernel computes this call (its inputs hold NaN, infinities or huge values).
  if (skip_if_set != nullptr && *skip_if_set != 0) return;

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
      const int64_t n_last = flash::Min64(n0 + kBlockN, p.seqlen_k) - 1;
      if (!warp_has_rows) return;
      // The warp's query positions and their spans, recomputed per block from an opaque copy
      // of its first row (see Opaque): held across the key loop they spilled at 255 registers.
      const int64_t row0 = flash::Opaque64(warp_row0);
      const int64_t pos_lo = QueryPos(p, row0);
      const int64_t pos_hi = QueryPos(p, flash::Min64(row0 + Traits::kWarpRows, p.seqlen_q) - 1);
      const BlockMask mask =
          ClassifyBlock<kScoreMods>(p, clamp, pos_lo, pos_hi, KeyPos(p, n0), KeyPos(p, n_last));
      if (!mask.any) return;
      // Mask only where the block is cut by the mask or by the end of the keys.
      const bool cut = !mask.all || n0 + kBlockN > p.seqlen_k;
      STile<Traits> s;  // S, then P
      MmaS<Traits, kDType>(s, q_frag, smem_q, stage_k, warp, lane);
      // The options' kernel always turns dots into scores (ModScore): a runtime choice (dots
      // for packed-only or dropout-only calls, as the Hopper kernel makes) doubled its spills
      // at 255 registers (d64 stack 88 -> 504 bytes).
      constexpr bool mods = kScoreMods;
      if (mods || cut) {
        ScoresAndMask<Traits, kScoreMods>(s, mods, cut, p, clamp, h, row0, n0, lane);
      }
      UpdateSoftmax<Traits>(s, acc_o, state, mods ? 1.0f : p.softmax_scale);
      if constexpr (kScoreMods) {
        if (p.dropout_p > 0.0f) ApplyDropout<Traits>(s, p, b, h, row0, n0, lane);
      }
      MmaPV<Traits, kDType>(acc_o, s, stage_v, lane);
    };
    auto load_block = [&](int64_t n, int stage) {
      const uint32_t offset = stage * Traits::kKVTileBytes;
      flash::LoadTile<Traits, kBlockN>(smem_k + offset, k, p.k_row_stride, n * kBlockN, p.seqlen_k,
                                       tid);
      flash::LoadTile<Traits, kBlockN>(smem_v + offset, v, p.v_row_stride, n * kBlockN, p.seqlen_k,
                                       tid);
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
      flash::LoadTile<Traits, kBlockM>(smem_q, q, p.q_row_stride, m0, p.seqlen_q, tid);
      flash::CpAsyncCommit();
#pragma unroll
      for (int st = 0; st < kStages - 1; ++st) {
        if (blocks.begin + st < blocks.end) load_block(blocks.begin + st, st);
        flash::CpAsyncCommit();
      }
      if constexpr (Traits::kQInRegs) {
        flash::CpAsyncWait<kStages - 1>();  // Q's group has landed
        __syncthreads();
        load_q_frags();
      }
      int read_stage = 0;             // the stage of block n
      int write_stage = kStages - 1;  // the stage block n + kStages - 1 goes to
      for (int64_t n = blocks.begin; n < blocks.end; ++n) {
        flash::CpAsyncWait<kStages - 2>();  // block n's group has landed (this thread's copies)
        // Every thread's copies of block n are visible, and every warp is done with block
        // n - 1, whose stage (write_stage) is refilled next.
        __syncthreads();
        if (n + kStages - 1 < blocks.end) load_block(n + kStages - 1, write_stage);
        flash::CpAsyncCommit();
        compute_block(n, smem_k + read_stage * Traits::kKVTileBytes,
                      smem_v + read_stage * Traits::kKVTileBytes);
        read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
        write_stage = write_stage == kStages - 1 ? 0 : write_stage + 1;
      }
    } else {
      // v1's loop: double buffering with a barrier after the copies land and another after
      // the compute. Prologue: Q and the first K/V block, then Q's fragments into registers.
      flash::LoadTile<Traits, kBlockM>(smem_q, q, p.q_row_stride, m0, p.seqlen_q, tid);
      load_block(blocks.begin, 0);
      flash::CpAsyncCommit();
      flash::CpAsyncWait<0>();
      __syncthreads();
      load_q_frags();
      for (int64_t n = blocks.begin; n < blocks.end; ++n) {
        const int stage = static_cast<int>((n - blocks.begin) & 1);
        // Start the next block into the other stage: every warp finished reading it at the end
        // of the previous iteration (the trailing barrier). Always commit, so that
        // wait_group<1> below means "this block's group has landed" also on the last iteration.
        if (n + 1 < blocks.end) load_block(n + 1, stage ^ 1);
        flash::CpAsyncCommit();
        flash::CpAsyncWait<1>();
        __syncthreads();  // this block's K/V copies from every thread are visible
        compute_block(n, smem_k + stage * Traits::kKVTileBytes,
                      smem_v + stage * Traits::kKVTileBytes);
        __syncthreads();  // every warp is done with this stage before it is refilled
      }
    }
  }

  // ---- Epilogue: normalise and write, or merge. Warp-uniform from here on.
  if (!warp_has_rows) return;
  WriteOutputRows<Traits>(p, b, h, warp_row0, acc_o, state, lane);
}

}  // namespace flash_fwd
}  // namespace ringattn
