// The Hopper forward kernel: FlashAttention-3's warp specialisation on wgmma (sm_90a). One CTA of
// three warpgroups computes kBlockM = 128 query rows of one (batch, head):
//   warpgroup 0, the producer: one thread issues TMA copies of Q once and of each live key
//     block's K and V into a kStages-deep ring of shared-memory buffers (mbarriers full_k,
//     full_v: bytes landed; empty: every consumer warp is done with the buffer);
//   warpgroups 1 and 2, the consumers, 64 rows each: S = Q K^T by wgmma from shared memory, the
//     mask, score mods and online softmax on S's registers with the mma.sync kernel's per-warp
//     tile math (flash_fwd_tile_math.cuh: a wgmma warp holds 16 rows in m16n8's accumulator
//     layout), then O += P V by wgmma with P from registers and V transposed from shared memory.
// The two consumers are independent: the warp schedulers overlap one's softmax with the other's
// matrix multiplies. The epilogue is the mma.sync kernel's (WriteOutputRows): o and lse, the
// read-only partial, or the merge into the fp32 partial. Every option of that kernel is kept.
// The schedule and its measurements: docs/kernels.md, "The Hopper forward".
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/attention_params.h"
#include "kernels/cuda/block_ranges.cuh"
#include "kernels/cuda/flash_fwd_tile_math.cuh"
#include "kernels/cuda/hopper_primitives.cuh"
#include "kernels/cuda/kernel_primitives.cuh"
#include "kernels/score_mod.h"
#include "kernels/softmax_state.h"

namespace ringattn {
namespace flash_fwd {

// The kernel's constants for one head dim (64 or 128). The per-warp fields are what
// flash_fwd_tile_math.cuh's functions read: one m16 row tile per warp, kBlockN keys.
// kSchedule: 0 sequential (per block: S, softmax, P V); 1 intra-warpgroup overlap (block
// n + 1's S = Q K^T and block n's O += P V in flight while the warpgroup runs block n + 1's
// softmax: FlashAttention-3's two-stage pipelining); 2 that, and the two consumers take turns
// issuing their matrix multiplies (named barriers: FlashAttention-3's ping-pong), so that one's
// softmax runs under the other's multiplies.
template <int kHeadDim_, int kSchedule_>
struct HopperFwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kOverlap = kSchedule_ >= 1;
  static constexpr bool kPingpong = kSchedule_ == 2;
  static constexpr int kBlockM = 128;   // query rows per CTA: 64 per consumer warpgroup
  static constexpr int kBlockN = 128;   // keys per pipeline step: S is m64 n128 per warpgroup
  static constexpr int kStages = 2;     // K/V buffers
  static constexpr int kConsumers = 2;  // warpgroups
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kMinBlocksPerSm = 1;
  static constexpr int kProducerRegs = 24;  // setmaxnreg: 128 x 24 + 256 x 240 <= 64 K
  static constexpr int kConsumerRegs = 240;
  static constexpr int kSubTiles = kHeadDim / 64;  // 128-byte-swizzled [rows, 64] sub-tiles
  static constexpr int kQSubBytes = kBlockM * 128;
  static constexpr int kKVSubBytes = kBlockN * 128;
  static constexpr int kQTileBytes = kSubTiles * kQSubBytes;
  static constexpr int kKVTileBytes = kSubTiles * kKVSubBytes;
  static constexpr int kBarrierBytes = 1024;  // the mbarriers, after the tiles
  static constexpr int kSmemBytes = kQTileBytes + 2 * kStages * kKVTileBytes + kBarrierBytes;

  // Per warp, for the shared tile math.
  static constexpr int kWarpRows = 16;
  static constexpr int kMTiles = 1;
  static constexpr int kRows = 2;
  static constexpr int kNTilesS = kBlockN / 8;
  static constexpr int kNTilesO = kHeadDim / 8;
  static constexpr bool kEx2Combine = true;

  static_assert(kHeadDim == 64 || kHeadDim == 128, "instantiated head dims");
  static_assert(kSmemBytes <= 227 * 1024, "exceeds sm_90's 227 KB of shared memory per CTA");
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumers <= 65536,
                "setmaxnreg budget exceeds the register file");
};

// Grid: QueryBlockOf<true>'s one-dimensional order; block: Traits::kThreads; dynamic shared
// memory Traits::kSmemBytes, 1 KB aligned. `p` is validated and CheckFlashForwardSupport'ed on
// the host; tm_q, tm_k, tm_v are EncodeRowsTensorMap's maps of q, k and v with boxes of
// kBlockM and kBlockN rows. kScoreMods and skip_if_set as in FlashFwdKernel.
template <typename Traits, DType kDType, bool kScoreMods>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    FlashFwdHopperKernel(const __grid_constant__ AttentionParams p,
                         const __grid_constant__ CUtensorMap tm_q,
                         const __grid_constant__ CUtensorMap tm_k,
                         const __grid_constant__ CUtensorMap tm_v, const uint32_t* skip_if_set) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;

  extern __shared__ __align__(1024) unsigned char smem[];  // the 128-byte swizzle's 1 KB
  const uint32_t smem_q = flash::SmemAddr(smem);           // [kSubTiles][kBlockM, 64]
  const uint32_t smem_k = smem_q + Traits::kQTileBytes;    // [kStages][kSubTiles][kBlockN, 64]
  const uint32_t smem_v = smem_k + kStages * Traits::kKVTileBytes;  // as smem_k
  const uint32_t bars = smem_v + kStages * Traits::kKVTileBytes;
  const uint32_t bar_q = bars;  // then full_k[kStages], full_v[kStages], empty[kStages]
  auto full_k = [&](int st) { return bars + 8 * (1 + st); };
  auto full_v = [&](int st) { return bars + 8 * (1 + kStages + st); };
  auto empty = [&](int st) { return bars + 8 * (1 + 2 * kStages + st); };
  if ((smem_q & 1023u) != 0) __trap();  // the swizzle and the descriptors need 1 KB alignment

  const flash::QueryBlockWork work = flash::QueryBlockOf<true>(p);
  const int64_t m0 = work.m_block * kBlockM;
  const int h = work.head;
  const int b = work.batch;
  const int kv_head = h / (p.heads / p.heads_k);
  const int64_t m_last = flash::Min64(m0 + kBlockM, p.seqlen_q) - 1;
  const flash::BlockRange blocks =
      flash::LiveKeyBlocks<kBlockN, kScoreMods>(p, QueryPos(p, m0), QueryPos(p, m_last));
  // The block's packed sequence, when one holds all its rows: no search per row and key block.
  const SeqClamp clamp = SequenceClamp<kScoreMods>(p, QueryPos(p, m0), QueryPos(p, m_last));
  if (skip_if_set != nullptr && *skip_if_set != 0) return;  // the careful kernel computes it

  if (threadIdx.x == 0) {
    hopper::MbarInit(bar_q, 1);
    for (int st = 0; st < kStages; ++st) {
      hopper::MbarInit(full_k(st), 1);
      hopper::MbarInit(full_v(st), 1);
      hopper::MbarInit(empty(st), 4 * Traits::kConsumers);  // one arrival per consumer warp
    }
    hopper::FenceBarrierInit();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    // ---- Producer: one thread issues every copy; the others idle on few registers.
    hopper::SetMaxRegsDec<Traits::kProducerRegs>();
    if (threadIdx.x == 0 && blocks.begin < blocks.end) {
      hopper::PrefetchTensorMap(&tm_q);
      hopper::PrefetchTensorMap(&tm_k);
      hopper::PrefetchTensorMap(&tm_v);
      hopper::MbarArriveExpectTx(bar_q, Traits::kQTileBytes);
#pragma unroll
      for (int s = 0; s < Traits::kSubTiles; ++s) {
        hopper::TmaLoad4d(smem_q + s * Traits::kQSubBytes, &tm_q, bar_q, 64 * s,
                          static_cast<int>(m0), h, b);
      }
      int stage = 0;
      uint32_t phase = 0;
      for (int64_t n = blocks.begin; n < blocks.end; ++n) {
        hopper::MbarWait(empty(stage), phase ^ 1);  // its last reader is done (fresh: at once)
        const int row = static_cast<int>(n * kBlockN);
        const uint32_t k_tile = smem_k + stage * Traits::kKVTileBytes;
        const uint32_t v_tile = smem_v + stage * Traits::kKVTileBytes;
        hopper::MbarArriveExpectTx(full_k(stage), Traits::kKVTileBytes);
#pragma unroll
        for (int s = 0; s < Traits::kSubTiles; ++s) {
          hopper::TmaLoad4d(k_tile + s * Traits::kKVSubBytes, &tm_k, full_k(stage), 64 * s, row,
                            kv_head, b);
        }
        hopper::MbarArriveExpectTx(full_v(stage), Traits::kKVTileBytes);
#pragma unroll
        for (int s = 0; s < Traits::kSubTiles; ++s) {
          hopper::TmaLoad4d(v_tile + s * Traits::kKVSubBytes, &tm_v, full_v(stage), 64 * s, row,
                            kv_head, b);
        }
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
  } else {
    // ---- Consumers: warpgroup c = 0, 1 owns rows [64 c, 64 c + 64) of the block; its warp w
    // rows 16 w .. 16 w + 15 (wgmma's m64 accumulator layout, m16n8's per warp).
    hopper::SetMaxRegsInc<Traits::kConsumerRegs>();
    const int consumer = warpgroup - 1;
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    const int64_t warp_row0 = m0 + 64 * consumer + 16 * warp;
    const bool warp_has_rows = warp_row0 < p.seqlen_q;

    OTile<Traits> acc_o;  // O: columns 8 t + 2 (lane % 4) + {0, 1} of rows g, g + 8
    float(&o_flat)[Traits::kHeadDim / 2] = reinterpret_cast<float(&)[Traits::kHeadDim / 2]>(acc_o);
#pragma unroll
    for (int i = 0; i < Traits::kHeadDim / 2; ++i) o_flat[i] = 0.0f;
    SoftmaxState state[Traits::kRows];

    if (blocks.begin < blocks.end) {
      hopper::MbarWait(bar_q, 0);
      const uint32_t q_rows = smem_q + consumer * 64 * 128;  // this warpgroup's 64 rows
      STile<Traits> s;  // S, then P: keys n0 + 8 j + 2 (lane % 4) + {0, 1}
      float(&s_flat)[kBlockN / 2] = reinterpret_cast<float(&)[kBlockN / 2]>(s);
      uint32_t pa[kBlockN / 16][4];  // P as the A fragments of O += P V
      float rescale[Traits::kRows];

      // S = Q K^T from the K tile of `stage`, issued and committed (not waited for): k16 steps
      // over the head dim, 32 bytes apart within a 128-byte row.
      auto issue_s = [&](int stage, uint32_t phase) {
        const uint32_t k_tile = smem_k + stage * Traits::kKVTileBytes;
        hopper::MbarWait(full_k(stage), phase);
        hopper::WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < Traits::kHeadDim / 16; ++kk) {
          const uint32_t offset = (kk % 4) * 32;  // k16 step kk % 4 of sub-tile kk / 4
          const uint64_t desc_q =
              hopper::SwizzledDescriptor(q_rows + (kk / 4) * Traits::kQSubBytes + offset, 0);
          const uint64_t desc_k =
              hopper::SwizzledDescriptor(k_tile + (kk / 4) * Traits::kKVSubBytes + offset, 0);
          hopper::WgmmaSS<kBlockN, kDType>(s_flat, desc_q, desc_k, kk > 0 ? 1u : 0u);
        }
        hopper::WgmmaCommit();
      };
      // O += P V from the V tile of `stage`, issued and committed: k16 steps over the keys, 16
      // keys = two 8-row groups = 2 KB apart.
      auto issue_pv = [&](int stage, uint32_t phase) {
        const uint32_t v_tile = smem_v + stage * Traits::kKVTileBytes;
        hopper::MbarWait(full_v(stage), phase);
        hopper::WgmmaTouch(o_flat);
        hopper::WgmmaFence();
#pragma unroll
        for (int kb = 0; kb < kBlockN / 16; ++kb) {
          const uint64_t desc_v =
              hopper::SwizzledDescriptor(v_tile + kb * 2048, Traits::kKVSubBytes);
          hopper::WgmmaRS<Traits::kHeadDim, kDType>(o_flat, pa[kb], desc_v, 1u);
        }
        hopper::WgmmaCommit();
      };
      // Ping-pong: this consumer's turn to issue multiplies (named barrier 1 + consumer, both
      // consumers' 256 threads), then the other's. Consumer 0 has the first turn.
      auto turn_begin = [&] {
        if constexpr (Traits::kPingpong) {
          asm volatile("bar.sync %0, 256;\n" ::"r"(1 + consumer) : "memory");
        }
      };
      auto turn_end = [&] {
        if constexpr (Traits::kPingpong) {
          asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - consumer) : "memory");
        }
      };
      if (consumer == 1) turn_end();  // consumer 0 goes first
      // This warp is done with the stage's K and V.
      auto release = [&](int stage) {
        __syncwarp();
        if (lane == 0) hopper::MbarArrive(empty(stage));
      };
      // Mask, score mods, softmax and dropout of block n's S (landed), per warp as the mma.sync
      // kernel does, then P packed into pa; rescale gets O's factors. Returns whether the warp
      // has an allowed pair in the block: if not, P is zero (wgmma needs the whole warpgroup)
      // and O keeps its scale.
      auto softmax = [&](int64_t n) {
        const int64_t n0 = n * kBlockN;
        bool live = false;
        if (warp_has_rows) {
          // Positions and spans from an opaque copy of the first row, recomputed per block rather
          // than hoisted out of the key loop into registers (as the mma.sync kernel does).
          const int64_t row0 = flash::Opaque64(warp_row0);
          const int64_t pos_lo = QueryPos(p, row0);
          const int64_t pos_hi = QueryPos(p, flash::Min64(row0 + 16, p.seqlen_q) - 1);
          const int64_t n_last = flash::Min64(n0 + kBlockN, p.seqlen_k) - 1;
          const BlockMask mask =
              ClassifyBlock<kScoreMods>(p, clamp, pos_lo, pos_hi, KeyPos(p, n0), KeyPos(p, n_last));
          live = mask.any;
          if (live) {
            const bool cut = !mask.all || n0 + kBlockN > p.seqlen_k;
            // Softcap and ALiBi turn dots into scores; packed sequences and dropout leave dots.
            const bool mods = kScoreMods && (p.softcap > 0.0f || p.alibi_slopes != nullptr);
            if (mods || cut) {
              ScoresAndMask<Traits, kScoreMods>(s, mods, cut, p, clamp, h, row0, n0, lane);
            }
            SoftmaxStep<Traits>(s, state, mods ? 1.0f : p.softmax_scale, rescale);
            if constexpr (kScoreMods) {
              if (p.dropout_p > 0.0f) ApplyDropout<Traits>(s, p, b, h, row0, n0, lane);
            }
          }
        }
        return live;
      };
      auto pack_p = [&](bool live) {
        using E = flash::Element<kDType>;
#pragma unroll
        for (int kb = 0; kb < kBlockN / 16; ++kb) {
          const float(&p0)[4] = s[0][2 * kb];
          const float(&p1)[4] = s[0][2 * kb + 1];
          pa[kb][0] = live ? E::Pack(p0[0], p0[1]) : 0u;
          pa[kb][1] = live ? E::Pack(p0[2], p0[3]) : 0u;
          pa[kb][2] = live ? E::Pack(p1[0], p1[1]) : 0u;
          pa[kb][3] = live ? E::Pack(p1[2], p1[3]) : 0u;
        }
      };

      int stage = 0;
      uint32_t phase = 0;
      auto advance = [&] {
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      };
      if constexpr (!Traits::kOverlap) {
        for (int64_t n = blocks.begin; n < blocks.end; ++n) {
          issue_s(stage, phase);
          hopper::WgmmaWait<0>();
          hopper::WgmmaTouch(s_flat);
          const bool live = softmax(n);
          if (live) RescaleO<Traits>(acc_o, rescale);
          pack_p(live);
          issue_pv(stage, phase);
          hopper::WgmmaWait<0>();
          hopper::WgmmaTouch(o_flat);
          release(stage);
          advance();
        }
      } else {
        // Block begin's S and P alone; then per block n: S of n and P V of n - 1 in flight, the
        // softmax of n once its S lands, O rescaled once P V lands.
        turn_begin();
        issue_s(stage, phase);
        turn_end();
        hopper::WgmmaWait<0>();
        hopper::WgmmaTouch(s_flat);
        pack_p(softmax(blocks.begin));  // O is zero: nothing to rescale
        for (int64_t n = blocks.begin + 1; n < blocks.end; ++n) {
          const int prev_stage = stage;
          const uint32_t prev_phase = phase;
          advance();
          turn_begin();
          issue_s(stage, phase);
          issue_pv(prev_stage, prev_phase);
          turn_end();
          hopper::WgmmaWait<1>();  // S of n (committed first) has landed
          hopper::WgmmaTouch(s_flat);
          const bool live = softmax(n);
          hopper::WgmmaWait<0>();  // P V of n - 1 has landed
          hopper::WgmmaTouch(o_flat);
          release(prev_stage);
          if (live) RescaleO<Traits>(acc_o, rescale);
          pack_p(live);
        }
        turn_begin();
        issue_pv(stage, phase);
        turn_end();
        hopper::WgmmaWait<0>();
        hopper::WgmmaTouch(o_flat);
        release(stage);
        // Consumer 1's first arrival is one more than consumer 0 waits for: take it, so that no
        // arrival is pending on the barrier when the CTA ends.
        if (consumer == 0) turn_begin();
      }
    }

    if (warp_has_rows) WriteOutputRows<Traits>(p, b, h, warp_row0, acc_o, state, lane);
  }  // consumers
}

}  // namespace flash_fwd
}  // namespace ringattn
