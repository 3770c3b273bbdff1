// The fp64 reference on cases whose answer is known without it: hand-computed two-key
// softmaxes, invariances (identical keys give the mean of V), fully masked rows, the GQA head
// mapping, and validation errors that name the offending field.
#include "kernels/cpu/reference_attention.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/test_util.h"
#include "kernels/params_check.h"
#include "kernels/score_mod.h"

namespace ringattn {
namespace {

using kernel_testing::AttentionBuffers;
using kernel_testing::MakeAttentionBuffers;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr int kDim = 64;  // the smallest supported head_dim

// A one-head fp32 problem with explicit rows; everything not set is zero. `p` holds the sizes
// and options; Bound() attaches the buffers (so that copies of the struct stay valid).
struct SmallProblem {
  std::vector<float> q, k, v, o;  // [seq, 1, kDim]
  AttentionParams p;

  SmallProblem(int64_t seqlen_q, int64_t seqlen_k)
      : q(seqlen_q * kDim, 0.0f),
        k(seqlen_k * kDim, 0.0f),
        v(seqlen_k * kDim, 0.0f),
        o(seqlen_q * kDim, 0.0f) {
    p.batch = 1;
    p.seqlen_q = seqlen_q;
    p.seqlen_k = seqlen_k;
    p.heads = p.heads_k = 1;
    p.head_dim = kDim;
    SetContiguousStrides(&p);
  }
  AttentionParams Bound() {
    AttentionParams b = p;
    b.q = q.data();
    b.k = k.data();
    b.v = v.data();
    b.o = o.data();  // ignored by the reference, but validation wants it
    return b;
  }
};

// Output element (row i, dim d) and LSE of row i of a one-head result.
double O(const ReferenceResult& r, int64_t i, int d) { return r.o[i * kDim + d]; }
double Lse(const ReferenceResult& r, int64_t i) { return r.lse[i]; }

// ---- Hand-computed cases --------------------------------------------------------------------

// Two queries, two keys, scale 1. Row 0 scores [ln 3, 0] -> weights [3/4, 1/4]; row 1 has a
// zero query, scores [0, 0] -> weights [1/2, 1/2].
SmallProblem TwoByTwo() {
  SmallProblem sp(2, 2);
  sp.q[0 * kDim + 0] = static_cast<float>(std::log(3.0));
  sp.k[0 * kDim + 0] = 1.0f;  // key 0 along dim 0; key 1 is zero
  sp.v[0 * kDim + 0] = 1.0f;
  sp.v[0 * kDim + 5] = 4.0f;
  sp.v[1 * kDim + 0] = 5.0f;
  sp.v[1 * kDim + 5] = -8.0f;
  return sp;
}

TEST(ReferenceAttentionTest, HandComputedTwoByTwo) {
  SmallProblem sp = TwoByTwo();
  absl::StatusOr<ReferenceResult> r = ReferenceForward(sp.Bound());
  ASSERT_TRUE(r.ok()) << r.status();
  const double ln3 = static_cast<float>(std::log(3.0));     // the query as stored in fp32
  const double w0 = std::exp(ln3) / (std::exp(ln3) + 1.0);  // = 3/4 up to the fp32 ln 3
  EXPECT_NEAR(O(*r, 0, 0), w0 * 1 + (1 - w0) * 5, 1e-12);   // 2.0
  EXPECT_NEAR(O(*r, 0, 5), w0 * 4 + (1 - w0) * -8, 1e-12);  // 1.0
  EXPECT_NEAR(O(*r, 0, 0), 2.0, 1e-6);
  EXPECT_NEAR(O(*r, 0, 5), 1.0, 1e-6);
  EXPECT_NEAR(Lse(*r, 0), std::log(4.0), 1e-6);
  EXPECT_EQ(O(*r, 0, 1), 0.0);
  EXPECT_NEAR(O(*r, 1, 0), 3.0, 1e-12);
  EXPECT_NEAR(O(*r, 1, 5), -2.0, 1e-12);
  EXPECT_NEAR(Lse(*r, 1), std::log(2.0), 1e-12);
}

TEST(ReferenceAttentionTest, HandComputedCausal) {
  SmallProblem sp = TwoByTwo();
  sp.p.causal = true;
  absl::StatusOr<ReferenceResult> r = ReferenceForward(sp.Bound());
  ASSERT_TRUE(r.ok());
  // Row 0 sees key 0 only: o = v0, lse = its score.
  EXPECT_EQ(O(*r, 0, 0), 1.0);
  EXPECT_EQ(O(*r, 0, 5), 4.0);
  EXPECT_NEAR(Lse(*r, 0), std::log(3.0), 1e-6);
  // Row 1 sees both keys, unchanged.
  EXPECT_NEAR(O(*r, 1, 0), 3.0, 1e-12);
  EXPECT_NEAR(Lse(*r, 1), std::log(2.0), 1e-12);
}

TEST(ReferenceAttentionTest, HandComputedScaleSoftcapAndAlibi) {
  SmallProblem sp = TwoByTwo();
  sp.p.softmax_scale = 2.0f;
  sp.p.softcap = 1.5f;
  const float slope = 0.25f;
  sp.p.alibi_slopes = &slope;
  sp.p.q_pos_offset = 10;  // queries at 10, 11; keys at 0, 1
  absl::StatusOr<ReferenceResult> r = ReferenceForward(sp.Bound());
  ASSERT_TRUE(r.ok());
  const double dot = static_cast<float>(std::log(3.0));
  // Row 0 (q_pos 10): key 0 at distance 10, key 1 at distance 9.
  const double s0 = 1.5 * std::tanh(2.0 * dot / 1.5) - 0.25 * 10;
  const double s1 = 1.5 * std::tanh(0.0) - 0.25 * 9;
  const double w0 = std::exp(s0) / (std::exp(s0) + std::exp(s1));
  EXPECT_NEAR(O(*r, 0, 0), w0 * 1 + (1 - w0) * 5, 1e-12);
  EXPECT_NEAR(Lse(*r, 0), std::log(std::exp(s0) + std::exp(s1)), 1e-12);
  // Row 1 (q_pos 11, zero query): scores -2.75 and -2.5.
  const double u0 = std::exp(-2.75), u1 = std::exp(-2.5);
  EXPECT_NEAR(O(*r, 1, 5), (u0 * 4 + u1 * -8) / (u0 + u1), 1e-12);
}

TEST(ReferenceAttentionTest, WindowSelectsKeysByGlobalPosition) {
  // Query at position 5 against keys at 0, 2, 4, 6, 8 (stride 2) with window (2, 1): only
  // keys at 4 and 6 are allowed. A zero query weighs them equally.
  SmallProblem sp(1, 5);
  for (int j = 0; j < 5; ++j) sp.v[j * kDim] = static_cast<float>(10 * j);
  sp.p.q_pos_offset = 5;
  sp.p.k_pos_stride = 2;
  sp.p.window_left = 2;
  sp.p.window_right = 1;
  absl::StatusOr<ReferenceResult> r = ReferenceForward(sp.Bound());
  ASSERT_TRUE(r.ok());
  EXPECT_NEAR(O(*r, 0, 0), (20.0 + 30.0) / 2, 1e-12);
  EXPECT_NEAR(Lse(*r, 0), std::log(2.0), 1e-12);
}

// ---- Invariances ----------------------------------------------------------------------------

// Hand-worked bounds of the references' own mask: a key exactly on each bound, and one past it.
TEST(ReferenceAttentionTest, MaskPutsAKeyOnEveryBound) {
  AttentionParams p;
  p.window_left = 3;
  p.window_right = 2;
  EXPECT_TRUE(ReferenceKeyAllowed(p, 10, 7));    // q - 3: on the left bound
  EXPECT_FALSE(ReferenceKeyAllowed(p, 10, 6));   // one past it
  EXPECT_TRUE(ReferenceKeyAllowed(p, 10, 12));   // q + 2: on the right bound
  EXPECT_FALSE(ReferenceKeyAllowed(p, 10, 13));
  p.causal = true;
  EXPECT_TRUE(ReferenceKeyAllowed(p, 10, 10));   // the diagonal
  EXPECT_FALSE(ReferenceKeyAllowed(p, 10, 11));
  p.causal = false;
  p.window_left = 0;
  p.window_right = 0;
  EXPECT_TRUE(ReferenceKeyAllowed(p, 5, 5));
  EXPECT_FALSE(ReferenceKeyAllowed(p, 5, 4));
  EXPECT_FALSE(ReferenceKeyAllowed(p, 5, 6));
}

// Sides near INT64_MAX are "every key" to the references and to the kernels' span alike (they
// once overflowed q + window_right into an empty span).
TEST(ReferenceAttentionTest, HugeWindowSidesSeeEveryKey) {
  AttentionParams p;
  p.window_left = std::numeric_limits<int64_t>::max();
  p.window_right = std::numeric_limits<int64_t>::max() - 1;
  for (int64_t q : {int64_t{0}, int64_t{1}, int64_t{1} << 40}) {
    for (int64_t k : {int64_t{0}, q, q + 1, int64_t{1} << 41}) {
      EXPECT_TRUE(ReferenceKeyAllowed(p, q, k)) << q << " " << k;
      EXPECT_TRUE(InSpan(WindowKeySpan(p, q), k)) << q << " " << k;
    }
  }
}

TEST(ReferenceAttentionTest, IdenticalKeysGiveTheMeanOfTheAllowedValues) {
  // Every key row is the same, so every allowed score is equal: o = mean of allowed V rows.
  AttentionParams p;
  p.batch = 2;
  p.seqlen_q = p.seqlen_k = 9;
  p.heads = 4;
  p.heads_k = 2;
  p.head_dim = kDim;
  p.causal = true;
  AttentionBuffers t = MakeAttentionBuffers(&p, 5);
  for (int64_t i = 0; i < t.k.size(); ++i) t.k.Set(i, 0.5f + 0.01f * (i % kDim));
  absl::StatusOr<ReferenceResult> r = ReferenceForward(p);
  ASSERT_TRUE(r.ok());
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.heads; ++h) {
      const int kv = h / 2;
      for (int64_t i = 0; i < p.seqlen_q; ++i) {
        for (int d = 0; d < kDim; ++d) {
          double mean = 0.0;
          for (int64_t j = 0; j <= i; ++j) {  // causal: keys 0..i
            mean += t.v.Get(((b * p.seqlen_k + j) * p.heads_k + kv) * kDim + d);
          }
          mean /= static_cast<double>(i + 1);
          ASSERT_NEAR(r->o[((b * p.seqlen_q + i) * p.heads + h) * kDim + d], mean, 1e-12);
        }
      }
    }
  }
}

TEST(ReferenceAttentionTest, GqaHeadReadsItsGroupsKvHead) {
  // heads 4 over heads_k 2 equals heads 4 over 4 with each K/V head duplicated for its group.
  AttentionParams gqa;
  gqa.batch = 1;
  gqa.seqlen_q = 5;
  gqa.seqlen_k = 6;
  gqa.heads = 4;
  gqa.heads_k = 2;
  gqa.head_dim = kDim;
  AttentionBuffers t = MakeAttentionBuffers(&gqa, 9);
  AttentionParams mha = gqa;
  mha.heads_k = 4;
  AttentionBuffers t_mha = MakeAttentionBuffers(&mha, 10);
  for (int64_t i = 0; i < t.q.size(); ++i) t_mha.q.Set(i, t.q.Get(i));
  for (int64_t j = 0; j < gqa.seqlen_k; ++j) {
    for (int h = 0; h < 4; ++h) {
      for (int d = 0; d < kDim; ++d) {
        const int64_t from = (j * 2 + h / 2) * kDim + d;
        const int64_t to = (j * 4 + h) * kDim + d;
        t_mha.k.Set(to, t.k.Get(from));
        t_mha.v.Set(to, t.v.Get(from));
      }
    }
  }
  absl::StatusOr<ReferenceResult> a = ReferenceForward(gqa);
  absl::StatusOr<ReferenceResult> b = ReferenceForward(mha);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->o, b->o);
  EXPECT_EQ(a->lse, b->lse);
}

TEST(ReferenceAttentionTest, ReadsInputsThroughTheirDtype) {
  // The same values stored as bf16 and as fp32 (already rounded to bf16) give the same result.
  AttentionParams bf;
  bf.batch = 1;
  bf.seqlen_q = bf.seqlen_k = 7;
  bf.heads = bf.heads_k = 2;
  bf.head_dim = kDim;
  bf.dtype = DType::kBF16;
  AttentionBuffers t_bf = MakeAttentionBuffers(&bf, 3);
  AttentionParams f = bf;
  f.dtype = DType::kF32;
  AttentionBuffers t_f = MakeAttentionBuffers(&f, 4);
  for (int64_t i = 0; i < t_bf.q.size(); ++i) t_f.q.Set(i, t_bf.q.Get(i));
  for (int64_t i = 0; i < t_bf.k.size(); ++i) {
    t_f.k.Set(i, t_bf.k.Get(i));
    t_f.v.Set(i, t_bf.v.Get(i));
  }
  absl::StatusOr<ReferenceResult> a = ReferenceForward(bf);
  absl::StatusOr<ReferenceResult> b = ReferenceForward(f);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->o, b->o);
  EXPECT_EQ(a->lse, b->lse);
}

// ---- Fully masked rows ----------------------------------------------------------------------

TEST(ReferenceAttentionTest, FullyMaskedRowIsZeroWithNegInfLse) {
  // Causal with the keys at 3, 4, 5 and the queries at 0..4: rows 0-2 see nothing.
  AttentionParams p;
  p.batch = 1;
  p.seqlen_q = 5;
  p.seqlen_k = 3;
  p.heads = p.heads_k = 1;
  p.head_dim = kDim;
  p.causal = true;
  p.k_pos_offset = 3;
  AttentionBuffers t = MakeAttentionBuffers(&p, 6);
  absl::StatusOr<ReferenceResult> r = ReferenceForward(p);
  ASSERT_TRUE(r.ok());
  for (int64_t i = 0; i < 5; ++i) {
    const bool masked = i < 3;
    EXPECT_EQ(std::isinf(r->lse[i]), masked) << i;
    if (masked) {
      EXPECT_EQ(r->lse[i], kNegInf);
      for (int d = 0; d < kDim; ++d) EXPECT_EQ(r->o[i * kDim + d], 0.0);
    }
  }
  // Row 3 sees exactly key 0: o = v0.
  for (int d = 0; d < kDim; ++d) EXPECT_EQ(r->o[3 * kDim + d], t.v.Get(d));
}

TEST(ReferenceAttentionTest, NoKeysMasksEveryRow) {
  AttentionParams p;
  p.batch = 1;
  p.seqlen_q = 3;
  p.seqlen_k = 0;
  p.heads = p.heads_k = 1;
  p.head_dim = kDim;
  AttentionBuffers t = MakeAttentionBuffers(&p, 7);
  p.k = p.v = nullptr;
  absl::StatusOr<ReferenceResult> r = ReferenceForward(p);
  ASSERT_TRUE(r.ok());
  for (double lse : r->lse) EXPECT_EQ(lse, kNegInf);
  for (double o : r->o) EXPECT_EQ(o, 0.0);
}

// ---- Non-finite values (the rules in reference_attention.h) -----------------------------------

using kernel_testing::ApplyNonFinite;
using kernel_testing::NonFiniteCase;
using kernel_testing::NonFiniteCases;

// The reference of case `name` (NonFiniteCases, fp32) without its poisons and with them.
struct CleanAndPoisoned {
  AttentionParams p;
  ReferenceResult clean, poisoned;
};
CleanAndPoisoned RunCase(const std::string& name) {
  CleanAndPoisoned r;
  for (const NonFiniteCase& c : NonFiniteCases(DType::kF32)) {
    if (c.name != name) continue;
    r.p = c.p;
    AttentionBuffers t = MakeAttentionBuffers(&r.p, 3);
    NonFiniteCase unpoisoned = c;
    unpoisoned.poisons.clear();
    ApplyNonFinite(unpoisoned, &t);
    absl::StatusOr<ReferenceResult> clean = ReferenceForward(r.p);
    ApplyNonFinite(c, &t);
    absl::StatusOr<ReferenceResult> poisoned = ReferenceForward(r.p);
    EXPECT_TRUE(clean.ok() && poisoned.ok());
    if (clean.ok() && poisoned.ok()) {
      r.clean = *std::move(clean);
      r.poisoned = *std::move(poisoned);
    }
    return r;
  }
  ADD_FAILURE() << "no case " << name;
  return r;
}

// Checks every element of r.poisoned: where nan(i, h, d) says, NaN (d = -1: the LSE); elsewhere
// bit for bit the clean result (masked keys are not read; other rows and columns are untouched).
template <typename NanAt>
void ExpectNanExactlyAt(const CleanAndPoisoned& r, NanAt nan) {
  const AttentionParams& p = r.p;
  ASSERT_EQ(r.poisoned.o.size(), r.clean.o.size());
  int64_t wrong = 0;
  for (int64_t i = 0; i < p.seqlen_q; ++i) {
    for (int h = 0; h < p.heads; ++h) {
      for (int d = -1; d < p.head_dim; ++d) {
        const double got = d < 0 ? r.poisoned.lse[h * p.seqlen_q + i]
                                 : r.poisoned.o[(i * p.heads + h) * p.head_dim + d];
        const double clean = d < 0 ? r.clean.lse[h * p.seqlen_q + i]
                                   : r.clean.o[(i * p.heads + h) * p.head_dim + d];
        const bool ok = nan(i, h, d) ? std::isnan(got) : got == clean;
        if (!ok && wrong++ < 5) {
          ADD_FAILURE() << "row " << i << " head " << h << (d < 0 ? " lse" : " o dim ")
                        << (d < 0 ? "" : std::to_string(d)) << ": got " << got << ", clean "
                        << clean;
        }
      }
    }
  }
}

TEST(ReferenceNonFiniteTest, NanOrInfInAQueryPoisonsItsRowOnly) {
  ExpectNanExactlyAt(RunCase("NanInQ"), [](int64_t i, int h, int) { return i == 70 && h == 1; });
  // -inf times keys of either sign: scores of -inf and +inf; the row is NaN either way.
  ExpectNanExactlyAt(RunCase("NegInfInQCausal"),
                     [](int64_t i, int h, int) { return i == 3 && h == 2; });
}

TEST(ReferenceNonFiniteTest, ARowThatSeesNoKeyIgnoresItsNanQuery) {
  const CleanAndPoisoned r = RunCase("NanInQOfARowThatSeesNoKey");
  ExpectNanExactlyAt(r, [](int64_t, int, int) { return false; });
  EXPECT_EQ(r.poisoned.lse[10], kNegInf);
  for (int d = 0; d < kDim; ++d) EXPECT_EQ(r.poisoned.o[10 * 4 * kDim + d], 0.0);
}

TEST(ReferenceNonFiniteTest, NanOrInfInAKeyPoisonsTheRowsThatSeeIt) {
  // K/V head 0 serves query heads 0 and 1 (GQA 4:2). Causal: rows 70 on see key 70.
  ExpectNanExactlyAt(RunCase("NanInKCausal"),
                     [](int64_t i, int h, int) { return i >= 70 && h < 2; });
  // Window (10, 5): row i sees keys i - 10 .. i + 5, so key 70 is seen by rows 65 .. 80.
  ExpectNanExactlyAt(RunCase("InfInKWindow"),
                     [](int64_t i, int h, int) { return i >= 65 && i <= 80 && h >= 2; });
}

TEST(ReferenceNonFiniteTest, NanOrInfInAValueReachesItsColumnOfTheRowsThatSeeIt) {
  ExpectNanExactlyAt(RunCase("NanInVCausal"),
                     [](int64_t i, int h, int d) { return i >= 70 && h < 2 && d == 7; });
  const CleanAndPoisoned inf = RunCase("InfInVWindow");
  const AttentionParams& p = inf.p;
  for (int64_t i = 0; i < p.seqlen_q; ++i) {
    for (int h = 0; h < p.heads; ++h) {
      for (int d = 0; d < p.head_dim; ++d) {
        const size_t at = static_cast<size_t>((i * p.heads + h) * p.head_dim + d);
        if (i >= 65 && i <= 80 && h >= 2 && d == 9) {
          EXPECT_EQ(inf.poisoned.o[at], std::numeric_limits<double>::infinity()) << i << " " << h;
        } else {
          EXPECT_EQ(inf.poisoned.o[at], inf.clean.o[at]) << i << " " << h << " " << d;
        }
      }
      EXPECT_EQ(inf.poisoned.lse[h * p.seqlen_q + i], inf.clean.lse[h * p.seqlen_q + i]);
    }
  }
}

// A visible key whose probability is exactly 0 (exp underflows) still adds 0 * v: NaN for an
// infinite v (IEEE), where a masked key adds nothing.
TEST(ReferenceNonFiniteTest, InfiniteValueAtAZeroProbabilityKeyIsNan) {
  SmallProblem sp(1, 2);
  sp.q[0] = 1000.0f;
  sp.k[0 * kDim + 0] = 1.0f;   // score 1000
  sp.k[1 * kDim + 0] = -1.0f;  // score -1000: exp(-2000) is 0 in double
  sp.v[0 * kDim + 3] = 2.0f;
  sp.v[1 * kDim + 3] = std::numeric_limits<float>::infinity();
  absl::StatusOr<ReferenceResult> r = ReferenceForward(sp.Bound());
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(std::isnan(O(*r, 0, 3)));
  EXPECT_EQ(O(*r, 0, 4), 0.0);
  EXPECT_NEAR(Lse(*r, 0), 1000.0, 1e-9);
  sp.p.causal = true;  // key 1 masked for the query at 0: not read
  r = ReferenceForward(sp.Bound());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(O(*r, 0, 3), 2.0);
}

TEST(ReferenceNonFiniteTest, ScoresBeyondFp32MakeEveryRowNan) {
  for (const char* name : {"ScoresBeyondFp32", "ScoresAllHugelyNegative",
                           "ScoresBeyondFp32WithSoftcap", "ScaledScoresBeyondFp32"}) {
    SCOPED_TRACE(name);
    ExpectNanExactlyAt(RunCase(name), [](int64_t, int, int) { return true; });
  }
}

// The same scores within fp32 are computed: the NaN rule is about fp32's range, not size.
TEST(ReferenceNonFiniteTest, LargeScoresWithinFp32AreComputed) {
  SmallProblem sp(1, 2);
  sp.q[0] = 1e18f;
  sp.k[0 * kDim + 0] = 1e18f;   // q.k = 1e36
  sp.k[1 * kDim + 0] = -1e18f;  // -1e36
  sp.v[0 * kDim + 1] = 3.0f;
  sp.v[1 * kDim + 1] = 5.0f;
  absl::StatusOr<ReferenceResult> r = ReferenceForward(sp.Bound());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(O(*r, 0, 1), 3.0);  // all weight on key 0
  const double big = 1e18f;
  EXPECT_NEAR(Lse(*r, 0), big * big, 1e24);
  sp.p.softmax_scale = 1e3f;  // 1e39: beyond fp32
  r = ReferenceForward(sp.Bound());
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(std::isnan(O(*r, 0, 1)));
  EXPECT_TRUE(std::isnan(Lse(*r, 0)));
}

// ---- Validation -----------------------------------------------------------------------------

AttentionParams ValidShape() {
  AttentionParams p;
  p.batch = 1;
  p.seqlen_q = p.seqlen_k = 4;
  p.heads = p.heads_k = 2;
  p.head_dim = kDim;
  return p;
}

void ExpectInvalid(const AttentionParams& p, const std::string& needle) {
  absl::StatusOr<ReferenceResult> r = ReferenceForward(p);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
}

TEST(ReferenceAttentionTest, ValidationNamesTheField) {
  {
    AttentionParams p = ValidShape();
    p.head_dim = 96;
    AttentionBuffers t = MakeAttentionBuffers(&p, 1);
    ExpectInvalid(p, "head_dim 96");
  }
  {
    AttentionParams p = ValidShape();
    p.heads = 5;
    AttentionBuffers t = MakeAttentionBuffers(&p, 1);
    ExpectInvalid(p, "heads_k");
  }
  {
    AttentionParams p = ValidShape();
    AttentionBuffers t = MakeAttentionBuffers(&p, 1);
    p.k = nullptr;
    ExpectInvalid(p, "k and v");
  }
  {
    AttentionParams p = ValidShape();
    AttentionBuffers t = MakeAttentionBuffers(&p, 1);
    p.window_left = -2;
    ExpectInvalid(p, "window_left");
  }
  {
    AttentionParams p = ValidShape();
    AttentionBuffers t = MakeAttentionBuffers(&p, 1);
    p.softmax_scale = 0.0f;
    ExpectInvalid(p, "softmax_scale");
  }
}

}  // namespace
}  // namespace ringattn
