// The forward kernel's per-warp tile math for one key block: S = Q K^T (MmaS), the score mods
// and the mask (ScoresAndMask), the online-softmax step (UpdateSoftmax), O += P V (MmaPV), and
// the output store (StorePair). Fragments follow the PTX ISA's m16n8k16 layouts: a thread holds
// rows g and g + 8 of each m16 tile (lane = 4 g + t) and columns 2t, 2t + 1 of each n8 tile;
// its rows are indexed i = 2 mi + r, row 16 mi + 8 r + g of its warp (docs/kernels.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/attention_params.h"
#include "kernels/cuda/kernel_primitives.cuh"
#include "kernels/cuda/smem_tile.cuh"
#include "kernels/score_mod.h"
#include "kernels/softmax_state.h"

namespace ringattn {
namespace flash_fwd {

// Q's A fragment for k-step kk (columns 16 kk .. 16 kk + 15) of row tile mi of the warp whose
// lane base is `q_lane` (QLaneBase): matrices (rows 0-7 | 8-15) x (chunk 2 kk | 2 kk + 1) ->
// a0, a1, a2, a3; lane l addresses row l % 16 of the tile, chunk 2 kk + l / 16.
template <typename Traits>
__device__ __forceinline__ uint32_t QLaneBase(uint32_t smem_q, int warp, int lane) {
  return flash::LaneBase(smem_q, warp * Traits::kWarpRows + (lane & 15), lane >> 4,
                         Traits::kRowBytes);
}
template <typename Traits>
__device__ __forceinline__ void LoadQFragment(uint32_t (&a)[4], uint32_t q_lane, int mi, int kk) {
  flash::Ldmatrix4(a, (q_lane ^ (32u * kk)) + mi * 16 * Traits::kRowBytes);
}

// Fragment arrays of one warp, per row tile mi: S (then P) and O accumulators, Q's fragments.
template <typename Traits>
using STile = float[Traits::kMTiles][Traits::kNTilesS][4];  // keys n0 + 8 j + 2 t + {0, 1}
template <typename Traits>
using OTile = float[Traits::kMTiles][Traits::kNTilesO][4];  // columns 8 j + 2 t + {0, 1}
template <typename Traits>
using QFrags = uint32_t[Traits::kMTiles][Traits::kKStepsS][4];  // [tile][k-step][a0..a3]

// S = Q K^T for the warp's rows and the kBlockN keys of the K tile at `smem_k` ([kBlockN,
// kHeadDim], swizzled); Q's fragments from q_frag (kQInRegs) or from the tile at smem_q. B = K^T
// is K's rows read untransposed: one ldmatrix.x4 gives the (b0, b1) of two n8 tiles: matrices
// (keys 0-7 | keys 8-15 of the pair) x (chunk 2 kk | 2 kk + 1); lane l addresses key
// 8 (l / 16) + l % 8 of chunk 2 kk + (l / 8) % 2. Each B fragment feeds the mma of every row
// tile of the warp.
template <typename Traits, DType kDType>
__device__ __forceinline__ void MmaS(STile<Traits>& s, const QFrags<Traits>& q_frag,
                                     uint32_t smem_q, uint32_t smem_k, int warp, int lane) {
  uint32_t q_lane = 0;  // Q fragments from shared memory
  if constexpr (!Traits::kQInRegs) q_lane = QLaneBase<Traits>(flash::Opaque(smem_q), warp, lane);
#pragma unroll
  for (int mi = 0; mi < Traits::kMTiles; ++mi) {
#pragma unroll
    for (int j = 0; j < Traits::kNTilesS; ++j) {
      s[mi][j][0] = s[mi][j][1] = s[mi][j][2] = s[mi][j][3] = 0.0f;
    }
  }
  const int key_in_pair = ((lane >> 4) << 3) + (lane & 7);
  const uint32_t k_lane = flash::LaneBase(smem_k, key_in_pair, (lane >> 3) & 1, Traits::kRowBytes);
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
      flash::Ldmatrix4(b, (k_lane ^ (32u * kk)) + jp * 16 * Traits::kRowBytes);
#pragma unroll
      for (int mi = 0; mi < Traits::kMTiles; ++mi) {
        flash::Mma16816<kDType>(s[mi][2 * jp], a[mi], b[0], b[1]);
        flash::Mma16816<kDType>(s[mi][2 * jp + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

// Turns the block's dot products (keys from n0) into what UpdateSoftmax reads:
//   neither flag (the common case): S stays q.k and this function is not called (the softmax
//     scale is folded into UpdateSoftmax's exponent);
//   `mask_pairs` alone (a causal/window edge, or keys past seqlen_k): S stays q.k, with -inf
//     where the pair is not allowed;
//   `mod_scores` (softcap or ALiBi): S becomes ModScore (natural-log units), -inf where masked.
// Element (mi, j, e) of s is query row warp_row0 + 16 mi + 8 (e / 2) + g and key
// n0 + 8 j + 2 t + e % 2. The rows' positions and spans are recomputed here rather than held
// in registers across the key loop.
// kPacked: packed sequences may be set (AllowedKeySpan); `clamp` is SequenceClamp of the
// CTA's query block (the warp's rows are in it).
template <typename Traits, bool kPacked>
__device__ __forceinline__ void ScoresAndMask(STile<Traits>& s, bool mod_scores, bool mask_pairs,
                                              const AttentionParams& p, const SeqClamp& clamp,
                                              int h, int64_t warp_row0, int64_t n0, int lane) {
  // The thread's rows, i = 2 mi + r. Key columns are the outer loop below, so that each key's
  // position is computed once and dies after its kRows tests.
  int64_t q_pos[Traits::kRows];
  KeySpan span[Traits::kRows];
#pragma unroll
  for (int i = 0; i < Traits::kRows; ++i) {
    q_pos[i] = QueryPos(p, warp_row0 + 16 * (i / 2) + 8 * (i % 2) + lane / 4);
    span[i] = AllowedKeySpan<kPacked>(p, clamp, q_pos[i]);
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
          x = flash::NegInf();
        } else if (mod_scores) {
          x = ModScore(p, h, x, q_pos[i], k_pos);
        }
      }
    }
  }
}

// One online-softmax step for the warp's block of S (dots or scores, as ScoresAndMask left them;
// `to_score` turns an entry into natural-log score units: the softmax scale for dots, 1 for
// scores). For each of the thread's rows: the block's row max (over the quad) is combined into
// state[i] by Combine's code (softmax_state.h, the ring merge's code; with kEx2Combine through
// CombineWith and Ex2Exp), rescale[i] gets the factor that O accumulated so far must be scaled
// by (RescaleO), s is overwritten with P = exp(score - new max) (0 where masked, never NaN
// while the row's max is still -inf), and state[i].l gets this thread's partial sum of P (the
// quad's 4 partials are added in the epilogue). Derivation: docs/kernels.md, "Online softmax".
template <typename Traits>
__device__ __forceinline__ void SoftmaxStep(STile<Traits>& s, SoftmaxState (&state)[Traits::kRows],
                                            float to_score, float (&rescale)[Traits::kRows]) {
  float m_log2[Traits::kRows];  // m' log2(e) per row
#pragma unroll
  for (int mi = 0; mi < Traits::kMTiles; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = 2 * mi + r;
      float mx = flash::NegInf();
#pragma unroll
      for (int j = 0; j < Traits::kNTilesS; ++j) {
        mx = fmaxf(mx, fmaxf(s[mi][j][2 * r], s[mi][j][2 * r + 1]));
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_blk = mx * to_score;  // to_score > 0, so -inf stays -inf
      if constexpr (Traits::kEx2Combine) {
        rescale[i] = CombineWith(&state[i], SoftmaxState{m_blk, 0.0f}, flash::Ex2Exp{}).a;
      } else {
        rescale[i] = Combine(&state[i], SoftmaxState{m_blk, 0.0f}).a;
      }
      m_log2[i] = state[i].m == flash::NegInf() ? 0.0f : state[i].m * flash::kLog2e;
    }
  }
  const float factor = to_score * flash::kLog2e;
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
        const float prob = flash::Exp2(fmaf(s[mi][j][e], factor, -m_log2[i]));
        s[mi][j][e] = prob;
        row_sum[i] += prob;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < Traits::kRows; ++i) state[i].l += row_sum[i];
}

// acc_o's rows times SoftmaxStep's rescale factors.
template <typename Traits>
__device__ __forceinline__ void RescaleO(OTile<Traits>& acc_o,
                                         const float (&rescale)[Traits::kRows]) {
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

// SoftmaxStep, then RescaleO: the step when nothing else reads acc_o meanwhile.
template <typename Traits>
__device__ __forceinline__ void UpdateSoftmax(STile<Traits>& s, OTile<Traits>& acc_o,
                                              SoftmaxState (&state)[Traits::kRows],
                                              float to_score) {
  float rescale[Traits::kRows];
  SoftmaxStep<Traits>(s, state, to_score, rescale);
  RescaleO<Traits>(acc_o, rescale);
}

// Dropout (p.dropout_p > 0): each probability of the block times DropoutFactor of its pair
// (score_mod.h: the CPU path's counter-based mask, on global positions, so every ring step,
// layout and the backward drop the same pairs). After UpdateSoftmax, whose row sums are the
// softmax's normaliser (dropout's input, not its output), and before MmaPV. Elements as in
// ScoresAndMask; a masked or absent key's probability is 0 and stays 0.
template <typename Traits>
__device__ __forceinline__ void ApplyDropout(STile<Traits>& s, const AttentionParams& p, int b,
                                             int h, int64_t warp_row0, int64_t n0, int lane) {
  int64_t q_pos[Traits::kRows];
#pragma unroll
  for (int i = 0; i < Traits::kRows; ++i) {
    q_pos[i] = QueryPos(p, warp_row0 + 16 * (i / 2) + 8 * (i % 2) + lane / 4);
  }
#pragma unroll
  for (int j = 0; j < Traits::kNTilesS; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t k_pos = KeyPos(p, n0 + j * 8 + 2 * (lane & 3) + c);
#pragma unroll
      for (int i = 0; i < Traits::kRows; ++i) {
        s[i / 2][j][2 * (i % 2) + c] *= DropoutFactor(p, b, h, q_pos[i], k_pos);
      }
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
  using E = flash::Element<kDType>;
  const int key_in_step = (((lane >> 3) & 1) << 3) + (lane & 7);
  const uint32_t v_lane = flash::LaneBase(smem_v, key_in_step, lane >> 4, Traits::kRowBytes);
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
      flash::Ldmatrix4Trans(b, (v_lane ^ (32u * tp)) + kb * 16 * Traits::kRowBytes);
#pragma unroll
      for (int mi = 0; mi < Traits::kMTiles; ++mi) {
        flash::Mma16816<kDType>(acc_o[mi][2 * tp], a[mi], b[0], b[1]);
        flash::Mma16816<kDType>(acc_o[mi][2 * tp + 1], a[mi], b[2], b[3]);
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

// The epilogue of one warp's rows [warp_row0, warp_row0 + Traits::kWarpRows) of (batch b,
// head h): normalises acc_o by the finished softmax state and writes o and lse (merged first
// with a read-only fp32 partial when p.partial_o is set: the ring's last step), or merges into
// the fp32 partial held in o and lse (p.merge_into_output), as WriteOutputRow does on the CPU.
// Fragments as MmaPV leaves them; state[i].l is this lane's partial sum (the quad's are added
// here). Rows at or past seqlen_q are skipped. Warp-uniform: every lane of the warp calls it.
template <typename Traits>
__device__ __forceinline__ void WriteOutputRows(const AttentionParams& p, int b, int h,
                                                int64_t warp_row0, const OTile<Traits>& acc_o,
                                                const SoftmaxState (&state)[Traits::kRows],
                                                int lane) {
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
      float w_old = 0.0f;     // weight of the read-only partial
      bool read_old = false;  // only an empty partial (lse -inf) is not read: 0 * NaN is NaN
      float out_lse = lse[i];
      if (p.partial_o != nullptr) {  // merged with it first (the ring's last step)
        const float old_lse = p.partial_lse[lse_at];
        read_old = old_lse != flash::NegInf();
        if (lse[i] == flash::NegInf()) {  // nothing here: the partial as it is
          w_new = 0.0f;
          w_old = 1.0f;
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
        if (read_old) {
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
    if (row[i] >= p.seqlen_q || lse[i] == flash::NegInf()) continue;
    const int mi = i / 2, r = i % 2;
    const LseMerge merge = MergeLse(old_lse[i], lse[i]);
    const float w_new = merge.wb * norm[i];
    float* o = static_cast<float*>(p.o) + b * p.o_batch_stride + row[i] * p.o_row_stride +
               h * p.o_head_stride;  // [head_dim] fp32, by validation
#pragma unroll
    for (int t = 0; t < Traits::kNTilesO; ++t) {
      float2* slot = reinterpret_cast<float2*>(o + t * 8 + col0);
      float2 out = make_float2(w_new * acc_o[mi][t][2 * r], w_new * acc_o[mi][t][2 * r + 1]);
      // An empty old partial (lse -inf) is not read, so that a never-written o cannot leak NaN;
      // a negligible one (weight 0) is: 0 * NaN is NaN, as the rule wants.
      if (old_lse[i] != flash::NegInf()) {
        const float2 old = *slot;
        out.x += merge.wa * old.x;
        out.y += merge.wa * old.y;
      }
      *slot = out;
    }
    if ((lane & 3) == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row[i]] = merge.lse;
  }
}

}  // namespace flash_fwd
}  // namespace ringattn
