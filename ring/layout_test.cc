#include "ring/layout.h"

#include <cstdint>
#include <numeric>
#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace ringattn {
namespace {

std::vector<int64_t> Positions(const Shard& shard) {
  std::vector<int64_t> p;
  for (const Segment& s : shard.segments) {
    EXPECT_EQ(s.local_offset, static_cast<int64_t>(p.size()));
    for (int64_t i = 0; i < s.length; ++i) p.push_back(s.start + i * s.stride);
  }
  return p;
}

class LayoutCoverageTest
    : public ::testing::TestWithParam<std::tuple<Layout, int64_t /*seqlen*/, int /*world*/>> {};

// Every position lands in exactly one shard, rows add up, and positions within a segment
// increase (the mask classification relies on it).
TEST_P(LayoutCoverageTest, ShardsPartitionTheSequence) {
  const auto [layout, seqlen, world] = GetParam();
  absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, world, layout);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->shards.size(), static_cast<size_t>(world));
  std::set<int64_t> seen;
  int64_t total = 0;
  for (const Shard& shard : plan->shards) {
    const std::vector<int64_t> pos = Positions(shard);
    EXPECT_EQ(static_cast<int64_t>(pos.size()), shard.rows);
    total += shard.rows;
    for (int64_t p : pos) {
      EXPECT_GE(p, 0);
      EXPECT_LT(p, seqlen);
      EXPECT_TRUE(seen.insert(p).second) << "position " << p << " in two shards";
    }
    for (const Segment& s : shard.segments) EXPECT_GT(s.length, 0);
  }
  EXPECT_EQ(total, seqlen);
  // Balance: shard sizes differ by at most 2 rows (zigzag may give a rank two long chunks).
  int64_t lo = seqlen, hi = 0;
  for (const Shard& s : plan->shards) {
    lo = std::min(lo, s.rows);
    hi = std::max(hi, s.rows);
  }
  EXPECT_LE(hi - lo, 2);
}

INSTANTIATE_TEST_SUITE_P(
    All, LayoutCoverageTest,
    ::testing::Combine(::testing::Values(Layout::kContiguous, Layout::kZigzag, Layout::kStripe),
                       ::testing::Values<int64_t>(0, 1, 7, 16, 255, 3816),
                       ::testing::Values(1, 2, 3, 4, 8)));

TEST(LayoutTest, ZigzagPairsEarlyAndLateChunks) {
  absl::StatusOr<ShardPlan> plan = PlanShards(16, 4, Layout::kZigzag);
  ASSERT_TRUE(plan.ok());
  // 8 chunks of 2: rank 0 holds chunks 0 and 7, rank 3 chunks 3 and 4.
  EXPECT_EQ(Positions(plan->shards[0]), (std::vector<int64_t>{0, 1, 14, 15}));
  EXPECT_EQ(Positions(plan->shards[3]), (std::vector<int64_t>{6, 7, 8, 9}));
}

TEST(LayoutTest, StripeIsStrided) {
  absl::StatusOr<ShardPlan> plan = PlanShards(10, 4, Layout::kStripe);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(Positions(plan->shards[1]), (std::vector<int64_t>{1, 5, 9}));
  EXPECT_EQ(Positions(plan->shards[3]), (std::vector<int64_t>{3, 7}));
  ASSERT_EQ(plan->shards[1].segments.size(), 1u);
  EXPECT_EQ(plan->shards[1].segments[0].stride, 4);
}

TEST(LayoutTest, ContiguousGivesExtraRowsToFirstRanks) {
  absl::StatusOr<ShardPlan> plan = PlanShards(7, 3, Layout::kContiguous);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(Positions(plan->shards[0]), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(Positions(plan->shards[1]), (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(Positions(plan->shards[2]), (std::vector<int64_t>{5, 6}));
  EXPECT_EQ(plan->max_rows(), 3);
}

TEST(LayoutTest, ExtractInsertRoundTrip) {
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStripe}) {
    const int64_t seqlen = 13, outer = 3;
    const size_t row_bytes = 6;
    const int world = 4;
    absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, world, layout);
    ASSERT_TRUE(plan.ok());
    std::vector<uint8_t> whole(outer * seqlen * row_bytes);
    std::iota(whole.begin(), whole.end(), 1);
    std::vector<uint8_t> back(whole.size(), 0);
    for (int r = 0; r < world; ++r) {
      std::vector<uint8_t> shard(outer * plan->shards[r].rows * row_bytes);
      ExtractShard(*plan, r, whole.data(), outer, row_bytes, shard.data());
      // The first row of the shard is the whole tensor's row at the first position.
      if (plan->shards[r].rows > 0) {
        const int64_t first = plan->shards[r].segments[0].start;
        EXPECT_EQ(shard[0], whole[first * row_bytes]) << LayoutName(layout) << " rank " << r;
      }
      InsertShard(*plan, r, shard.data(), outer, row_bytes, back.data());
    }
    EXPECT_EQ(back, whole) << LayoutName(layout);
  }
}

// ShardPieces against the plan's rows one by one: every row of every rank once, in the right place,
// contiguous segments as one run per outer index.
TEST(LayoutTest, ShardPiecesCoverEveryRowOnceAndMergeContiguousRows) {
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStripe}) {
    const int64_t seqlen = 29, outer = 2;
    const size_t row_bytes = 5;
    const int world = 3;
    absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, world, layout);
    ASSERT_TRUE(plan.ok());
    std::vector<int> covered(outer * seqlen, 0);
    for (int r = 0; r < world; ++r) {
      const Shard& shard = plan->shards[r];
      std::vector<std::pair<size_t, size_t>> want;  // (whole byte, shard byte) of every row
      for (int64_t b = 0; b < outer; ++b) {
        for (const Segment& s : shard.segments) {
          for (int64_t i = 0; i < s.length; ++i) {
            want.emplace_back((b * seqlen + s.start + i * s.stride) * row_bytes,
                              (b * shard.rows + s.local_offset + i) * row_bytes);
          }
        }
      }
      std::vector<std::pair<size_t, size_t>> got;
      const std::vector<ShardPiece> runs = ShardPieces(*plan, r, outer, row_bytes);
      for (const ShardPiece& run : runs) {
        ASSERT_EQ(run.bytes % row_bytes, 0u);
        for (size_t k = 0; k < run.bytes / row_bytes; ++k) {
          got.emplace_back(run.whole_offset + k * row_bytes, run.shard_offset + k * row_bytes);
          ++covered[(run.whole_offset + k * row_bytes) / row_bytes];
        }
      }
      EXPECT_EQ(got, want) << LayoutName(layout) << " rank " << r;
      if (layout != Layout::kStripe) {
        EXPECT_EQ(runs.size(), outer * shard.segments.size()) << LayoutName(layout);
      }
    }
    for (int c : covered) EXPECT_EQ(c, 1) << LayoutName(layout);
  }
}

TEST(LayoutTest, ParseAndRefuse) {
  EXPECT_EQ(*ParseLayout("zigzag"), Layout::kZigzag);
  EXPECT_EQ(*ParseLayout("stripe"), Layout::kStripe);
  EXPECT_EQ(*ParseLayout("contiguous"), Layout::kContiguous);
  absl::StatusOr<Layout> bad = ParseLayout("diagonal");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("diagonal"), std::string_view::npos);
  EXPECT_EQ(AutoLayout(true), Layout::kZigzag);
  EXPECT_EQ(AutoLayout(false), Layout::kContiguous);
  EXPECT_FALSE(PlanShards(10, 0, Layout::kStripe).ok());
  EXPECT_FALSE(PlanShards(-1, 2, Layout::kStripe).ok());
}

}  // namespace
}  // namespace ringattn
