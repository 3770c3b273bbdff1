#include "worker/pitched_runs.h"

#include <cstring>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "ring/layout.h"

namespace ringattn {
namespace {

// What a 2-D copy engine does with one run: `count` rows of `bytes`, each at its pitch.
void CopyRun(const std::vector<CopySpan>& spans, const PitchedRun& r) {
  for (size_t i = 0; i < r.count; ++i) {
    std::memcpy(spans[r.first].dst + i * r.dst_pitch, spans[r.first].src + i * r.src_pitch,
                r.bytes);
  }
}

TEST(PitchedRunsTest, RunsCopyWhatTheSpansCopyForEveryLayoutAndWorld) {
  // A whole tensor [outer=3, seq=37 rows of 24 bytes]; each rank's shard gathered out of it and
  // scattered back, by runs, against a plain memcpy per span.
  const int64_t outer = 3, seq = 37;
  const size_t row_bytes = 24;
  std::vector<char> whole(outer * seq * row_bytes);
  std::iota(whole.begin(), whole.end(), 0);
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStripe}) {
    for (int world : {1, 2, 3, 5}) {
      absl::StatusOr<ShardPlan> plan = PlanShards(seq, world, layout);
      ASSERT_TRUE(plan.ok()) << plan.status();
      for (int rank = 0; rank < world; ++rank) {
        SCOPED_TRACE(testing::Message() << static_cast<int>(layout) << " w" << world << " r"
                                        << rank);
        const size_t shard_bytes = outer * plan->shards[rank].rows * row_bytes;
        std::vector<char> want(shard_bytes, 0), got(shard_bytes, 0);
        std::vector<CopySpan> gather, gather_got;
        for (const ShardPiece& p : ShardPieces(*plan, rank, outer, row_bytes)) {
          gather.push_back({want.data() + p.shard_offset, whole.data() + p.whole_offset, p.bytes});
          gather_got.push_back({got.data() + p.shard_offset, whole.data() + p.whole_offset,
                                p.bytes});
        }
        for (const CopySpan& c : gather) std::memcpy(c.dst, c.src, c.bytes);
        const std::vector<PitchedRun> runs = PitchedRuns(gather_got);
        size_t covered = 0;
        for (const PitchedRun& r : runs) {
          EXPECT_EQ(r.first, covered);
          EXPECT_GE(r.dst_pitch, r.bytes);
          EXPECT_GE(r.src_pitch, r.bytes);
          covered += r.count;
          CopyRun(gather_got, r);
        }
        EXPECT_EQ(covered, gather_got.size());
        EXPECT_EQ(got, want);
        // Stripe pieces are rows a world apart: a run per outer index, not per row.
        if (layout == Layout::kStripe && world > 1) {
          EXPECT_LE(runs.size(), static_cast<size_t>(outer)) << gather.size() << " pieces";
        }

        // Back: the shard's rows scattered into a fresh whole.
        std::vector<char> back(whole.size(), 0), back_want(whole.size(), 0);
        std::vector<CopySpan> scatter, scatter_want;
        for (const CopySpan& c : gather_got) {
          const size_t at = static_cast<size_t>(c.src - whole.data());
          scatter.push_back({back.data() + at, c.dst, c.bytes});
          scatter_want.push_back({back_want.data() + at, c.dst, c.bytes});
        }
        for (const CopySpan& c : scatter_want) std::memcpy(c.dst, c.src, c.bytes);
        for (const PitchedRun& r : PitchedRuns(scatter)) CopyRun(scatter, r);
        EXPECT_EQ(back, back_want);
      }
    }
  }
}

TEST(PitchedRunsTest, IrregularSpansStayOneRunEach) {
  std::vector<char> a(100), b(100);
  // Different sizes, a backwards step, overlapping pitch: none can join a run.
  const std::vector<CopySpan> spans = {
      {b.data(), a.data(), 10}, {b.data() + 10, a.data() + 20, 5},
      {b.data() + 15, a.data() + 10, 5}, {b.data() + 18, a.data() + 30, 5}};
  const std::vector<PitchedRun> runs = PitchedRuns(spans);
  ASSERT_EQ(runs.size(), 4u);
  for (size_t i = 0; i < runs.size(); ++i) {
    EXPECT_EQ(runs[i].first, i);
    EXPECT_EQ(runs[i].count, 1u);
    EXPECT_EQ(runs[i].bytes, spans[i].bytes);
  }
  EXPECT_TRUE(PitchedRuns({}).empty());
}

}  // namespace
}  // namespace ringattn
