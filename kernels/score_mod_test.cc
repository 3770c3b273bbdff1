// The packed-sequence clamp (SequenceClamp) against the per-position search it replaces: for
// runs of query positions inside one sequence every span and block classification is the
// same; a run that straddles a boundary is not uniform and searches per position.
#include "kernels/score_mod.h"

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention_params.h"

namespace ringattn {
namespace {

struct MaskCase {
  bool causal;
  int64_t window_left;
  int64_t window_right;
};

TEST(SequenceClampTest, RunsInsideOneSequenceMatchTheSearch) {
  const std::vector<int64_t> bounds = {0, 1, 8, 8, 300, 3816, 4000};  // lengths 1, 7, 0, 292, ...
  for (const MaskCase m : {MaskCase{false, -1, -1}, MaskCase{true, -1, -1}, MaskCase{true, 40, -1},
                           MaskCase{false, 5, 9}}) {
    AttentionParams p;
    p.causal = m.causal;
    p.window_left = m.window_left;
    p.window_right = m.window_right;
    p.seq_bounds = bounds.data();
    p.num_seqs = static_cast<int>(bounds.size()) - 1;
    int uniform_runs = 0, straddling_runs = 0;
    for (int64_t q_lo = 0; q_lo < 4000; q_lo += 37) {
      for (const int64_t len : {int64_t{1}, int64_t{16}, int64_t{128}}) {
        const int64_t q_hi = q_lo + len - 1;
        const SeqClamp clamp = SequenceClamp(p, q_lo, q_hi);
        const int64_t seq = SequenceOf(bounds.data(), p.num_seqs, q_lo);
        const bool one_sequence = q_hi < bounds[seq + 1];
        ASSERT_EQ(clamp.uniform, one_sequence) << q_lo << ".." << q_hi;
        (one_sequence ? uniform_runs : straddling_runs)++;
        for (int64_t q = q_lo; q <= q_hi; ++q) {
          const KeySpan want = AllowedKeySpan(p, q);
          const KeySpan got = AllowedKeySpan(p, clamp, q);
          ASSERT_EQ(got.lo, want.lo) << "q " << q;
          ASSERT_EQ(got.hi, want.hi) << "q " << q;
        }
        for (const int64_t k_lo : {int64_t{0}, q_lo - 64, q_lo, q_hi + 1}) {
          const BlockMask want = ClassifyBlock(p, q_lo, q_hi, k_lo, k_lo + 63);
          const BlockMask got = ClassifyBlock(p, clamp, q_lo, q_hi, k_lo, k_lo + 63);
          ASSERT_EQ(got.any, want.any) << q_lo << " " << k_lo;
          ASSERT_EQ(got.all, want.all) << q_lo << " " << k_lo;
        }
      }
    }
    EXPECT_GT(uniform_runs, 100);  // both kinds of run were exercised
    EXPECT_GT(straddling_runs, 3);
  }
}

TEST(SequenceClampTest, WithoutSequencesUniformAndUnbounded) {
  AttentionParams p;
  p.causal = true;
  const SeqClamp clamp = SequenceClamp(p, 10, 500);
  EXPECT_TRUE(clamp.uniform);
  const KeySpan got = AllowedKeySpan(p, clamp, 77);
  const KeySpan want = AllowedKeySpan(p, 77);
  EXPECT_EQ(got.lo, want.lo);
  EXPECT_EQ(got.hi, want.hi);
  EXPECT_TRUE(SequenceClamp<false>(p, 0, 1).uniform);
}

}  // namespace
}  // namespace ringattn
