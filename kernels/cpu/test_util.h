// Helpers shared by the CPU kernel tests: typed host buffers, random inputs, NaN poisoning and
// tolerance checks against the fp64 reference (on top of kernels/error_metrics.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/attention_params.h"
#include "kernels/dtype.h"
#include "kernels/params_check.h"

namespace ringattn::kernel_testing {

// Sizes and dtypes of one call, default scale 1/sqrt(head_dim), no options, no tensors.
inline AttentionParams Shape(int64_t seqlen_q, int64_t seqlen_k, int heads, int heads_k,
                             int head_dim, DType dtype = DType::kBF16, DType o_dtype = DType::kBF16,
                             int batch = 1) {
  AttentionParams p;
  p.batch = batch;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.heads = heads;
  p.heads_k = heads_k;
  p.head_dim = head_dim;
  p.dtype = dtype;
  p.o_dtype = o_dtype;
  p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  return p;
}
// Options on a params value, for building test cases as expressions:
// Causal(Window(Shape(...), 8, 0)).
inline AttentionParams Causal(AttentionParams p) {
  p.causal = true;
  return p;
}
inline AttentionParams Window(AttentionParams p, int64_t left, int64_t right) {
  p.window_left = left;
  p.window_right = right;
  return p;
}
// Query row i at q_offset + i * q_stride, key row j at k_offset + j * k_stride.
inline AttentionParams Positions(AttentionParams p, int64_t q_offset, int64_t q_stride,
                                 int64_t k_offset, int64_t k_stride) {
  p.q_pos_offset = q_offset;
  p.q_pos_stride = q_stride;
  p.k_pos_offset = k_offset;
  p.k_pos_stride = k_stride;
  return p;
}
inline AttentionParams Dropout(AttentionParams p, float rate, uint64_t seed) {
  p.dropout_p = rate;
  p.dropout_seed = seed;
  return p;
}
inline AttentionParams Softcap(AttentionParams p, float cap) {
  p.softcap = cap;
  return p;
}
// Multiplies the softmax scale, for sharper (more peaked) distributions.
inline AttentionParams Sharpen(AttentionParams p, float factor) {
  p.softmax_scale *= factor;
  return p;
}

// Two runs of positions (a zigzag shard in one call): rows from q_split sit at q_offset2..,
// keys from k_split at k_offset2.., the first runs' offsets and strides unchanged.
// Packed variable-length sequences with these bounds (positions). The bounds live as long as
// the test program (test case tables hold the params).
inline AttentionParams Packed(AttentionParams p, std::vector<int64_t> bounds) {
  static std::deque<std::vector<int64_t>>* const store = new std::deque<std::vector<int64_t>>;
  store->push_back(std::move(bounds));
  p.seq_bounds = store->back().data();
  p.num_seqs = static_cast<int>(store->back().size()) - 1;
  return p;
}
inline AttentionParams Runs(AttentionParams p, int64_t q_split, int64_t q_offset2, int64_t k_split,
                            int64_t k_offset2) {
  p.q_pos_split = q_split;
  p.q_pos_offset2 = q_offset2;
  p.k_pos_split = k_split;
  p.k_pos_offset2 = k_offset2;
  return p;
}

// Points `part` at keys [begin, end) of `whole`: the K/V pointers move down the rows and the
// key positions keep their global values.
inline AttentionParams KeyRange(const AttentionParams& whole, int64_t begin, int64_t end) {
  AttentionParams part = whole;
  part.seqlen_k = end - begin;
  part.k = static_cast<const char*>(whole.k) + begin * whole.k_row_stride * DTypeSize(whole.dtype);
  part.v = static_cast<const char*>(whole.v) + begin * whole.v_row_stride * DTypeSize(whole.dtype);
  part.k_pos_offset = whole.k_pos_offset + begin * whole.k_pos_stride;
  return part;
}

// A host buffer of `size` elements of one DType. Stored as 32-bit words so that fp32 elements
// are aligned whatever the type.
class TypedBuffer {
 public:
  TypedBuffer() = default;
  TypedBuffer(DType type, int64_t size)
      : type_(type), size_(size), words_((size * DTypeSize(type) + 3) / 4) {}

  DType type() const { return type_; }
  int64_t size() const { return size_; }
  void* data() { return words_.data(); }
  const void* data() const { return words_.data(); }

  float Get(int64_t i) const { return LoadAsFloat(data(), i, type_); }
  void Set(int64_t i, float x) { StoreFromFloat(data(), i, type_, x); }
  void FillWithNan() {
    for (int64_t i = 0; i < size_; ++i) Set(i, std::numeric_limits<float>::quiet_NaN());
  }
  bool operator==(const TypedBuffer& other) const {
    return type_ == other.type_ && words_ == other.words_;
  }

 private:
  DType type_ = DType::kF32;
  int64_t size_ = 0;
  std::vector<uint32_t> words_;
};

// Bytes of a host buffer: size() elements of type().
inline size_t Bytes(const TypedBuffer& b) {
  return static_cast<size_t>(b.size()) * DTypeSize(b.type());
}

// Fills `buffer` with standard-normal values (rounded to its type), never zeros: an all-zero
// input would hide indexing errors.
inline void FillRandomNormal(TypedBuffer* buffer, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  for (int64_t i = 0; i < buffer->size(); ++i) buffer->Set(i, dist(rng));
}

// The tensors of one call. q/k/v hold random inputs; o and lse are poisoned with NaN so that a
// test can tell whether every element was written.
struct AttentionBuffers {
  TypedBuffer q;             // [batch, seqlen_q, heads, head_dim]
  TypedBuffer k;             // [batch, seqlen_k, heads_k, head_dim]
  TypedBuffer v;             // [batch, seqlen_k, heads_k, head_dim]
  TypedBuffer o;             // [batch, seqlen_q, heads, head_dim], o_dtype
  std::vector<float> lse;    // [batch, heads, seqlen_q]
  std::vector<float> alibi;  // [heads]
};

// Allocates contiguous buffers for the sizes and dtypes already in *p, fills q/k/v randomly
// from `seed`, poisons o and lse, and points *p at them with contiguous strides. With
// `with_alibi`, also makes per-head ALiBi slopes (the usual geometric series) and sets them.
inline AttentionBuffers MakeAttentionBuffers(AttentionParams* p, uint32_t seed,
                                             bool with_alibi = false) {
  AttentionBuffers t;
  const int64_t d = p->head_dim;
  t.q = TypedBuffer(p->dtype, p->batch * p->seqlen_q * p->heads * d);
  t.k = TypedBuffer(p->dtype, p->batch * p->seqlen_k * p->heads_k * d);
  t.v = TypedBuffer(p->dtype, p->batch * p->seqlen_k * p->heads_k * d);
  t.o = TypedBuffer(p->o_dtype, p->batch * p->seqlen_q * p->heads * d);
  FillRandomNormal(&t.q, seed * 4 + 1);
  FillRandomNormal(&t.k, seed * 4 + 2);
  FillRandomNormal(&t.v, seed * 4 + 3);
  t.o.FillWithNan();
  t.lse.assign(p->batch * p->heads * p->seqlen_q, std::numeric_limits<float>::quiet_NaN());
  if (with_alibi) {
    for (int h = 0; h < p->heads; ++h) {
      t.alibi.push_back(
          std::exp2(-8.0f * static_cast<float>(h + 1) / static_cast<float>(p->heads)));
    }
  }
  p->q = t.q.data();
  p->k = t.k.data();
  p->v = t.v.data();
  p->o = t.o.data();
  p->lse = t.lse.data();
  p->alibi_slopes = with_alibi ? t.alibi.data() : nullptr;
  SetContiguousStrides(p);
  return t;
}

// ErrorStats (kernels/error_metrics.h) plus a per-element bound: element i violates when
// |got - want| > atol + rtol * |want|. A norm alone can hide one bad element among many.
struct ToleranceReport {
  ErrorStats stats;
  int64_t violations = 0;
  int64_t first_violation = -1;  // index, with its values below
  double first_got = 0.0;
  double first_want = 0.0;

  bool Clean() const { return stats.nan_count == 0 && stats.inf_mismatch == 0 && violations == 0; }
  std::string ToString() const {
    std::string s = stats.ToString();
    if (violations > 0) {
      absl::StrAppend(&s, " violations=", violations, " first at ", first_violation, ": got ",
                      first_got, " want ", first_want);
    }
    return s;
  }
};

// Compares got(i) with want[i] for every i < n. Infinities (the LSE of a fully masked row) must
// match exactly and are left out of the norms, as in ErrorAccumulator.
template <typename GetFn>
ToleranceReport CompareWithTolerance(int64_t n, GetFn got, const std::vector<double>& want,
                                     double atol, double rtol) {
  ToleranceReport r;
  ErrorAccumulator acc;
  for (int64_t i = 0; i < n; ++i) {
    const double g = got(i);
    const double w = want[i];
    acc.Add(g, w);
    if (!std::isfinite(g) || !std::isfinite(w)) continue;  // counted by the accumulator
    if (std::abs(g - w) > atol + rtol * std::abs(w) && r.violations++ == 0) {
      r.first_violation = i;
      r.first_got = g;
      r.first_want = w;
    }
  }
  r.stats = acc.Finish();
  return r;
}

// Unit roundoff of a storage type: the relative error of rounding one value into it.
inline double UnitRoundoff(DType t) {
  switch (t) {
    case DType::kF32:
      return 0x1p-24;
    case DType::kF16:
      return 0x1p-11;
    case DType::kBF16:
      return 0x1p-8;
  }
  return 0.0;
}

// x rounded to storage type t and read back (as a kernel writing x in t would leave it).
inline float RoundedTo(DType t, float x) {
  float room = 0.0f;  // holds any storage type
  StoreFromFloat(&room, 0, t, x);
  return LoadAsFloat(&room, 0, t);
}

// Calls fn(r, o_at) for each row whose reference lse (`ref_lse`, [batch, heads, seqlen_q] of
// `p`) is -inf, i.e. that the call leaves wholly masked: r its lse index, o_at the offset of
// its o row (b, i, h) in contiguous [batch, seqlen_q, heads, head_dim].
template <typename Fn>
void ForEachEmptyRow(const AttentionParams& p, const std::vector<double>& ref_lse, Fn fn) {
  for (size_t r = 0; r < ref_lse.size(); ++r) {
    if (std::isfinite(ref_lse[r])) continue;
    // r = (b * heads + h) * seqlen_q + i.
    const int64_t i = static_cast<int64_t>(r) % p.seqlen_q;
    const int64_t bh = static_cast<int64_t>(r) / p.seqlen_q;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    fn(r, ((b * p.seqlen_q + i) * p.heads + h) * p.head_dim);
  }
}

// After a call with a read-only partial (AttentionParams::partial_o): the rows the call left
// wholly masked (`ref_lse` -inf, see ForEachEmptyRow) hold the partial as it was, its o rounded
// to p.o_dtype (0 for an empty partial) and its lse bit for bit. partial_o in o's contiguous
// layout.
inline void ExpectEmptyRowsKeepThePartial(const AttentionParams& p,
                                          const std::vector<double>& ref_lse,
                                          const AttentionBuffers& t,
                                          const std::vector<float>& partial_o,
                                          const std::vector<float>& partial_lse) {
  int64_t mismatches = 0;
  ForEachEmptyRow(p, ref_lse, [&](size_t r, int64_t o_at) {
    if (std::memcmp(&t.lse[r], &partial_lse[r], sizeof(float)) != 0) ++mismatches;
    for (int64_t d = 0; d < p.head_dim; ++d) {
      const float kept = std::isfinite(partial_lse[r]) ? partial_o[o_at + d] : 0.0f;
      if (t.o.Get(o_at + d) != RoundedTo(p.o_dtype, kept)) ++mismatches;
    }
  });
  EXPECT_EQ(mismatches, 0) << "elements of wholly masked rows that differ from the partial";
}

// ---- Non-finite inputs ------------------------------------------------------------------------

// One element of q, k or v (batch 0) set to `value`.
struct Poison {
  char tensor;  // 'q', 'k' or 'v'
  int64_t row;
  int head;  // q head for q, K/V head for k and v
  int d;
  float value;
};

// Inputs for the rules of reference_attention.h on non-finite values: random inputs (optionally
// every q or k element multiplied by a factor, or set to a value, so that finite inputs give
// scores beyond fp32), then single elements poisoned.
struct NonFiniteCase {
  std::string name;
  AttentionParams p;  // sizes and options
  std::vector<Poison> poisons;
  float q_factor = 1.0f, k_factor = 1.0f;
  float q_fill = 0.0f, k_fill = 0.0f;  // 0: keep the random values
};

// The cases, over one dtype (bf16, fp16 or fp32 inputs; outputs in that dtype too). Each poisons
// a row in the middle of a 130-row call (blocks of 64: a block boundary inside the diagonal),
// with GQA 4:2 so that a poisoned K/V head reaches two query heads:
//   NaN / -inf in a q element: that row only; NaN in a q row no key is visible to: nothing;
//   NaN / +inf in a k element: the rows that see that key (causal: the later ones; a window);
//   NaN / +inf in a v element: that column of the rows that see the key;
//   finite inputs whose scores exceed fp32 (bf16 and fp32 only, fp16 cannot reach it): every
//   row NaN, with all scores hugely negative too (once silently a masked row of zeros), with a
//   softcap (it must not bound them), and through a large softmax_scale.
inline std::vector<NonFiniteCase> NonFiniteCases(DType t) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const AttentionParams base = Shape(130, 130, 4, 2, 64, t, t);
  AttentionParams causal = base;
  causal.causal = true;
  AttentionParams window = base;
  window.window_left = 10;
  window.window_right = 5;
  AttentionParams late_keys = causal;  // queries 0..129 against keys at 100..229: rows < 100 see none
  late_keys.k_pos_offset = 100;
  std::vector<NonFiniteCase> cases = {
      {"NanInQ", base, {{'q', 70, 1, 5, nan}}},
      {"NegInfInQCausal", causal, {{'q', 3, 2, 0, -inf}}},
      {"NanInQOfARowThatSeesNoKey", late_keys, {{'q', 10, 0, 7, nan}}},
      {"NanInKCausal", causal, {{'k', 70, 0, 3, nan}}},
      {"InfInKWindow", window, {{'k', 70, 1, 0, inf}}},
      {"NanInVCausal", causal, {{'v', 70, 0, 7, nan}}},
      {"InfInVWindow", window, {{'v', 70, 1, 9, inf}}},
      {"NegInfInVAndNanInQ", causal, {{'v', 20, 1, 2, -inf}, {'q', 100, 3, 1, nan}}},
  };
  if (t != DType::kF16) {
    NonFiniteCase overflow{"ScoresBeyondFp32", base, {}, 1e20f, 1e20f};
    cases.push_back(overflow);
    NonFiniteCase negative{"ScoresAllHugelyNegative", causal, {}};
    negative.q_fill = 1e20f;
    negative.k_fill = -1e20f;
    cases.push_back(negative);
    overflow.name = "ScoresBeyondFp32WithSoftcap";
    overflow.p.softcap = 30.0f;
    cases.push_back(overflow);
    NonFiniteCase scaled{"ScaledScoresBeyondFp32", causal, {}, 1e18f, 1e18f};
    scaled.p.softmax_scale = 1e4f;
    cases.push_back(scaled);
  }
  return cases;
}

// One query against two keys (head_dim 64, scale 1, o fp32): q = (q0, 0, ...), key j =
// (k[j], 0, ...), so the scores are q0 k[0] and q0 k[1]; random v, with element 3 of key `v_key`
// set to `v_value`. For the edges of probability 0 (exp underflowing) and negligible partials.
inline AttentionBuffers TwoKeyCall(AttentionParams* p, DType dtype, float q0, float k0, float k1,
                                   int v_key, float v_value) {
  *p = Shape(1, 2, 1, 1, 64, dtype, DType::kF32);
  p->softmax_scale = 1.0f;
  AttentionBuffers t = MakeAttentionBuffers(p, 9);
  for (int64_t i = 0; i < t.q.size(); ++i) t.q.Set(i, 0.0f);
  for (int64_t i = 0; i < t.k.size(); ++i) t.k.Set(i, 0.0f);
  t.q.Set(0, q0);
  t.k.Set(0, k0);
  t.k.Set(64, k1);
  t.v.Set(v_key * 64 + 3, v_value);
  return t;
}

// Applies c's factors, fills and poisons to the inputs of t (made for c.p by
// MakeAttentionBuffers; contiguous [batch, seq, heads, head_dim]).
inline void ApplyNonFinite(const NonFiniteCase& c, AttentionBuffers* t) {
  const AttentionParams& p = c.p;
  auto scale = [](TypedBuffer* b, float factor, float fill) {
    for (int64_t i = 0; i < b->size(); ++i) {
      if (fill != 0.0f) {
        b->Set(i, fill);
      } else if (factor != 1.0f) {
        b->Set(i, b->Get(i) * factor);
      }
    }
  };
  scale(&t->q, c.q_factor, c.q_fill);
  scale(&t->k, c.k_factor, c.k_fill);
  for (const Poison& x : c.poisons) {
    TypedBuffer* b = x.tensor == 'q' ? &t->q : x.tensor == 'k' ? &t->k : &t->v;
    const int heads = x.tensor == 'q' ? p.heads : p.heads_k;
    b->Set((x.row * heads + x.head) * p.head_dim + x.d, x.value);
  }
}

}  // namespace ringattn::kernel_testing
