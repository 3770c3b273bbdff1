// The fast CPU forward.
//
// Schedule (FlashAttention's, on a CPU): a work item is one block of kBlockQ query rows of one
// (batch, head). A thread stages the item's Q tile in fp32 once, then walks the key blocks of
// kBlockK rows: K (transposed) and V staged in fp32 (kept per head for the thread's next query
// blocks: Scratch::HeadCache), S = Q K^T, score mods and mask, the online softmax per row
// through SoftmaxState/Combine (the same numerics as the ring's merge), and O += P V. The
// epilogue normalises each row and writes or merges it.
//
// Vectorisation: both products go through MultiplyTiles (cpu_tiles.h, shared with the
// backward: AVX-512 or AVX2 intrinsics chosen at run time, else SSE), and the score and
// softmax steps are compiled for AVX-512, AVX2 and the baseline, chosen once per process.
// Every output element accumulates its terms in a fixed order, so results do not depend on
// the thread count (a row is always computed by one thread, the same way). Measurements:
// docs/performance.md, "CPU kernel".
//
// Non-finite inputs follow the reference's rules (reference_attention.h): ModScore turns a
// score fp32 cannot hold into NaN, the row maximum keeps a NaN, and SoftmaxState carries it to
// the row's output and LSE; a NaN or infinite V row of a partly visible block reaches only the
// rows that see its key.
#include "kernels/cpu/flash_cpu.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cpu/cpu_tiles.h"
#include "kernels/params_check.h"
#include "kernels/score_mod.h"
#include "kernels/softmax_state.h"

namespace ringattn {
namespace {

using cpu_tiles::kMicroCols;
using cpu_tiles::kMicroRows;
using cpu_tiles::LoadRowAsFloat;
using cpu_tiles::MultiplyTiles;
using cpu_tiles::RoundUp;
using cpu_tiles::StoreRowFromFloat;

constexpr int kBlockQ = 128;  // query rows per work item (Br)
// Key rows per inner step (Bc) for a head dim: 128 at d64, where the softmax step's per-row
// costs weigh most, 64 above, where 128 lost (docs/performance.md, CPU kernel v8).
template <int kHeadDim>
constexpr int BlockK() {
  return kHeadDim <= 64 ? 128 : 64;
}
constexpr int kMaxBlockK = 128;
static_assert(kBlockQ % kMicroRows == 0 && BlockK<256>() % kMicroCols == 0);

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- Per-thread state -----------------------------------------------------------------------

// Staging buffers of one thread, allocated once per call and reused for every block.
struct Scratch {
  Scratch(int head_dim, int block_k_)
      : block_k(block_k_),
        q(kBlockQ * head_dim),
        k_t(head_dim * block_k_),
        v(block_k_ * head_dim),
        s(kBlockQ * block_k_),
        acc(kBlockQ * head_dim),
        k_row(head_dim) {}

  int block_k;           // kBlockK of the call's head dim (BlockK)
  std::vector<float> q;  // [kBlockQ, head_dim]
  // [head_dim, kBlockK]: the K tile transposed, so that S = Q K^T reads contiguous columns.
  std::vector<float> k_t;
  std::vector<float> v;      // [kBlockK, head_dim]
  std::vector<float> s;      // [kBlockQ, kBlockK]: scores, then the block's probabilities
  std::vector<float> acc;    // [kBlockQ, head_dim]: un-normalised output rows
  std::vector<float> k_row;  // [head_dim]: one K row before transposing
  std::array<SoftmaxState, kBlockQ> state;  // [kBlockQ]: running (m, l) per query row
  std::array<int64_t, kBlockQ> q_pos;       // [kBlockQ]: global positions of the query rows
  std::array<int64_t, kMaxBlockK> k_pos;    // [kBlockK]: global positions of the key rows

  // The key block in hand, staged (StageKeyValueTiles): k_t and v above, or a block of the
  // head cache below. v_block may be rewritten (non-finite rows): only ever in k_t/v's place.
  const float* kt_block = nullptr;  // [head_dim, kBlockK]
  float* v_block = nullptr;         // [kBlockK, head_dim]

  // Every staged key block of one (batch, K/V head), kept for the thread's next query blocks of
  // that head (and of the other query heads of its GQA group): a query block would otherwise
  // stage and transpose each key block again. Lives for one call (as the scratch does).
  struct HeadCache {
    int64_t head = -1;           // batch * heads_k + kv_head staged here; -1: none
    std::vector<float> k_t;      // [blocks, head_dim, kBlockK]
    std::vector<float> v;        // [blocks, kBlockK, head_dim]
    std::vector<uint8_t> staged; // [blocks]: whether block i is in place
  } cache;
};

// The head cache's size bound per thread, in floats (32 MiB): heads longer than this stage
// each key block per query block instead.
constexpr int64_t kHeadCacheFloats = int64_t{8} << 20;

// One work item: `rows` query rows starting at `row0` of head `h` in batch `b`.
struct QueryBlock {
  int b;
  int h;
  int kv_head;  // the K/V head this query head reads (GQA)
  int64_t row0;
  int rows;
};

// Work items are numbered batch-major, then head, then query block.
QueryBlock ItemToQueryBlock(const AttentionParams& p, int64_t item, int64_t q_blocks) {
  QueryBlock qb;
  const int64_t block = item % q_blocks;
  const int64_t bh = item / q_blocks;
  qb.b = static_cast<int>(bh / p.heads);
  qb.h = static_cast<int>(bh % p.heads);
  qb.kv_head = qb.h / (p.heads / p.heads_k);
  qb.row0 = block * kBlockQ;
  qb.rows = static_cast<int>(std::min<int64_t>(kBlockQ, p.seqlen_q - qb.row0));
  return qb;
}

// ---- Steps of one query block ---------------------------------------------------------------

// Loads the block's Q rows into scratch->q, zeroing the padding rows up to a whole micro tile
// (they take part in the products but are never written out), and records the positions.
template <int kHeadDim>
void StageQueryTile(const AttentionParams& p, const QueryBlock& qb, Scratch* scratch) {
  const int padded_rows = static_cast<int>(RoundUp(qb.rows, kMicroRows));
  for (int i = 0; i < qb.rows; ++i) {
    const int64_t row = qb.row0 + i;
    const int64_t offset = qb.b * p.q_batch_stride + row * p.q_row_stride + qb.h * p.q_head_stride;
    LoadRowAsFloat(p.q, offset, p.dtype, kHeadDim, &scratch->q[i * kHeadDim]);
    scratch->q_pos[i] = QueryPos(p, row);
  }
  std::fill(scratch->q.begin() + qb.rows * kHeadDim, scratch->q.begin() + padded_rows * kHeadDim,
            0.0f);
}

// Loads key rows [k0, k0 + cols) into k_t (transposed, [kHeadDim, kBlockK]) and v
// ([kBlockK, kHeadDim]), and their positions into scratch->k_pos. In a short last block, K's
// padding columns up to a whole micro tile are zeroed so that their (ignored) scores stay
// finite, and V's padding rows so that P V can always run over kBlockK keys.
template <int kHeadDim>
void StageKeyValueInto(const AttentionParams& p, const QueryBlock& qb, int64_t k0, int cols,
                       float* k_t, float* v, Scratch* scratch) {
  constexpr int kBlockK = BlockK<kHeadDim>();
  for (int j = 0; j < cols; ++j) {
    const int64_t row = k0 + j;
    const int64_t k_offset =
        qb.b * p.k_batch_stride + row * p.k_row_stride + qb.kv_head * p.k_head_stride;
    LoadRowAsFloat(p.k, k_offset, p.dtype, kHeadDim, scratch->k_row.data());
    for (int d = 0; d < kHeadDim; ++d) k_t[d * kBlockK + j] = scratch->k_row[d];
    const int64_t v_offset =
        qb.b * p.v_batch_stride + row * p.v_row_stride + qb.kv_head * p.v_head_stride;
    LoadRowAsFloat(p.v, v_offset, p.dtype, kHeadDim, &v[j * kHeadDim]);
  }
  if (cols == kBlockK) return;
  const int padded_cols = static_cast<int>(RoundUp(cols, kMicroCols));
  for (int d = 0; d < kHeadDim; ++d) {
    std::fill(k_t + d * kBlockK + cols, k_t + d * kBlockK + padded_cols, 0.0f);
  }
  std::fill(v + cols * kHeadDim, v + kBlockK * kHeadDim, 0.0f);
}

// Points scratch->kt_block and v_block at the key block from k0 (cols keys), staged: from the
// head cache when the head fits it (staging the block there on its first use), else into
// scratch->k_t and v; fills scratch->k_pos.
template <int kHeadDim>
void StageKeyValueTiles(const AttentionParams& p, const QueryBlock& qb, int64_t k0, int cols,
                        Scratch* scratch) {
  constexpr int kBlockK = BlockK<kHeadDim>();
  for (int j = 0; j < cols; ++j) scratch->k_pos[j] = KeyPos(p, k0 + j);
  const int64_t blocks = (p.seqlen_k + kBlockK - 1) / kBlockK;
  if (blocks * kBlockK * kHeadDim * 2 > kHeadCacheFloats) {
    StageKeyValueInto<kHeadDim>(p, qb, k0, cols, scratch->k_t.data(), scratch->v.data(), scratch);
    scratch->kt_block = scratch->k_t.data();
    scratch->v_block = scratch->v.data();
    return;
  }
  Scratch::HeadCache& c = scratch->cache;
  const int64_t head = static_cast<int64_t>(qb.b) * p.heads_k + qb.kv_head;
  if (c.head != head) {
    c.head = head;
    c.k_t.resize(static_cast<size_t>(blocks) * kHeadDim * kBlockK);
    c.v.resize(static_cast<size_t>(blocks) * kBlockK * kHeadDim);
    c.staged.assign(static_cast<size_t>(blocks), 0);
  }
  const int64_t block = k0 / kBlockK;
  float* k_t = &c.k_t[static_cast<size_t>(block) * kHeadDim * kBlockK];
  float* v = &c.v[static_cast<size_t>(block) * kBlockK * kHeadDim];
  if (!c.staged[static_cast<size_t>(block)]) {
    StageKeyValueInto<kHeadDim>(p, qb, k0, cols, k_t, v, scratch);
    c.staged[static_cast<size_t>(block)] = 1;
  }
  scratch->kt_block = k_t;
  scratch->v_block = v;
}

// scratch->s = Q K^T (raw dot products) for the padded block.
template <int kHeadDim>
void ComputeDotProducts(int rows, int cols, Scratch* scratch) {
  constexpr int kBlockK = BlockK<kHeadDim>();
  MultiplyTiles<kHeadDim, /*kAccumulate=*/false>(
      scratch->q.data(), kHeadDim, scratch->kt_block, kBlockK,
      static_cast<int>(RoundUp(rows, kMicroRows)), static_cast<int>(RoundUp(cols, kMicroCols)),
      scratch->s.data(), kBlockK);
}

// Turns the raw dot products into scores: ModScore everywhere, and -inf for masked pairs when
// the block is only partially allowed (a fully allowed block skips the per-element mask test).
// Without softcap and ALiBi a score is NanUnlessFinite(dot * scale) (ModScore's own first
// step), written out so that the loop vectorises.
inline __attribute__((always_inline)) void ApplyScoreModsAndMaskBody(
    const AttentionParams& params, const QueryBlock& qb, int cols, bool all_allowed,
    Scratch* scratch) {
  // A local copy, so that the compiler may hoist ModScore's option tests out of the loops
  // (stores to the score row could otherwise alias the softcap through the reference).
  const AttentionParams p = params;
  const bool plain = p.softcap <= 0.0f && p.alibi_slopes == nullptr;
  const float scale = p.softmax_scale;
  for (int i = 0; i < qb.rows; ++i) {
    float* s_row = &scratch->s[i * scratch->block_k];  // [kBlockK]
    const int64_t q_pos = scratch->q_pos[i];
    const int64_t* k_pos = scratch->k_pos.data();  // [kBlockK]
    if (all_allowed && plain) {
      for (int j = 0; j < cols; ++j) s_row[j] = NanUnlessFinite(s_row[j] * scale);
    } else if (all_allowed) {
      for (int j = 0; j < cols; ++j) s_row[j] = ModScore(p, qb.h, s_row[j], q_pos, k_pos[j]);
    } else if (plain) {
      const KeySpan span = AllowedKeySpan(p, q_pos);  // once per row, not per key
      for (int j = 0; j < cols; ++j) {
        const float score = NanUnlessFinite(s_row[j] * scale);
        s_row[j] = InSpan(span, k_pos[j]) ? score : kNegInf;
      }
    } else {
      const KeySpan span = AllowedKeySpan(p, q_pos);
      for (int j = 0; j < cols; ++j) {
        s_row[j] =
            InSpan(span, k_pos[j]) ? ModScore(p, qb.h, s_row[j], q_pos, k_pos[j]) : kNegInf;
      }
    }
  }
}

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"))) void
ApplyScoreModsAndMaskAvx512(const AttentionParams& p, const QueryBlock& qb, int cols,
                            bool all_allowed, Scratch* scratch) {
  ApplyScoreModsAndMaskBody(p, qb, cols, all_allowed, scratch);
}
#endif

// ApplyScoreModsAndMaskBody, 16-wide where the machine has AVX-512.
void ApplyScoreModsAndMask(const AttentionParams& p, const QueryBlock& qb, int cols,
                           bool all_allowed, Scratch* scratch) {
#if defined(__x86_64__)
  if (cpu_tiles::HasAvx512()) {
    ApplyScoreModsAndMaskAvx512(p, qb, cols, all_allowed, scratch);
    return;
  }
#endif
  ApplyScoreModsAndMaskBody(p, qb, cols, all_allowed, scratch);
}

// Lane-parallel reductions over a score row. kReduceLanes independent partial results fit in
// two SSE registers and let the compiler vectorise; the order of operations is fixed, so the
// result does not depend on anything but the row.
constexpr int kReduceLanes = 8;

// max(m, x), NaN once either is NaN: a row whose only visible score is NaN must not look
// wholly masked (-inf).
inline float MaxKeepingNan(float m, float x) { return x > m || x != x ? x : m; }

// The lanes take a plain maximum (x > m ? x : m, one maxps per vector) and note NaN apart (an
// unordered compare), so that the loop vectorises; MaxKeepingNan's select on `x != x` kept it
// scalar (a third of the forward's time at d64).
inline __attribute__((always_inline)) float MaxOfRow(const float* x, int n) {  // x: [n]
  float lanes[kReduceLanes];
  uint32_t nan[kReduceLanes] = {};
  std::fill(lanes, lanes + kReduceLanes, kNegInf);
  int j = 0;
  for (; j + kReduceLanes <= n; j += kReduceLanes) {
    for (int l = 0; l < kReduceLanes; ++l) {
      const float v = x[j + l];
      lanes[l] = v > lanes[l] ? v : lanes[l];
      nan[l] |= v != v ? 1u : 0u;
    }
  }
  float m = kNegInf;
  uint32_t any_nan = 0;
  for (int l = 0; l < kReduceLanes; ++l) {
    m = lanes[l] > m ? lanes[l] : m;
    any_nan |= nan[l];
  }
  for (; j < n; ++j) m = MaxKeepingNan(m, x[j]);
  return any_nan != 0 ? std::numeric_limits<float>::quiet_NaN() : m;
}

inline __attribute__((always_inline)) float SumOfRow(const float* x, int n) {  // x: [n]
  float lanes[kReduceLanes] = {};
  int j = 0;
  for (; j + kReduceLanes <= n; j += kReduceLanes) {
    for (int l = 0; l < kReduceLanes; ++l) lanes[l] += x[j + l];
  }
  float sum = 0.0f;
  for (int l = 0; l < kReduceLanes; ++l) sum += lanes[l];
  for (; j < n; ++j) sum += x[j];
  return sum;
}

// `Rows` gives the row reductions: PortableRows (the lane loops above, vectorised by the
// compiler) or, on AVX-512, Avx512Rows (one vector each, reduced in registers).
struct PortableRows {
  static inline __attribute__((always_inline)) float Max(const float* x, int n) {
    return MaxOfRow(x, n);
  }
  static inline __attribute__((always_inline)) float Sum(const float* x, int n) {
    return SumOfRow(x, n);
  }
};

#if defined(__x86_64__)
// MaxOfRow and SumOfRow on 16-float vectors with a masked tail: the maximum as one vector of
// maxima and NaN noted apart by an unordered compare, the sum as one vector of partial sums,
// each reduced once. (The portable lanes' final reductions ran in scalar code, a tenth of the
// forward.)
struct Avx512Rows {
  static __attribute__((target("avx512f"))) float Max(const float* x,
                                                                            int n) {
    const __m512 ninf = _mm512_set1_ps(kNegInf);
    __m512 m = ninf;
    __mmask16 nan = 0;
    int j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + j);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      m = _mm512_max_ps(m, v);
    }
    if (j < n) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1);
      const __m512 v = _mm512_mask_loadu_ps(ninf, k, x + j);
      nan |= _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q);
      m = _mm512_max_ps(m, v);
    }
    const float r = _mm512_reduce_max_ps(m);
    return nan != 0 ? std::numeric_limits<float>::quiet_NaN() : r;
  }
  static __attribute__((target("avx512f"))) float Sum(const float* x,
                                                                            int n) {
    __m512 acc = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= n; j += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + j));
    if (j < n) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1);
      acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(k, x + j));
    }
    return _mm512_reduce_add_ps(acc);
  }
};
#endif

// The online-softmax step of each row: the block's maximum is combined into the running state
// by Combine, which gives the factor that rescales the running accumulator (a); the block's
// probabilities are then taken against the new maximum and their sum added to the state.
// Afterwards scratch->s holds them, ready for P V. A row with every key of the block masked
// contributes nothing: its probabilities are zeroed and its state and accumulator are left as
// they are.
template <int kHeadDim, typename Rows = PortableRows>
inline __attribute__((always_inline)) void UpdateSoftmaxStateBody(int rows, int cols,
                                                                  Scratch* scratch) {
  constexpr int kBlockK = BlockK<kHeadDim>();
  for (int i = 0; i < rows; ++i) {
    float* s_row = &scratch->s[i * kBlockK];  // [kBlockK]
    const float block_max = Rows::Max(s_row, cols);
    if (block_max == kNegInf) {
      // exp(-inf - -inf) would be NaN; nothing of this row is allowed in this block.
      std::fill(s_row, s_row + cols, 0.0f);
      continue;
    }
    // The new running maximum first (Combine with an empty sum: l becomes l * a), then the
    // probabilities against it directly, as the GPU kernel does, and their sum added to l.
    const CombineScales scales = Combine(&scratch->state[i], SoftmaxState{block_max, 0.0f});
    const float m = scratch->state[i].m;
    for (int j = 0; j < cols; ++j) s_row[j] = ExpForSoftmax(s_row[j] - m);
    scratch->state[i].l += Rows::Sum(s_row, cols);
    if (scales.a != 1.0f) {  // the maximum moved (or is NaN): rescale the accumulator
      float* acc_row = &scratch->acc[i * kHeadDim];  // [kHeadDim]
      for (int d = 0; d < kHeadDim; ++d) acc_row[d] *= scales.a;
    }
  }
}

// UpdateSoftmaxStateBody compiled three times: for AVX-512 (16-wide, its own reductions), for
// AVX2 and FMA (8-wide) where the machine has them, and for the baseline (SSE); a process uses
// one throughout, as MultiplyTiles does (fused multiply-adds and sums in other orders round
// differently).
#if defined(__x86_64__)
template <int kHeadDim>
__attribute__((target("avx2,fma"))) void UpdateSoftmaxStateAvx2(int rows, int cols,
                                                                 Scratch* scratch) {
  UpdateSoftmaxStateBody<kHeadDim>(rows, cols, scratch);
}
template <int kHeadDim>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"))) void
UpdateSoftmaxStateAvx512(int rows, int cols, Scratch* scratch) {
  UpdateSoftmaxStateBody<kHeadDim, Avx512Rows>(rows, cols, scratch);
}
#endif
template <int kHeadDim>
void UpdateSoftmaxState(int rows, int cols, Scratch* scratch) {
#if defined(__x86_64__)
  if (cpu_tiles::HasAvx512()) {
    UpdateSoftmaxStateAvx512<kHeadDim>(rows, cols, scratch);
    return;
  }
  if (cpu_tiles::HasAvx2Fma()) {
    UpdateSoftmaxStateAvx2<kHeadDim>(rows, cols, scratch);
    return;
  }
#endif
  UpdateSoftmaxStateBody<kHeadDim>(rows, cols, scratch);
}

// Dropout (p.dropout_p > 0): each probability of the block times DropoutFactor of its pair,
// after UpdateSoftmaxState summed them (the softmax's normaliser is dropout's input, not its
// output) and before P V.
void ApplyDropout(const AttentionParams& p, const QueryBlock& qb, int64_t k0, int cols,
                  Scratch* scratch) {
  for (int i = 0; i < qb.rows; ++i) {
    float* s_row = &scratch->s[i * scratch->block_k];  // [kBlockK]
    const int64_t q_pos = QueryPos(p, qb.row0 + i);
    for (int j = 0; j < cols; ++j) {
      if (s_row[j] != 0.0f) s_row[j] *= DropoutFactor(p, qb.b, qb.h, q_pos, KeyPos(p, k0 + j));
    }
  }
}

// Whether every one of n floats is finite (no NaN, no infinity).
bool AllFinite(const float* x, int n) {  // x: [n]
  uint32_t special = 0;                  // any element with an all-ones exponent
  for (int i = 0; i < n; ++i) special |= (FloatBits(x[i]) & 0x7f800000u) == 0x7f800000u;
  return special == 0;
}

// A partly visible block whose V holds a NaN or an infinity: P V would add 0 * inf = NaN into
// the rows that cannot see that key. Each such V row is added here to the rows that see it
// only (its probability times the row, IEEE: 0 * inf = NaN is the contract for a visible key),
// then zeroed for P V. A wholly visible block needs nothing: every row sees every key.
// A block from the head cache is copied into scratch->v first: the cache keeps the rows as
// they are for the query blocks that see them.
template <int kHeadDim>
void AddNonFiniteValuesToVisibleRows(const AttentionParams& p, const QueryBlock& qb, int cols,
                                     Scratch* scratch) {
  constexpr int kBlockK = BlockK<kHeadDim>();
  if (AllFinite(scratch->v_block, cols * kHeadDim)) return;
  if (scratch->v_block != scratch->v.data()) {
    std::copy(scratch->v_block, scratch->v_block + kBlockK * kHeadDim, scratch->v.begin());
    scratch->v_block = scratch->v.data();
  }
  for (int j = 0; j < cols; ++j) {
    float* v_row = &scratch->v_block[j * kHeadDim];  // [kHeadDim]
    if (AllFinite(v_row, kHeadDim)) continue;
    for (int i = 0; i < qb.rows; ++i) {
      if (!KeyAllowed(p, scratch->q_pos[i], scratch->k_pos[j])) continue;
      const float prob = scratch->s[i * kBlockK + j];
      float* acc_row = &scratch->acc[i * kHeadDim];  // [kHeadDim]
      for (int d = 0; d < kHeadDim; ++d) acc_row[d] += prob * v_row[d];
    }
    std::fill(v_row, v_row + kHeadDim, 0.0f);
  }
}

// acc += P V over the block's keys. Always kBlockK deep: in a short last block the padding
// probabilities and V rows are zero, which adds exact zeros.
template <int kHeadDim>
void AccumulateValues(int rows, int cols, Scratch* scratch) {
  constexpr int kBlockK = BlockK<kHeadDim>();
  if (cols < kBlockK) {
    // The padding columns of S hold stale values (or none were computed); P must be 0 there.
    const int padded_rows = static_cast<int>(RoundUp(rows, kMicroRows));
    for (int i = 0; i < padded_rows; ++i) {
      std::fill(&scratch->s[i * kBlockK + cols], &scratch->s[(i + 1) * kBlockK], 0.0f);
    }
  }
  MultiplyTiles<kBlockK, /*kAccumulate=*/true>(
      scratch->s.data(), kBlockK, scratch->v_block, kHeadDim,
      static_cast<int>(RoundUp(rows, kMicroRows)), kHeadDim, scratch->acc.data(), kHeadDim);
}

// Normalises each finished row and writes (or merges) it with its LSE.
template <int kHeadDim>
void WriteQueryBlock(const AttentionParams& p, const QueryBlock& qb, Scratch* scratch) {
  for (int i = 0; i < qb.rows; ++i) {
    const SoftmaxState& state = scratch->state[i];
    const float norm = StateNormalizer(state);
    float* acc_row = &scratch->acc[i * kHeadDim];  // [kHeadDim]
    for (int d = 0; d < kHeadDim; ++d) acc_row[d] *= norm;
    WriteOutputRow(p, qb.b, qb.h, qb.row0 + i, acc_row, StateLse(state));
  }
}

// Computes one work item end to end; stops without writing once `cancel` is set.
template <int kHeadDim>
void ComputeQueryBlock(const AttentionParams& params, const QueryBlock& qb,
                       const std::atomic<bool>* cancel, Scratch* scratch) {
  constexpr int kBlockK = BlockK<kHeadDim>();
  // A local copy: the compiler then knows that stores into the scratch buffers cannot change
  // the options, and can hoist their tests out of the per-element loops.
  const AttentionParams p = params;
  StageQueryTile<kHeadDim>(p, qb, scratch);
  std::fill(scratch->state.begin(), scratch->state.end(), SoftmaxState{});
  std::fill(scratch->acc.begin(), scratch->acc.end(), 0.0f);

  const int64_t q_lo = QueryPos(p, qb.row0);
  const int64_t q_hi = QueryPos(p, qb.row0 + qb.rows - 1);
  for (int64_t k0 = 0; k0 < p.seqlen_k; k0 += kBlockK) {
    if (Cancelled(cancel)) return;
    const int cols = static_cast<int>(std::min<int64_t>(kBlockK, p.seqlen_k - k0));
    const BlockMask mask = ClassifyBlock(p, q_lo, q_hi, KeyPos(p, k0), KeyPos(p, k0 + cols - 1));
    if (!mask.any) continue;  // every pair masked: the block contributes nothing
    StageKeyValueTiles<kHeadDim>(p, qb, k0, cols, scratch);
    ComputeDotProducts<kHeadDim>(qb.rows, cols, scratch);
    ApplyScoreModsAndMask(p, qb, cols, mask.all, scratch);
    UpdateSoftmaxState<kHeadDim>(qb.rows, cols, scratch);
    if (p.dropout_p > 0.0f) ApplyDropout(p, qb, k0, cols, scratch);
    if (!mask.all) AddNonFiniteValuesToVisibleRows<kHeadDim>(p, qb, cols, scratch);
    AccumulateValues<kHeadDim>(qb.rows, cols, scratch);
  }
  WriteQueryBlock<kHeadDim>(p, qb, scratch);
}

// ---- Threading ------------------------------------------------------------------------------

// Runs every work item on `num_threads` threads (cpu_tiles::RunWorkItems). Which thread takes
// an item does not change its result.
template <int kHeadDim>
void RunAllQueryBlocks(const AttentionParams& p, int num_threads,
                       const std::atomic<bool>* cancel) {
  const int64_t q_blocks = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const int64_t num_items = static_cast<int64_t>(p.batch) * p.heads * q_blocks;
  cpu_tiles::RunWorkItems(
      num_items, num_threads, [] { return Scratch(kHeadDim, BlockK<kHeadDim>()); },
      [&](int64_t item, Scratch* scratch) {
        ComputeQueryBlock<kHeadDim>(p, ItemToQueryBlock(p, item, q_blocks), cancel, scratch);
      },
      cancel);
}

}  // namespace

void WriteOutputRow(const AttentionParams& p, int b, int h, int64_t row,
                    const float* o_row,  // [head_dim]
                    float lse) {
  const int64_t o_offset = b * p.o_batch_stride + row * p.o_row_stride + h * p.o_head_stride;
  // lse: [batch, heads, seqlen_q], the seqlen_q axis contiguous.
  float* lse_slot =
      p.lse == nullptr ? nullptr : p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + row;
  if (!p.merge_into_output && p.partial_o != nullptr) {
    // Merged with the read-only partial, then written: the partial (o_acc, lse_acc) as the
    // ring's last step hands it over, with o's and lse's strides.
    const float old_lse = p.partial_lse[b * p.lse_batch_stride + h * p.lse_head_stride + row];
    const float* old_o = p.partial_o + o_offset;  // [head_dim] fp32
    std::array<float, 256> merged;  // head_dim <= 256 by validation
    float merged_lse = old_lse;
    if (lse == kNegInf) {
      // Nothing added here: the partial as it is (o = 0 for an empty one, never read).
      for (int d = 0; d < p.head_dim; ++d) merged[d] = old_lse == kNegInf ? 0.0f : old_o[d];
    } else {
      const LseMerge merge = MergeLse(old_lse, lse);
      for (int d = 0; d < p.head_dim; ++d) {
        // An empty partial's o is not read; a negligible one's is (0 * NaN is NaN: a NaN or an
        // infinity of v reaches the rows that see its key however small its weight).
        merged[d] = merge.wb * o_row[d] + (old_lse == kNegInf ? 0.0f : merge.wa * old_o[d]);
      }
      merged_lse = merge.lse;
    }
    StoreRowFromFloat(merged.data(), p.o, o_offset, p.o_dtype, p.head_dim);
    if (lse_slot != nullptr) *lse_slot = merged_lse;
    return;
  }
  if (!p.merge_into_output) {
    StoreRowFromFloat(o_row, p.o, o_offset, p.o_dtype, p.head_dim);
    if (lse_slot != nullptr) *lse_slot = lse;
    return;
  }
  // Nothing to add: leave the existing partial bit for bit as it is.
  if (lse == kNegInf) return;
  const float old_lse = *lse_slot;
  const LseMerge merge = MergeLse(old_lse, lse);
  float* o = static_cast<float*>(p.o) + o_offset;  // [head_dim], fp32 by validation
  if (old_lse == kNegInf) {
    // The existing partial is empty: its o is not read, so that a buffer never written cannot
    // leak NaN into the result. (A merely negligible one is read: 0 * NaN is NaN, as above.)
    for (int d = 0; d < p.head_dim; ++d) o[d] = merge.wb * o_row[d];
  } else {
    for (int d = 0; d < p.head_dim; ++d) o[d] = merge.wa * o[d] + merge.wb * o_row[d];
  }
  *lse_slot = merge.lse;
}

absl::Status FlashCpuForward(const AttentionParams& p, const FlashCpuOptions& options) {
  RA_RETURN_IF_ERROR(ValidateParams(p));
  if (options.num_threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_threads must be >= 0 (0: hardware concurrency), got ", options.num_threads));
  }
  if (p.seqlen_q == 0) return absl::OkStatus();  // no rows to write
  const int threads = cpu_tiles::ResolveThreadCount(options.num_threads);
  switch (p.head_dim) {
    case 64:
      RunAllQueryBlocks<64>(p, threads, options.cancel);
      break;
    case 128:
      RunAllQueryBlocks<128>(p, threads, options.cancel);
      break;
    case 256:
      RunAllQueryBlocks<256>(p, threads, options.cancel);
      break;
    default:
      // ValidateParams admits exactly kSupportedHeadDims; this is a missing instantiation.
      return absl::InternalError(absl::StrCat("no CPU kernel for head_dim ", p.head_dim));
  }
  if (Cancelled(options.cancel)) return absl::CancelledError("the CPU kernel was cancelled");
  return absl::OkStatus();
}

}  // namespace ringattn
