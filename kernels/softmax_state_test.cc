// The online-softmax numerics of softmax_state.h: Combine and MergeLse at their -inf and
// large-magnitude edges, order independence, and that merging partial softmaxes (blockwise as
// in the kernels, or as normalised partials as in the ring) equals one softmax over all keys.
#include "kernels/softmax_state.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace ringattn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- Combine --------------------------------------------------------------------------------

TEST(SoftmaxStateTest, DefaultStateIsEmpty) {
  const SoftmaxState s;
  EXPECT_EQ(s.m, kNegInf);
  EXPECT_EQ(s.l, 0.0f);
  EXPECT_EQ(StateLse(s), kNegInf);
  EXPECT_EQ(StateNormalizer(s), 0.0f);
}

TEST(SoftmaxStateTest, CombineTwoEmptyStatesStaysEmpty) {
  SoftmaxState s;
  const CombineScales c = Combine(&s, SoftmaxState{});
  EXPECT_EQ(s.m, kNegInf);
  EXPECT_EQ(s.l, 0.0f);
  EXPECT_EQ(c.a, 0.0f);
  EXPECT_EQ(c.b, 0.0f);
  EXPECT_FALSE(std::isnan(c.a) || std::isnan(c.b));
}

TEST(SoftmaxStateTest, CombineIntoEmptyTakesTheOther) {
  SoftmaxState s;
  const CombineScales c = Combine(&s, SoftmaxState{2.5f, 3.0f});
  EXPECT_EQ(s.m, 2.5f);
  EXPECT_EQ(s.l, 3.0f);
  EXPECT_EQ(c.a, 0.0f);  // the empty accumulator is dropped, not scaled by exp(-inf - 2.5)
  EXPECT_EQ(c.b, 1.0f);
}

TEST(SoftmaxStateTest, CombineWithEmptyKeepsState) {
  SoftmaxState s{-1.5f, 7.0f};
  const CombineScales c = Combine(&s, SoftmaxState{});
  EXPECT_EQ(s.m, -1.5f);
  EXPECT_EQ(s.l, 7.0f);
  EXPECT_EQ(c.a, 1.0f);
  EXPECT_EQ(c.b, 0.0f);
}

TEST(SoftmaxStateTest, CombineRescalesToTheLargerMax) {
  SoftmaxState s{1.0f, 2.0f};
  const CombineScales c = Combine(&s, SoftmaxState{3.0f, 5.0f});
  EXPECT_EQ(s.m, 3.0f);
  EXPECT_FLOAT_EQ(c.a, std::exp(-2.0f));
  EXPECT_EQ(c.b, 1.0f);
  EXPECT_FLOAT_EQ(s.l, 2.0f * std::exp(-2.0f) + 5.0f);
}

TEST(SoftmaxStateTest, CombineHugeMagnitudesStaysFinite) {
  // Maxima far beyond exp's range: only differences are exponentiated.
  SoftmaxState s{1e30f, 1.0f};
  CombineScales c = Combine(&s, SoftmaxState{1e30f, 1.0f});
  EXPECT_EQ(s.m, 1e30f);
  EXPECT_EQ(s.l, 2.0f);
  EXPECT_EQ(c.a, 1.0f);
  EXPECT_EQ(c.b, 1.0f);
  SoftmaxState t{-1e30f, 1.0f};
  c = Combine(&t, SoftmaxState{1e30f, 4.0f});
  EXPECT_EQ(t.m, 1e30f);
  EXPECT_EQ(t.l, 4.0f);
  EXPECT_EQ(c.a, 0.0f);  // exp(-2e30) underflows to 0, not NaN
  EXPECT_EQ(c.b, 1.0f);
}

// ---- CombineWith: Combine's code with another exponential -----------------------------------

// e^x as the fast CUDA kernel computes it, 2^(x log2 e), here through std::exp2; records the
// arguments it was given.
struct Exp2Recording {
  std::vector<float>* args;
  float operator()(float x) const {
    args->push_back(x);
    return std::exp2(x * 1.4426950408889634f);
  }
};

TEST(CombineWithTest, MatchesCombineOnEveryEdge) {
  const SoftmaxState cases[][2] = {
      {{}, {}},                          // both empty
      {{}, {2.5f, 3.0f}},                // into empty
      {{-1.5f, 7.0f}, {}},               // with empty
      {{1.0f, 2.0f}, {3.0f, 5.0f}},      // rescale the state
      {{3.0f, 2.0f}, {1.0f, 5.0f}},      // rescale the other
      {{1e30f, 1.0f}, {1e30f, 1.0f}},    // huge, equal
      {{-1e30f, 1.0f}, {1e30f, 4.0f}},   // huge difference: underflow to 0, not NaN
      {{-20.0f, 0.5f}, {-21.0f, 0.0f}},  // a block max below the state's, l = 0 (the kernel's call)
  };
  for (const auto& [state0, x] : cases) {
    SCOPED_TRACE(::testing::Message() << "state (" << state0.m << ", " << state0.l << ") x (" << x.m
                                      << ", " << x.l << ")");
    SoftmaxState want_state = state0;
    const CombineScales want = Combine(&want_state, x);
    std::vector<float> args;
    SoftmaxState got_state = state0;
    const CombineScales got = CombineWith(&got_state, x, Exp2Recording{&args});
    EXPECT_EQ(got_state.m, want_state.m);
    EXPECT_NEAR(got_state.l, want_state.l, 1e-6f * std::abs(want_state.l));
    EXPECT_NEAR(got.a, want.a, 1e-6f);
    EXPECT_NEAR(got.b, want.b, 1e-6f);
    // Only finite differences to the new maximum reach the exponential: never -inf - -inf.
    for (float a : args) {
      EXPECT_TRUE(std::isfinite(a)) << a;
      EXPECT_LE(a, 0.0f);
    }
  }
}

TEST(CombineWithTest, DefaultExponentialIsCombine) {
  SoftmaxState a{0.25f, 3.0f}, b{0.25f, 3.0f};
  const CombineScales ca = Combine(&a, SoftmaxState{1.75f, 2.0f});
  const CombineScales cb = CombineWith(&b, SoftmaxState{1.75f, 2.0f}, StdExp{});
  EXPECT_EQ(ca.a, cb.a);
  EXPECT_EQ(ca.b, cb.b);
  EXPECT_EQ(a.m, b.m);
  EXPECT_EQ(a.l, b.l);
}

// ---- MergeLse -------------------------------------------------------------------------------

TEST(MergeLseTest, BothEmpty) {
  const LseMerge m = MergeLse(kNegInf, kNegInf);
  EXPECT_EQ(m.lse, kNegInf);
  EXPECT_EQ(m.wa, 0.0f);
  EXPECT_EQ(m.wb, 0.0f);
}

TEST(MergeLseTest, OneSideEmpty) {
  LseMerge m = MergeLse(kNegInf, 0.75f);
  EXPECT_EQ(m.lse, 0.75f);
  EXPECT_EQ(m.wa, 0.0f);
  EXPECT_EQ(m.wb, 1.0f);
  m = MergeLse(-3.0f, kNegInf);
  EXPECT_EQ(m.lse, -3.0f);
  EXPECT_EQ(m.wa, 1.0f);
  EXPECT_EQ(m.wb, 0.0f);
}

TEST(MergeLseTest, EqualLsesSplitEvenly) {
  const LseMerge m = MergeLse(2.0f, 2.0f);
  EXPECT_EQ(m.wa, 0.5f);
  EXPECT_EQ(m.wb, 0.5f);
  EXPECT_FLOAT_EQ(m.lse, 2.0f + std::log(2.0f));
}

TEST(MergeLseTest, MatchesLogAddExpInDouble) {
  const float pairs[][2] = {{0.0f, 1.0f}, {-5.0f, 3.0f}, {10.0f, 10.5f}, {-80.0f, -81.0f}};
  for (const auto& [a, b] : pairs) {
    const LseMerge m = MergeLse(a, b);
    const double want = std::max<double>(a, b) + std::log1p(std::exp(-std::abs(double{a} - b)));
    EXPECT_NEAR(m.lse, want, 1e-6 * std::max(1.0, std::abs(want))) << a << " " << b;
    EXPECT_NEAR(m.wa, std::exp(a - want), 1e-6) << a << " " << b;
    EXPECT_NEAR(m.wb, std::exp(b - want), 1e-6) << a << " " << b;
    EXPECT_NEAR(m.wa + m.wb, 1.0, 1e-6);
  }
}

TEST(MergeLseTest, LargeMagnitudesDoNotOverflow) {
  // exp(1e30) would be inf; the merge exponentiates only differences.
  LseMerge m = MergeLse(1e30f, 1e30f);
  EXPECT_TRUE(std::isfinite(m.lse));
  EXPECT_EQ(m.lse, 1e30f);  // + log 2 is below the float spacing at 1e30
  EXPECT_EQ(m.wa, 0.5f);
  EXPECT_EQ(m.wb, 0.5f);
  m = MergeLse(1e30f, -1e30f);
  EXPECT_EQ(m.lse, 1e30f);
  EXPECT_EQ(m.wa, 1.0f);
  EXPECT_EQ(m.wb, 0.0f);
  m = MergeLse(-1e30f, -1e30f);  // very negative but finite: not the empty case
  EXPECT_EQ(m.lse, -1e30f);
  EXPECT_EQ(m.wa, 0.5f);
  EXPECT_EQ(m.wb, 0.5f);
  m = MergeLse(3e38f, 3e38f);  // near FLT_MAX
  EXPECT_TRUE(std::isfinite(m.lse));
  EXPECT_FALSE(std::isnan(m.wa) || std::isnan(m.wb));
}

// ---- Merging partial softmaxes --------------------------------------------------------------

// A normalised partial softmax over some keys: out = sum_j p_j v_j / sum_j p_j and its LSE.
struct Partial {
  std::vector<float> out;
  float lse;
};

constexpr int kDim = 4;

// Exact (double) softmax of scores over `keys`, each key a row of kDim values.
Partial SoftmaxInDouble(const std::vector<double>& scores, const std::vector<double>& values,
                        size_t begin, size_t end) {
  Partial p{std::vector<float>(kDim, 0.0f), kNegInf};
  if (begin == end) return p;
  const double m = *std::max_element(scores.begin() + begin, scores.begin() + end);
  double sum = 0.0;
  std::vector<double> acc(kDim, 0.0);
  for (size_t j = begin; j < end; ++j) {
    const double w = std::exp(scores[j] - m);
    sum += w;
    for (int d = 0; d < kDim; ++d) acc[d] += w * values[j * kDim + d];
  }
  for (int d = 0; d < kDim; ++d) p.out[d] = static_cast<float>(acc[d] / sum);
  p.lse = static_cast<float>(m + std::log(sum));
  return p;
}

// Folds `b` into `a` the way the ring merges: o = wa * o_a + wb * o_b.
void MergeInto(Partial* a, const Partial& b) {
  const LseMerge m = MergeLse(a->lse, b.lse);
  for (int d = 0; d < kDim; ++d) a->out[d] = m.wa * a->out[d] + m.wb * b.out[d];
  a->lse = m.lse;
}

struct Keys {
  std::vector<double> scores;  // [n]
  std::vector<double> values;  // [n, kDim]
};

Keys RandomKeys(int n, uint32_t seed, double score_scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> dist;
  Keys k;
  for (int j = 0; j < n; ++j) k.scores.push_back(score_scale * dist(rng));
  for (int j = 0; j < n * kDim; ++j) k.values.push_back(dist(rng));
  return k;
}

void ExpectPartialNear(const Partial& got, const Partial& want, double tol) {
  EXPECT_NEAR(got.lse, want.lse, tol * std::max(1.0f, std::abs(want.lse)));
  for (int d = 0; d < kDim; ++d) EXPECT_NEAR(got.out[d], want.out[d], tol) << d;
}

TEST(MergeLseTest, MergedPartialsEqualOneSoftmax) {
  const int n = 100;
  for (double score_scale : {1.0, 10.0, 1000.0}) {  // up to near one-hot
    SCOPED_TRACE(score_scale);
    const Keys k = RandomKeys(n, 7, score_scale);
    const Partial whole = SoftmaxInDouble(k.scores, k.values, 0, n);
    // Split points include empty chunks at either end and in the middle.
    const std::vector<size_t> cuts = {0, 0, 13, 50, 50, 51, 99, 100, 100};
    Partial merged{std::vector<float>(kDim, 0.0f), kNegInf};
    for (size_t c = 0; c + 1 < cuts.size(); ++c) {
      MergeInto(&merged, SoftmaxInDouble(k.scores, k.values, cuts[c], cuts[c + 1]));
    }
    ExpectPartialNear(merged, whole, 2e-6);
  }
}

TEST(MergeLseTest, MergeOrderDoesNotMatter) {
  const Keys k = RandomKeys(60, 11, 3.0);
  const Partial parts[3] = {SoftmaxInDouble(k.scores, k.values, 0, 20),
                            SoftmaxInDouble(k.scores, k.values, 20, 45),
                            SoftmaxInDouble(k.scores, k.values, 45, 60)};
  const Partial whole = SoftmaxInDouble(k.scores, k.values, 0, 60);
  int order[3] = {0, 1, 2};
  do {
    Partial merged = parts[order[0]];
    MergeInto(&merged, parts[order[1]]);
    MergeInto(&merged, parts[order[2]]);
    ExpectPartialNear(merged, whole, 2e-6);
  } while (std::next_permutation(order, order + 3));
  // Tree order ((a, b), c) versus (a, (b, c)).
  Partial left = parts[0];
  MergeInto(&left, parts[1]);
  MergeInto(&left, parts[2]);
  Partial bc = parts[1];
  MergeInto(&bc, parts[2]);
  Partial right = parts[0];
  MergeInto(&right, bc);
  ExpectPartialNear(left, right, 2e-6);
}

// A poisoned partial (a NaN score gives l = NaN; a NaN LSE in a merge) poisons whatever it is
// combined with, in either order, the empty partial included: never taken for empty.
TEST(SoftmaxStateTest, NanStaysNanThroughCombine) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const SoftmaxState poisoned{1.0f, nan};
  const SoftmaxState nan_max{nan, nan};
  for (const SoftmaxState& bad : {poisoned, nan_max}) {
    for (const SoftmaxState& other : {SoftmaxState{}, SoftmaxState{3.0f, 2.0f},
                                      SoftmaxState{-5.0f, 1.0f}}) {
      SoftmaxState a = bad;
      Combine(&a, other);
      EXPECT_TRUE(std::isnan(a.l)) << "bad then " << other.m;
      EXPECT_TRUE(std::isnan(StateLse(a)));
      EXPECT_TRUE(std::isnan(StateNormalizer(a)));
      SoftmaxState b = other;
      Combine(&b, bad);
      EXPECT_TRUE(std::isnan(b.l)) << other.m << " then bad";
      EXPECT_TRUE(std::isnan(StateLse(b)));
    }
  }
}

TEST(MergeLseTest, NanLseGivesNanWeightsAndLse) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const float other : {kNegInf, -3.0f, 0.0f, 80.0f}) {
    for (const LseMerge m : {MergeLse(nan, other), MergeLse(other, nan)}) {
      EXPECT_TRUE(std::isnan(m.lse)) << other;
      EXPECT_TRUE(std::isnan(m.wa)) << other;
      EXPECT_TRUE(std::isnan(m.wb)) << other;
    }
  }
}

TEST(MergeLseTest, MergingAnEmptyPartialChangesNothing) {
  const Keys k = RandomKeys(10, 13, 1.0);
  const Partial p = SoftmaxInDouble(k.scores, k.values, 0, 10);
  Partial merged = p;
  MergeInto(&merged, Partial{std::vector<float>(kDim, 0.0f), kNegInf});
  EXPECT_EQ(merged.lse, p.lse);
  for (int d = 0; d < kDim; ++d) EXPECT_EQ(merged.out[d], p.out[d]);
}

// The kernels' blockwise form: un-normalised accumulators rescaled by Combine per key block.
TEST(SoftmaxStateTest, BlockwiseCombineEqualsOneSoftmax) {
  const int n = 77;
  const Keys k = RandomKeys(n, 17, 5.0);
  const Partial whole = SoftmaxInDouble(k.scores, k.values, 0, n);
  for (int block : {1, 8, 32, 77}) {
    SCOPED_TRACE(block);
    SoftmaxState state;
    std::vector<float> acc(kDim, 0.0f);
    for (int j0 = 0; j0 < n; j0 += block) {
      const int j1 = std::min(n, j0 + block);
      float m = kNegInf;
      for (int j = j0; j < j1; ++j) m = std::max(m, static_cast<float>(k.scores[j]));
      float l = 0.0f;
      std::vector<float> block_acc(kDim, 0.0f);
      for (int j = j0; j < j1; ++j) {
        const float w = std::exp(static_cast<float>(k.scores[j]) - m);
        l += w;
        for (int d = 0; d < kDim; ++d)
          block_acc[d] += w * static_cast<float>(k.values[j * kDim + d]);
      }
      const CombineScales c = Combine(&state, SoftmaxState{m, l});
      for (int d = 0; d < kDim; ++d) acc[d] = c.a * acc[d] + c.b * block_acc[d];
    }
    Partial got{std::vector<float>(kDim), StateLse(state)};
    for (int d = 0; d < kDim; ++d) got.out[d] = acc[d] * StateNormalizer(state);
    ExpectPartialNear(got, whole, 2e-6);
  }
}

}  // namespace
}  // namespace ringattn
