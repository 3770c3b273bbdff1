// The fast CPU backward.
//
// Schedule (FlashAttention-2's backward, on a CPU):
//   1. Preprocessing, one work item per (batch, head): D = rowsum(dO * O) per query row (unless
//      the caller passed it), and dq zeroed unless accumulating.
//   2. One work item per (key block of kBlockK rows, batch, K/V head). The item stages its
//      K and V once and keeps fp32 dK and dV accumulators for the block; it then walks every
//      query head of its group (GQA) and every query block of kBlockQ rows whose positions are
//      not wholly masked against it (ClassifyBlock), and per (query block, key block):
//        S^T  = K Q^T                 scores, transposed: [key, query]
//        P^T  = exp(mod(S^T) - lse)   the forward's probabilities, from its LSE; 0 if masked
//        dP^T = V dO^T
//        dS^T = P^T * (dP^T - D) * d mod / d dot     (scale, softcap's 1 - tanh^2)
//        dV  += P^T dO,  dK += dS^T Q                 (in the item's accumulators)
//        dQ^T = K^T dS^T                              added into dq, see below
//      and finally writes (or adds) its dK and dV rows: each is owned by exactly one item.
//
// dQ and determinism. A query block receives a dQ contribution from every key block, i.e.
// from several items that may run on different threads. The contributions are added into dq
// in increasing key-block order, enforced by one atomic counter per (batch, head, query
// block) holding the key block whose turn it is: an item computes its contribution, waits for
// its turn (std::atomic::wait), adds, and passes the turn to the next key block that
// contributes. So every element of dq, dk and dv is a sum in a fixed order, and the result is
// bitwise the same for any thread count. Items are numbered key-block-major and handed out in
// increasing order (cpu_tiles::RunWorkItems), so an item waits only for lower-numbered items,
// which have started: no deadlock, and items running side by side are mostly of different
// heads, which do not wait for each other. The alternatives cost more: a second pass over
// query blocks for dQ recomputes S and dP (7 products instead of 5), and per-thread dq
// partials are neither deterministic across thread counts nor small.
//
// All products go through cpu_tiles' register-blocked micro-kernel (shared with the forward),
// whose operands want the summed axis as rows of the right operand; hence the transposed
// layouts above. S^T sums over head_dim in the same order as the forward's S, so P matches the
// forward's probabilities.
//
// Measured (bench/cpu_backward_bench, batch 1, seqlen 1024, 8 heads, head_dim 64, fp32, one
// thread): 32 GFLOP/s dense and causal, the forward's rate (the backward takes 2.6x the
// forward's time for 2.5x its flops); the fp64 reference 3.3 GFLOP/s. Summed time blocked in
// the dQ turns at 2 threads: 0.1 ms of 330 ms dense, ~20 ms causal (on a loaded 2-core host).
#include "kernels/cpu/flash_cpu_backward.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cpu/cpu_tiles.h"
#include "kernels/score_mod.h"

namespace ringattn {
namespace {

using cpu_tiles::kMicroCols;
using cpu_tiles::kMicroRows;
using cpu_tiles::LoadRowAsFloat;
using cpu_tiles::DotLikeTiles;
using cpu_tiles::MultiplyTiles;
using cpu_tiles::RoundUp;

constexpr int kBlockQ = 64;  // query rows per block (Br)
constexpr int kBlockK = 64;  // key rows per work item (Bc)
// Query and key blocks are both rows and columns of the products below.
static_assert(kBlockQ % kMicroRows == 0 && kBlockQ % kMicroCols == 0);
static_assert(kBlockK % kMicroRows == 0 && kBlockK % kMicroCols == 0);

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- Where things are -----------------------------------------------------------------------

// Row statistics: the forward's LSE and D, each [batch, heads, seqlen_q] with its strides.
struct RowStats {
  const float* lse;
  int64_t lse_batch_stride, lse_head_stride;
  const float* delta;
  int64_t delta_batch_stride, delta_head_stride;
};

// One work item: key rows [k0, k0 + cols) of K/V head kv_head in batch b.
struct KeyBlock {
  int b;
  int kv_head;
  int64_t index;  // key block number
  int64_t k0;
  int cols;
};

// Items are numbered key-block-major, then batch, then K/V head (see the top of the file).
KeyBlock ItemToKeyBlock(const AttentionParams& p, int64_t item) {
  const int64_t heads_per_block = static_cast<int64_t>(p.batch) * p.heads_k;
  KeyBlock kb;
  kb.index = item / heads_per_block;
  const int64_t bh = item % heads_per_block;
  kb.b = static_cast<int>(bh / p.heads_k);
  kb.kv_head = static_cast<int>(bh % p.heads_k);
  kb.k0 = kb.index * kBlockK;
  kb.cols = static_cast<int>(std::min<int64_t>(kBlockK, p.seqlen_k - kb.k0));
  return kb;
}

int64_t NumBlocks(int64_t rows, int block) { return (rows + block - 1) / block; }

// Whether any pair of query block qb and key block kb survives the mask.
BlockMask ClassifyBlocks(const AttentionParams& p, int64_t qb, int64_t kb) {
  const int64_t q0 = qb * kBlockQ, k0 = kb * kBlockK;
  const int64_t q_last = std::min<int64_t>(q0 + kBlockQ, p.seqlen_q) - 1;
  const int64_t k_last = std::min<int64_t>(k0 + kBlockK, p.seqlen_k) - 1;
  return ClassifyBlock(p, QueryPos(p, q0), QueryPos(p, q_last), KeyPos(p, k0), KeyPos(p, k_last));
}

// The first key block at or after `kb` that contributes to query block qb, or the number of
// key blocks when none does.
int64_t NextContributor(const AttentionParams& p, int64_t qb, int64_t kb, int64_t k_blocks) {
  while (kb < k_blocks && !ClassifyBlocks(p, qb, kb).any) ++kb;
  return kb;
}

// ---- Ordered dQ accumulation ----------------------------------------------------------------

// One counter per (batch, head, query block): the key block whose dQ contribution goes in next.
class DqTurns {
 public:
  DqTurns(const AttentionParams& p, int64_t q_blocks, int64_t k_blocks)
      : q_blocks_(q_blocks),
        k_blocks_(k_blocks),
        turn_(std::make_unique<std::atomic<int64_t>[]>(static_cast<size_t>(p.batch) * p.heads *
                                                       q_blocks)) {
    for (int64_t qb = 0; qb < q_blocks; ++qb) {
      const int64_t first = NextContributor(p, qb, 0, k_blocks);
      for (int64_t bh = 0; bh < static_cast<int64_t>(p.batch) * p.heads; ++bh) {
        turn_[bh * q_blocks + qb].store(first, std::memory_order_relaxed);
      }
    }
  }

  // Blocks until it is key block kb's turn at (b, h, qb).
  void Wait(const AttentionParams& p, int b, int h, int64_t qb, int64_t kb) {
    std::atomic<int64_t>& turn = At(p, b, h, qb);
    for (int64_t now = turn.load(std::memory_order_acquire); now != kb;
         now = turn.load(std::memory_order_acquire)) {
      turn.wait(now, std::memory_order_acquire);
    }
  }

  // Passes the turn at (b, h, qb) from key block kb to the next contributing one.
  void Pass(const AttentionParams& p, int b, int h, int64_t qb, int64_t kb) {
    std::atomic<int64_t>& turn = At(p, b, h, qb);
    turn.store(NextContributor(p, qb, kb + 1, k_blocks_), std::memory_order_release);
    turn.notify_all();
  }

 private:
  std::atomic<int64_t>& At(const AttentionParams& p, int b, int h, int64_t qb) {
    return turn_[(static_cast<int64_t>(b) * p.heads + h) * q_blocks_ + qb];
  }

  const int64_t q_blocks_;
  const int64_t k_blocks_;
  std::unique_ptr<std::atomic<int64_t>[]> turn_;  // [batch, heads, q_blocks]
};

// ---- Per-thread state -----------------------------------------------------------------------

template <int kHeadDim>
struct Scratch {
  // The item's key block, staged once.
  std::vector<float> k = std::vector<float>(kBlockK * kHeadDim);    // [kBlockK, head_dim]
  std::vector<float> v = std::vector<float>(kBlockK * kHeadDim);    // [kBlockK, head_dim]
  std::vector<float> k_t = std::vector<float>(kHeadDim * kBlockK);  // [head_dim, kBlockK]
  std::array<int64_t, kBlockK> k_pos;                               // [kBlockK]
  // Its gradient accumulators.
  std::vector<float> dk = std::vector<float>(kBlockK * kHeadDim);  // [kBlockK, head_dim]
  std::vector<float> dv = std::vector<float>(kBlockK * kHeadDim);  // [kBlockK, head_dim]
  // One query block, staged per (head, query block); padding rows/columns zero.
  std::vector<float> q = std::vector<float>(kBlockQ * kHeadDim);       // [kBlockQ, head_dim]
  std::vector<float> q_t = std::vector<float>(kHeadDim * kBlockQ);     // [head_dim, kBlockQ]
  std::vector<float> dout = std::vector<float>(kBlockQ * kHeadDim);    // [kBlockQ, head_dim]
  std::vector<float> dout_t = std::vector<float>(kHeadDim * kBlockQ);  // [head_dim, kBlockQ]
  std::array<int64_t, kBlockQ> q_pos;                                  // [kBlockQ]
  std::array<KeySpan, kBlockQ> q_span;  // [kBlockQ]: each row's AllowedKeySpan
  std::array<float, kBlockQ> lse;    // [kBlockQ]; +inf for a row the forward fully masked
  std::array<float, kBlockQ> delta;  // [kBlockQ]
  // The block's products, each [kBlockK, kBlockQ]: S^T then P^T, and dP^T then dS^T.
  std::vector<float> p_t = std::vector<float>(kBlockK * kBlockQ);
  std::vector<float> ds_t = std::vector<float>(kBlockK * kBlockQ);
  // With dropout: the block's DropoutFactor per pair, [kBlockK, kBlockQ], computed once and
  // applied to dP^T and to P^T.
  std::vector<float> drop = std::vector<float>(kBlockK * kBlockQ);
  std::vector<float> dq_t = std::vector<float>(kHeadDim * kBlockQ);  // [head_dim, kBlockQ]
};

// ---- Steps of one work item -----------------------------------------------------------------

// Loads the item's K (rows and transposed) and V, zeroing the padding of a short last block
// (the products always run over kBlockK keys, and padding must add exact zeros).
template <int kHeadDim>
void StageKeyBlock(const AttentionParams& p, const KeyBlock& kb, Scratch<kHeadDim>* s) {
  for (int j = 0; j < kb.cols; ++j) {
    const int64_t row = kb.k0 + j;
    LoadRowAsFloat(p.k,
                   kb.b * p.k_batch_stride + row * p.k_row_stride + kb.kv_head * p.k_head_stride,
                   p.dtype, kHeadDim, &s->k[j * kHeadDim]);
    LoadRowAsFloat(p.v,
                   kb.b * p.v_batch_stride + row * p.v_row_stride + kb.kv_head * p.v_head_stride,
                   p.dtype, kHeadDim, &s->v[j * kHeadDim]);
    for (int d = 0; d < kHeadDim; ++d) s->k_t[d * kBlockK + j] = s->k[j * kHeadDim + d];
    s->k_pos[j] = KeyPos(p, row);
  }
  if (kb.cols == kBlockK) return;
  std::fill(s->k.begin() + kb.cols * kHeadDim, s->k.end(), 0.0f);
  std::fill(s->v.begin() + kb.cols * kHeadDim, s->v.end(), 0.0f);
  for (int d = 0; d < kHeadDim; ++d) {
    std::fill(&s->k_t[d * kBlockK + kb.cols], &s->k_t[(d + 1) * kBlockK], 0.0f);
  }
}

// Loads query block rows [q0, q0 + rows) of head h: Q and dO as rows and transposed, and the
// rows' positions, LSE and D.
template <int kHeadDim>
void StageQueryBlock(const AttentionBackwardParams& bp, const RowStats& stats, int b, int h,
                     int64_t q0, int rows, Scratch<kHeadDim>* s) {
  const AttentionParams& p = bp.fwd;
  for (int i = 0; i < rows; ++i) {
    const int64_t row = q0 + i;
    float* q_row = &s->q[i * kHeadDim];        // [kHeadDim]
    float* dout_row = &s->dout[i * kHeadDim];  // [kHeadDim]
    LoadRowAsFloat(p.q, b * p.q_batch_stride + row * p.q_row_stride + h * p.q_head_stride, p.dtype,
                   kHeadDim, q_row);
    LoadRowAsFloat(bp.dout,
                   b * bp.dout_batch_stride + row * bp.dout_row_stride + h * bp.dout_head_stride,
                   bp.out_dtype, kHeadDim, dout_row);
    for (int d = 0; d < kHeadDim; ++d) {
      s->q_t[d * kBlockQ + i] = q_row[d];
      s->dout_t[d * kBlockQ + i] = dout_row[d];
    }
    s->q_pos[i] = QueryPos(p, row);
    s->q_span[i] = AllowedKeySpan(p, s->q_pos[i]);
    const float lse = stats.lse[b * stats.lse_batch_stride + h * stats.lse_head_stride + row];
    // exp(s - +inf) = 0: a row with no allowed key anywhere gets P = 0, never exp(-inf + inf).
    s->lse[i] = lse == -kInf ? kInf : lse;
    s->delta[i] = stats.delta[b * stats.delta_batch_stride + h * stats.delta_head_stride + row];
  }
  if (rows == kBlockQ) return;
  std::fill(s->q.begin() + rows * kHeadDim, s->q.end(), 0.0f);
  std::fill(s->dout.begin() + rows * kHeadDim, s->dout.end(), 0.0f);
  for (int d = 0; d < kHeadDim; ++d) {
    std::fill(&s->q_t[d * kBlockQ + rows], &s->q_t[(d + 1) * kBlockQ], 0.0f);
    std::fill(&s->dout_t[d * kBlockQ + rows], &s->dout_t[(d + 1) * kBlockQ], 0.0f);
  }
}

// p_t = S^T = K Q^T and ds_t = dP^T = V dO^T over the padded block.
template <int kHeadDim>
void ComputeScoresAndProbGrads(int rows, int cols, Scratch<kHeadDim>* s) {
  const int m = static_cast<int>(RoundUp(cols, kMicroRows));
  const int n = static_cast<int>(RoundUp(rows, kMicroCols));
  MultiplyTiles<kHeadDim, /*kAccumulate=*/false>(s->k.data(), kHeadDim, s->q_t.data(), kBlockQ, m,
                                                 n, s->p_t.data(), kBlockQ);
  MultiplyTiles<kHeadDim, /*kAccumulate=*/false>(s->v.data(), kHeadDim, s->dout_t.data(), kBlockQ,
                                                 m, n, s->ds_t.data(), kBlockQ);
}

// One key row of the block: P^T and dS^T for the queries [lo, hi) of the row, from S^T and
// dP^T in place, with the score options as compile-time constants. Each variant is then a
// branch-free loop: with the option tests inside (even loop-invariant ones) GCC 12 vectorised
// none of the variants, and this pass took 22% of the backward at head_dim 64 (perf).
template <bool kSoftcap, bool kAlibi>
void ProbsAndScoreGradsOfKey(const AttentionParams& p, float slope, int64_t k_pos, int lo, int hi,
                             const int64_t* __restrict q_pos,  // [kBlockQ]
                             const float* __restrict lse,      // [kBlockQ]
                             const float* __restrict delta,    // [kBlockQ]
                             float* __restrict p_row,          // [kBlockQ]: S^T in, P^T out
                             float* __restrict ds_row) {       // [kBlockQ]: dP^T in, dS^T out
  const float scale = p.softmax_scale;
  const float cap = p.softcap;
  for (int i = lo; i < hi; ++i) {
    // ModScore (score_mod.h) in its order and fp32 arithmetic, so that the score, hence P, is
    // the forward's bit for bit; and its derivative with respect to q.k.
    float score = p_row[i] * scale;
    float dscore = scale;
    if constexpr (kSoftcap) {
      const float t = std::tanh(score / cap);
      score = cap * t;
      dscore = scale * (1.0f - t * t);
    }
    if constexpr (kAlibi) {
      const int64_t d = q_pos[i] > k_pos ? q_pos[i] - k_pos : k_pos - q_pos[i];
      score -= slope * static_cast<float>(d);
    }
    const float prob = ExpForSoftmax(score - lse[i]);
    ds_row[i] = prob * (ds_row[i] - delta[i]) * dscore;
    p_row[i] = prob;
  }
}

// The queries [lo, hi) of the block that key position k_pos is allowed for. They are
// contiguous: AllowedKeySpan's bounds never decrease as the query position grows, and query
// positions grow with the row.
struct QueryRange {
  int lo;
  int hi;
};

QueryRange AllowedQueries(int64_t k_pos, const KeySpan* q_span, int rows) {  // q_span: [rows]
  int lo = 0;
  while (lo < rows && !InSpan(q_span[lo], k_pos)) ++lo;
  int hi = lo;
  while (hi < rows && InSpan(q_span[hi], k_pos)) ++hi;
  return {lo, hi};
}

// Turns S^T into P^T and dP^T into dS^T (through the score mods' derivative), 0 for masked
// pairs, then zeroes the padding, so that the products below, which run over whole blocks, add
// exact zeros there.
template <int kHeadDim, bool kSoftcap, bool kAlibi>
void ProbsAndScoreGrads(const AttentionParams& p, int h, int rows, int cols, bool all_allowed,
                        Scratch<kHeadDim>* s) {
  const float slope = kAlibi ? p.alibi_slopes[h] : 0.0f;
  for (int j = 0; j < cols; ++j) {
    float* p_row = &s->p_t[j * kBlockQ];    // [kBlockQ]
    float* ds_row = &s->ds_t[j * kBlockQ];  // [kBlockQ]
    const int64_t k_pos = s->k_pos[j];
    const QueryRange r =
        all_allowed ? QueryRange{0, rows} : AllowedQueries(k_pos, s->q_span.data(), rows);
    ProbsAndScoreGradsOfKey<kSoftcap, kAlibi>(p, slope, k_pos, r.lo, r.hi, s->q_pos.data(),
                                              s->lse.data(), s->delta.data(), p_row, ds_row);
    std::fill(p_row, p_row + r.lo, 0.0f);
    std::fill(ds_row, ds_row + r.lo, 0.0f);
    std::fill(p_row + r.hi, p_row + kBlockQ, 0.0f);
    std::fill(ds_row + r.hi, ds_row + kBlockQ, 0.0f);
  }
  std::fill(s->p_t.begin() + cols * kBlockQ, s->p_t.end(), 0.0f);
  std::fill(s->ds_t.begin() + cols * kBlockQ, s->ds_t.end(), 0.0f);
}

// ProbsAndScoreGrads for the options of `params`.
template <int kHeadDim>
void ComputeProbsAndScoreGrads(const AttentionParams& params, int h, int rows, int cols,
                               bool all_allowed, Scratch<kHeadDim>* s) {
  // A local copy, so that the compiler knows stores to the scratch rows leave it unchanged.
  const AttentionParams p = params;
  const bool softcap = p.softcap > 0.0f;
  const bool alibi = p.alibi_slopes != nullptr;
  if (softcap && alibi) {
    ProbsAndScoreGrads<kHeadDim, true, true>(p, h, rows, cols, all_allowed, s);
  } else if (softcap) {
    ProbsAndScoreGrads<kHeadDim, true, false>(p, h, rows, cols, all_allowed, s);
  } else if (alibi) {
    ProbsAndScoreGrads<kHeadDim, false, true>(p, h, rows, cols, all_allowed, s);
  } else {
    ProbsAndScoreGrads<kHeadDim, false, false>(p, h, rows, cols, all_allowed, s);
  }
}

// Dropout (p.dropout_p > 0): with O = sum_j Z_j v_j, Z = P * m (m = DropoutFactor of the pair),
// dP = m (dO . v) (applied to dP^T before dS is formed) and dV = Z^T dO (applied to P^T after
// it); D = dO . O = sum_j P_j dP_j is unchanged. The block's m, [kBlockK keys, kBlockQ queries].
template <int kHeadDim>
void ComputeDropoutFactors(const AttentionParams& p, int b, int h, int rows, int cols,
                           Scratch<kHeadDim>* s) {
  for (int j = 0; j < cols; ++j) {
    float* row = &s->drop[j * kBlockQ];  // [kBlockQ]
    for (int i = 0; i < rows; ++i) row[i] = DropoutFactor(p, b, h, s->q_pos[i], s->k_pos[j]);
  }
}

// t [kBlockK, kBlockQ] *= the block's dropout factors, over its rows x cols.
template <int kHeadDim>
void ApplyDropoutFactors(int rows, int cols, const Scratch<kHeadDim>& s, std::vector<float>* t) {
  for (int j = 0; j < cols; ++j) {
    float* row = &(*t)[j * kBlockQ];        // [kBlockQ]
    const float* m = &s.drop[j * kBlockQ];  // [kBlockQ]
    for (int i = 0; i < rows; ++i) row[i] *= m[i];
  }
}

// dV += P^T dO and dK += dS^T Q into the item's accumulators; dq_t = dQ^T = K^T dS^T.
template <int kHeadDim>
void AccumulateGradients(int rows, int cols, Scratch<kHeadDim>* s) {
  const int m = static_cast<int>(RoundUp(cols, kMicroRows));
  MultiplyTiles<kBlockQ, /*kAccumulate=*/true>(s->p_t.data(), kBlockQ, s->dout.data(), kHeadDim, m,
                                               kHeadDim, s->dv.data(), kHeadDim);
  MultiplyTiles<kBlockQ, /*kAccumulate=*/true>(s->ds_t.data(), kBlockQ, s->q.data(), kHeadDim, m,
                                               kHeadDim, s->dk.data(), kHeadDim);
  MultiplyTiles<kBlockK, /*kAccumulate=*/false>(
      s->k_t.data(), kBlockK, s->ds_t.data(), kBlockQ, kHeadDim,
      static_cast<int>(RoundUp(rows, kMicroCols)), s->dq_t.data(), kBlockQ);
}

// dq rows [q0, q0 + rows) of head h += dq_t^T.
template <int kHeadDim>
void AddToDq(const AttentionBackwardParams& bp, int b, int h, int64_t q0, int rows,
             const Scratch<kHeadDim>& s) {
  for (int i = 0; i < rows; ++i) {
    float* dq =
        bp.dq + b * bp.dq_batch_stride + (q0 + i) * bp.dq_row_stride + h * bp.dq_head_stride;
    for (int d = 0; d < kHeadDim; ++d) dq[d] += s.dq_t[d * kBlockQ + i];
  }
}

// Writes (or adds) the item's dK and dV rows.
template <int kHeadDim>
void WriteKeyBlock(const AttentionBackwardParams& bp, const KeyBlock& kb,
                   const Scratch<kHeadDim>& s) {
  for (int j = 0; j < kb.cols; ++j) {
    const int64_t row = kb.k0 + j;
    float* dk = bp.dk + kb.b * bp.dk_batch_stride + row * bp.dk_row_stride +
                kb.kv_head * bp.dk_head_stride;  // [kHeadDim]
    float* dv = bp.dv + kb.b * bp.dv_batch_stride + row * bp.dv_row_stride +
                kb.kv_head * bp.dv_head_stride;  // [kHeadDim]
    const float* dk_acc = &s.dk[j * kHeadDim];
    const float* dv_acc = &s.dv[j * kHeadDim];
    for (int d = 0; d < kHeadDim; ++d) {
      dk[d] = bp.accumulate ? dk[d] + dk_acc[d] : dk_acc[d];
      dv[d] = bp.accumulate ? dv[d] + dv_acc[d] : dv_acc[d];
    }
  }
}

// Computes one work item end to end.
// Once `cancel` is set it computes nothing more but still takes and passes its dQ turns, so
// that no later key block waits for it.
template <int kHeadDim>
void ComputeKeyBlock(const AttentionBackwardParams& bp, const RowStats& stats, const KeyBlock& kb,
                     DqTurns* turns, const std::atomic<bool>* cancel, Scratch<kHeadDim>* s) {
  // A local copy: stores into the scratch buffers cannot change the options.
  const AttentionParams p = bp.fwd;
  StageKeyBlock<kHeadDim>(p, kb, s);
  std::fill(s->dk.begin(), s->dk.end(), 0.0f);
  std::fill(s->dv.begin(), s->dv.end(), 0.0f);

  const int group = p.heads / p.heads_k;
  const int64_t q_blocks = NumBlocks(p.seqlen_q, kBlockQ);
  for (int h = kb.kv_head * group; h < (kb.kv_head + 1) * group; ++h) {
    for (int64_t qb = 0; qb < q_blocks; ++qb) {
      const BlockMask mask = ClassifyBlocks(p, qb, kb.index);
      if (!mask.any) continue;  // every pair masked: no contribution, and no dQ turn to take
      if (Cancelled(cancel)) {
        turns->Wait(p, kb.b, h, qb, kb.index);
        turns->Pass(p, kb.b, h, qb, kb.index);
        continue;
      }
      const int64_t q0 = qb * kBlockQ;
      const int rows = static_cast<int>(std::min<int64_t>(kBlockQ, p.seqlen_q - q0));
      StageQueryBlock<kHeadDim>(bp, stats, kb.b, h, q0, rows, s);
      ComputeScoresAndProbGrads<kHeadDim>(rows, kb.cols, s);
      const bool dropout = p.dropout_p > 0.0f;
      if (dropout) {
        ComputeDropoutFactors<kHeadDim>(p, kb.b, h, rows, kb.cols, s);
        ApplyDropoutFactors<kHeadDim>(rows, kb.cols, *s, &s->ds_t);
      }
      ComputeProbsAndScoreGrads<kHeadDim>(p, h, rows, kb.cols, mask.all, s);
      if (dropout) ApplyDropoutFactors<kHeadDim>(rows, kb.cols, *s, &s->p_t);
      AccumulateGradients<kHeadDim>(rows, kb.cols, s);
      turns->Wait(p, kb.b, h, qb, kb.index);
      AddToDq<kHeadDim>(bp, kb.b, h, q0, rows, *s);
      turns->Pass(p, kb.b, h, qb, kb.index);
    }
  }
  if (!Cancelled(cancel)) WriteKeyBlock<kHeadDim>(bp, kb, *s);
}

// ---- Preprocessing --------------------------------------------------------------------------

// D of the rows of (b, h) into delta (with the given strides). The dot product in fp32, in
// order, rounded as the tiles round dP (DotLikeTiles): D is O(|dO| |O|) and only ever enters
// as dP - D, so fp32 is ample, and where O = V (one visible key) dP - D is exactly 0.
void ComputeDeltaRows(const AttentionBackwardParams& bp, int b, int h, float* delta,
                      int64_t delta_batch_stride, int64_t delta_head_stride,
                      std::vector<float>* row_buf) {  // [2 * head_dim]
  const int dim = bp.fwd.head_dim;
  float* out = row_buf->data();
  float* dout = out + dim;
  for (int64_t i = 0; i < bp.fwd.seqlen_q; ++i) {
    LoadRowAsFloat(bp.out, b * bp.out_batch_stride + i * bp.out_row_stride + h * bp.out_head_stride,
                   bp.out_dtype, dim, out);
    LoadRowAsFloat(bp.dout,
                   b * bp.dout_batch_stride + i * bp.dout_row_stride + h * bp.dout_head_stride,
                   bp.out_dtype, dim, dout);
    delta[b * delta_batch_stride + h * delta_head_stride + i] = DotLikeTiles(out, dout, dim);
  }
}

void ZeroDqRows(const AttentionBackwardParams& bp, int b, int h) {
  for (int64_t i = 0; i < bp.fwd.seqlen_q; ++i) {
    float* dq = bp.dq + b * bp.dq_batch_stride + i * bp.dq_row_stride + h * bp.dq_head_stride;
    std::fill(dq, dq + bp.fwd.head_dim, 0.0f);
  }
}

template <int kHeadDim>
void RunBackward(const AttentionBackwardParams& bp, int threads,
                 const std::atomic<bool>* cancel) {
  const AttentionParams& p = bp.fwd;
  const int64_t batch_heads = static_cast<int64_t>(p.batch) * p.heads;

  // 1. Preprocessing: D (into a contiguous [batch, heads, seqlen_q] buffer when not given) and
  // dq zeroed unless accumulating.
  RowStats stats;
  stats.lse = bp.lse;
  stats.lse_batch_stride = stats.delta_batch_stride = bp.lse_batch_stride;
  stats.lse_head_stride = stats.delta_head_stride = bp.lse_head_stride;
  stats.delta = bp.delta;
  std::vector<float> own_delta;
  if (bp.delta == nullptr) {
    own_delta.resize(static_cast<size_t>(batch_heads * p.seqlen_q));
    stats.delta = own_delta.data();
    stats.delta_head_stride = p.seqlen_q;
    stats.delta_batch_stride = p.seqlen_q * p.heads;
  }
  if (bp.delta == nullptr || !bp.accumulate) {
    cpu_tiles::RunWorkItems(
        batch_heads, threads, [&] { return std::vector<float>(2 * kHeadDim); },
        [&](int64_t item, std::vector<float>* row_buf) {
          const int b = static_cast<int>(item / p.heads), h = static_cast<int>(item % p.heads);
          if (bp.delta == nullptr) {
            ComputeDeltaRows(bp, b, h, own_delta.data(), stats.delta_batch_stride,
                             stats.delta_head_stride, row_buf);
          }
          if (!bp.accumulate) ZeroDqRows(bp, b, h);
        },
        cancel);
  }

  // 2. The key-block items.
  const int64_t q_blocks = NumBlocks(p.seqlen_q, kBlockQ);
  const int64_t k_blocks = NumBlocks(p.seqlen_k, kBlockK);
  DqTurns turns(p, q_blocks, k_blocks);
  cpu_tiles::RunWorkItems(
      k_blocks * p.batch * p.heads_k, threads, [] { return std::make_unique<Scratch<kHeadDim>>(); },
      [&](int64_t item, std::unique_ptr<Scratch<kHeadDim>>* scratch) {
        ComputeKeyBlock<kHeadDim>(bp, stats, ItemToKeyBlock(p, item), &turns, cancel,
                                  scratch->get());
      },
      cancel);
}

absl::Status CheckThreads(const FlashCpuOptions& options) {
  if (options.num_threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_threads must be >= 0 (0: hardware concurrency), got ", options.num_threads));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status FlashCpuBackward(const AttentionBackwardParams& p, const FlashCpuOptions& options) {
  RA_RETURN_IF_ERROR(ValidateBackwardParams(p));
  RA_RETURN_IF_ERROR(CheckThreads(options));
  const int threads = cpu_tiles::ResolveThreadCount(options.num_threads);
  switch (p.fwd.head_dim) {
    case 64:
      RunBackward<64>(p, threads, options.cancel);
      break;
    case 128:
      RunBackward<128>(p, threads, options.cancel);
      break;
    case 256:
      RunBackward<256>(p, threads, options.cancel);
      break;
    default:
      // ValidateParams admits exactly kSupportedHeadDims; this is a missing instantiation.
      return absl::InternalError(absl::StrCat("no CPU backward for head_dim ", p.fwd.head_dim));
  }
  if (Cancelled(options.cancel)) return absl::CancelledError("the CPU backward was cancelled");
  return absl::OkStatus();
}

absl::Status FlashCpuBackwardDelta(const AttentionBackwardParams& p, float* delta,
                                   const FlashCpuOptions& options) {
  RA_RETURN_IF_ERROR(CheckThreads(options));
  if (p.fwd.seqlen_q == 0) return absl::OkStatus();
  if (p.out == nullptr || p.dout == nullptr || delta == nullptr) {
    return absl::InvalidArgumentError("out, dout and delta must be non-null when seqlen_q > 0");
  }
  const AttentionParams& f = p.fwd;
  cpu_tiles::RunWorkItems(
      static_cast<int64_t>(f.batch) * f.heads, cpu_tiles::ResolveThreadCount(options.num_threads),
      [&] { return std::vector<float>(2 * f.head_dim); },
      [&](int64_t item, std::vector<float>* row_buf) {
        ComputeDeltaRows(p, static_cast<int>(item / f.heads), static_cast<int>(item % f.heads),
                         delta, p.lse_batch_stride, p.lse_head_stride, row_buf);
      },
      options.cancel);
  if (Cancelled(options.cancel)) return absl::CancelledError("the CPU backward was cancelled");
  return absl::OkStatus();
}

}  // namespace ringattn
