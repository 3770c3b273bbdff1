// The ring's schedule as a pure value: its properties over every layout, W = 1..5, lengths
// that leave ranks without rows or with uneven shards, both directions and every backend
// trait; then the transfers a step's hops become, and the step calls the schedule holds.
#include "ring/schedule.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention_params.h"
#include "kernels/score_mod.h"
#include "ring/layout.h"
#include "ring/ring_step.h"

namespace ringattn {
namespace {

constexpr Layout kLayouts[] = {Layout::kContiguous, Layout::kZigzag, Layout::kStripe};
constexpr RingDirection kDirections[] = {RingDirection::kForward, RingDirection::kBackward};

// bf16, batch 2, 4 query heads over 2 K/V heads of 64.
const AttentionShape kShape = AttentionShape::Self(DType::kBF16, 2, 0, 4, 2, 64);

// Bytes of K (or V) and of a dK/dV accumulator of `rows` rows, counted here independently.
size_t KvBytesOf(int64_t rows) { return static_cast<size_t>(2 * rows * 2 * 64 * 2); }
size_t DkvBytesOf(int64_t rows) { return static_cast<size_t>(2 * 2 * rows * 2 * 64 * 4); }

const char* Name(RingDirection d) { return d == RingDirection::kForward ? "forward" : "backward"; }

// Every rank's schedule of one case.
struct Case {
  ShardPlan plan;
  RingDirection direction;
  RingBackendTraits traits;
  std::vector<RingSchedule> ranks;  // [world]
};

// Calls fn(case) for each layout, W = 1..5, lengths 1, 2, 7 (ranks without rows or with one),
// 13 and 1001 (uneven), both directions and the four trait combinations, under a trace.
void ForEachCase(const std::function<void(const Case&)>& fn) {
  for (Layout layout : kLayouts) {
    for (int world = 1; world <= 5; ++world) {
      for (int64_t seqlen : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{13}, int64_t{1001}}) {
        absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, world, layout);
        ASSERT_TRUE(plan.ok()) << plan.status();
        for (RingDirection direction : kDirections) {
          for (bool runs : {false, true}) {
            for (bool partial : {false, true}) {
              SCOPED_TRACE(absl::StrCat(std::string(LayoutName(layout)), " W=", world,
                                        " s=", seqlen, " ", Name(direction), " runs=", runs,
                                        " partial=", partial));
              Case c{*plan, direction, {runs, partial}, {}};
              for (int r = 0; r < world; ++r) {
                c.ranks.push_back(PlanRingSchedule(*plan, r, direction, kShape, c.traits));
              }
              fn(c);
            }
          }
        }
      }
    }
  }
}

TEST(RingSchedule, EveryRankComputesEveryBlockExactlyOnce) {
  ForEachCase([](const Case& c) {
    const int world = c.plan.world;
    for (const RingSchedule& s : c.ranks) {
      SCOPED_TRACE(absl::StrCat("rank ", s.rank));
      EXPECT_EQ(s.world, world);
      EXPECT_EQ(s.rows, c.plan.shards[s.rank].rows);
      EXPECT_EQ(s.max_rows, c.plan.max_rows());
      ASSERT_EQ(s.steps.size(), static_cast<size_t>(world));
      std::vector<int> computed(world, 0);
      for (int i = 0; i < world; ++i) {
        const RingStepPlan& step = s.steps[i];
        EXPECT_EQ(step.step, i);
        ASSERT_GE(step.block, 0);
        ASSERT_LT(step.block, world);
        ++computed[step.block];
        EXPECT_EQ(step.block_rows, c.plan.shards[step.block].rows);
        EXPECT_EQ(step.calls.size(), StepCalls(c.plan.shards[s.rank], c.plan.shards[step.block],
                                               c.traits.position_runs)
                                         .size());
      }
      EXPECT_EQ(s.steps[0].block, s.rank) << "step 0 computes the rank's own block";
      EXPECT_EQ(s.steps[0].kv_buffer, kCallerKv) << "step 0 reads the caller's K/V";
      for (int b = 0; b < world; ++b) EXPECT_EQ(computed[b], 1) << "block " << b;
    }
  });
}

void ExpectSameHop(const std::optional<Hop>& send, const std::optional<Hop>& recv, int from, int to,
                   const std::string& what) {
  ASSERT_EQ(send.has_value(), recv.has_value()) << what;
  if (!send) return;
  EXPECT_EQ(send->peer, to) << what;
  EXPECT_EQ(recv->peer, from) << what;
  EXPECT_EQ(send->block, recv->block) << what;
  EXPECT_EQ(send->rows, recv->rows) << what;
  EXPECT_EQ(send->bytes, recv->bytes) << what;
}

// What rank r posts at step s is what r + 1 posts to receive at step s: peer, block, rows and
// bytes; and the bytes are those of the block's rows.
TEST(RingSchedule, EverySendMatchesTheNextRanksReceive) {
  ForEachCase([](const Case& c) {
    const int world = c.plan.world;
    const bool backward = c.direction == RingDirection::kBackward;
    for (int r = 0; r < world; ++r) {
      const RingSchedule& s = c.ranks[r];
      const RingSchedule& next = c.ranks[(r + 1) % world];
      for (int i = 0; i < world; ++i) {
        const RingStepPlan& step = s.steps[i];
        const std::string at = absl::StrCat("rank ", r, " step ", i);
        EXPECT_EQ(step.kv_send.has_value(), i + 1 < world) << at;
        EXPECT_EQ(step.dkv_send.has_value(), backward && i >= 1) << at;
        EXPECT_EQ(step.has_transfers(), i + 1 < world || (backward && i >= 1)) << at;
        ExpectSameHop(step.kv_send, next.steps[i].kv_recv, r, (r + 1) % world, at + " K/V");
        ExpectSameHop(step.dkv_send, next.steps[i].dkv_recv, r, (r + 1) % world, at + " dK/dV");
        for (const std::optional<Hop>& h : {step.kv_send, step.kv_recv}) {
          if (h) EXPECT_EQ(h->bytes, KvBytesOf(c.plan.shards[h->block].rows)) << at;
        }
        for (const std::optional<Hop>& h : {step.dkv_send, step.dkv_recv}) {
          if (h) EXPECT_EQ(h->bytes, DkvBytesOf(c.plan.shards[h->block].rows)) << at;
        }
      }
      EXPECT_EQ(s.return_send.has_value(), backward && world > 1);
      ExpectSameHop(s.return_send, next.return_recv, r, (r + 1) % world, "return hop");
      if (s.return_recv) EXPECT_EQ(s.return_recv->block, r) << "the return hop brings the own";
    }
  });
}

// Following the K/V bytes: what each buffer holds is the block the schedule says is in hand or
// sent; a receive never lands in the buffer in hand, and fits a slot.
TEST(RingSchedule, ReceiveSlotsNeverOverwriteTheBlockInHand) {
  ForEachCase([](const Case& c) {
    for (const RingSchedule& s : c.ranks) {
      SCOPED_TRACE(absl::StrCat("rank ", s.rank));
      int slot_holds[2] = {-1, -1};  // block in each receive slot
      auto holds = [&](int buffer) { return buffer == kCallerKv ? s.rank : slot_holds[buffer]; };
      for (const RingStepPlan& step : s.steps) {
        EXPECT_EQ(holds(step.kv_buffer), step.block) << "step " << step.step;
        if (step.kv_send) {
          EXPECT_EQ(step.kv_send->buffer, step.kv_buffer);
          EXPECT_EQ(step.kv_send->block, step.block);
        }
        if (!step.kv_recv) continue;
        ASSERT_TRUE(step.kv_recv->buffer == 0 || step.kv_recv->buffer == 1);
        EXPECT_NE(step.kv_recv->buffer, step.kv_buffer) << "step " << step.step;
        EXPECT_LE(step.kv_recv->bytes, KvBytesOf(s.max_rows));
        slot_holds[step.kv_recv->buffer] = step.kv_recv->block;
      }
    }
  });
}

// What one dK/dV buffer holds: the block it belongs to and the ranks whose contribution it
// sums, in the order they were added.
struct Accumulator {
  int block = -1;
  std::vector<int> ranks;
};

// All ranks in lockstep, following the backward's accumulators: each is one block's, sums each
// rank's contribution once, in a fixed order, and ends complete at its owner; the buffer
// computed into is neither the one sent nor the one received into.
TEST(RingSchedule, BackwardAccumulatorsReturnCompleteToTheirOwners) {
  ForEachCase([](const Case& c) {
    if (c.direction != RingDirection::kBackward) return;
    const int world = c.plan.world;
    std::vector<std::vector<Accumulator>> acc(world, std::vector<Accumulator>(3));
    auto deliver = [&](auto hop_of) {  // every rank's send lands in the next rank's receive
      std::vector<Accumulator> sent(world);
      for (int r = 0; r < world; ++r) {
        if (const std::optional<Hop>& h = hop_of(r, true)) {
          sent[r] = acc[r][h->buffer];
          EXPECT_EQ(sent[r].block, h->block) << "rank " << r << " sends another block";
        }
      }
      for (int r = 0; r < world; ++r) {
        if (const std::optional<Hop>& h = hop_of(r, false)) {
          const int prev = (r + world - 1) % world;
          EXPECT_EQ(sent[prev].block, h->block) << "rank " << r << " receives another block";
          acc[r][h->buffer] = sent[prev];
        }
      }
    };
    for (int i = 0; i < world; ++i) {
      for (int r = 0; r < world; ++r) {
        const RingStepPlan& step = c.ranks[r].steps[i];
        ASSERT_TRUE(step.dkv_buffer == 0 || step.dkv_buffer == 1);
        if (step.dkv_send) EXPECT_NE(step.dkv_send->buffer, step.dkv_buffer);
        if (step.dkv_recv) {
          EXPECT_EQ(step.dkv_recv->buffer, kDkvReceive);
          EXPECT_EQ(step.dkv_recv->block, step.block) << "the accumulator of the block in hand";
        }
      }
      // Posted before the compute, which writes another buffer: the send reads what was there.
      deliver([&](int r, bool send) -> const std::optional<Hop>& {
        const RingStepPlan& step = c.ranks[r].steps[i];
        return send ? step.dkv_send : step.dkv_recv;
      });
      for (int r = 0; r < world; ++r) {
        const RingStepPlan& step = c.ranks[r].steps[i];
        Accumulator& mine = acc[r][step.dkv_buffer];
        mine = {step.block, {r}};  // this rank's contribution only (written or zeroed first)
        if (!step.dkv_recv) continue;
        const Accumulator& received = acc[r][step.dkv_recv->buffer];
        ASSERT_EQ(received.block, mine.block);
        mine.ranks.insert(mine.ranks.begin(), received.ranks.begin(), received.ranks.end());
      }
    }
    deliver([&](int r, bool send) -> const std::optional<Hop>& {
      return send ? c.ranks[r].return_send : c.ranks[r].return_recv;
    });
    for (int r = 0; r < world; ++r) {
      const RingSchedule& s = c.ranks[r];
      const Accumulator& own =
          acc[r][s.return_recv ? s.return_recv->buffer : s.steps.back().dkv_buffer];
      EXPECT_EQ(own.block, r);
      // Ranks r, r + 1, ..., r - 1: every rank once, in the order the ring visits the block.
      std::vector<int> want;
      for (int k = 0; k < world; ++k) want.push_back((r + k) % world);
      EXPECT_EQ(own.ranks, want) << "rank " << r;
    }
  });
}

// The first step writes the accumulators and the forward's last finalizes exactly where that
// step is one call over every local row: always with position runs (every layout, any W,
// uneven shards), only for one-segment shards without; finalizing needs partial input and
// W > 1. Every other step merges; a writing step is one call.
TEST(RingSchedule, WritesAndFinalizesWhereAStepIsOneWholeCall) {
  ForEachCase([](const Case& c) {
    const int world = c.plan.world;
    for (const RingSchedule& s : c.ranks) {
      SCOPED_TRACE(absl::StrCat("rank ", s.rank));
      const Shard& mine = c.plan.shards[s.rank];
      const Shard& last = c.plan.shards[s.steps.back().block];
      const bool runs = c.traits.position_runs;
      const bool whole_first = mine.rows > 0 && (runs || mine.segments.size() == 1);
      const bool whole_last = mine.rows > 0 && last.rows > 0 &&
                              (runs || (mine.segments.size() == 1 && last.segments.size() == 1));
      EXPECT_EQ(s.first_writes(), whole_first);
      EXPECT_EQ(s.last_finalizes(), c.direction == RingDirection::kForward &&
                                        c.traits.partial_input && world > 1 && whole_last);
      for (const RingStepPlan& step : s.steps) {
        const bool first = step.step == 0 && s.first_writes();
        const bool last_step = step.step == world - 1 && world > 1 && s.last_finalizes();
        EXPECT_EQ(step.output, first       ? StepOutput::kWrite
                               : last_step ? StepOutput::kFinalize
                                           : StepOutput::kMerge)
            << "step " << step.step;
        if (step.output != StepOutput::kMerge) {
          ASSERT_EQ(step.calls.size(), 1u);
          EXPECT_EQ(step.calls[0].q.length, s.rows);
          EXPECT_EQ(step.calls[0].k.length, step.block_rows);
        }
      }
    }
  });
}

// One rank: its shard as one segment (every layout), for the device's single call.
TEST(RingSchedule, OneRankIsOneCall) {
  ForEachCase([](const Case& c) {
    for (const RingSchedule& s : c.ranks) {
      ASSERT_EQ(s.one_call.has_value(), c.plan.world == 1);
      if (!s.one_call) continue;
      EXPECT_EQ(s.one_call->start, 0);
      EXPECT_EQ(s.one_call->stride, 1);
      EXPECT_EQ(s.one_call->length, s.rows);
      EXPECT_EQ(s.one_call->local_offset, 0);
    }
  });
}

// ---- The pieces the schedule is made of ------------------------------------------------------

TEST(RingScheduleParts, SourceRanksWalkBackwards) {
  EXPECT_EQ(RingSourceRank(0, 0, 4), 0);
  EXPECT_EQ(RingSourceRank(0, 1, 4), 3);
  EXPECT_EQ(RingSourceRank(2, 3, 4), 3);
  EXPECT_EQ(RingNextRank(3, 4), 0);
  EXPECT_EQ(RingPrevRank(0, 4), 3);
}

TEST(RingScheduleParts, OneRankShardsAreOneSegmentInEveryLayout) {
  for (Layout layout : kLayouts) {
    for (int64_t seqlen : {1, 2, 7, 255}) {
      absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, 1, layout);
      ASSERT_TRUE(plan.ok());
      const std::optional<Segment> s = AsSingleSegment(plan->shards[0]);
      ASSERT_TRUE(s.has_value()) << LayoutName(layout) << " s=" << seqlen;
      EXPECT_EQ(s->start, 0);
      EXPECT_EQ(s->stride, 1);
      EXPECT_EQ(s->length, seqlen);
      EXPECT_EQ(s->local_offset, 0);
    }
  }
}

TEST(RingScheduleParts, SegmentsThatDoNotFollowAreNotMerged) {
  Shard swapped;  // positions 4..7 first, then 0..3
  swapped.segments = {{4, 1, 4, 0}, {0, 1, 4, 4}};
  swapped.rows = 8;
  EXPECT_FALSE(AsSingleSegment(swapped).has_value());
  absl::StatusOr<ShardPlan> zigzag = PlanShards(16, 2, Layout::kZigzag);  // chunks 0 and 3
  ASSERT_TRUE(zigzag.ok());
  EXPECT_FALSE(AsSingleSegment(zigzag->shards[0]).has_value());
  EXPECT_FALSE(AsSingleSegment(Shard{}).has_value());
}

// Every row's position through the call's params equals the plan's position of that row.
void ExpectCallPositions(const StepCall& c, const Shard& mine, const Shard& theirs) {
  AttentionParams p;
  p.q_pos_offset = c.q.start;
  p.q_pos_stride = c.q.stride;
  p.k_pos_offset = c.k.start;
  p.k_pos_stride = c.k.stride;
  ApplyPositionRuns(c, &p);
  for (const auto& [shard, seg, pos] :
       {std::tuple{&mine, c.q, &QueryPos}, std::tuple{&theirs, c.k, &KeyPos}}) {
    for (const Segment& s : shard->segments) {
      for (int64_t i = 0; i < s.length; ++i) {
        const int64_t row = s.local_offset + i - seg.local_offset;
        EXPECT_EQ(pos(p, row), s.start + i * s.stride) << "row " << row;
      }
    }
  }
}

TEST(RingScheduleParts, OneCallPerStepWithPositionRuns) {
  for (Layout layout : kLayouts) {
    for (int world : {1, 2, 3, 4}) {
      for (int64_t seqlen : {int64_t{7}, int64_t{64}, int64_t{1001}}) {
        absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, world, layout);
        ASSERT_TRUE(plan.ok()) << plan.status();
        for (int r = 0; r < world; ++r) {
          for (int src = 0; src < world; ++src) {
            SCOPED_TRACE(absl::StrCat(std::string(LayoutName(layout)), " W=", world, " s=", seqlen,
                                      " rank ", r, " block ", src));
            const Shard& mine = plan->shards[r];
            const Shard& theirs = plan->shards[src];
            const std::vector<StepCall> runs = StepCalls(mine, theirs, true);
            const std::vector<StepCall> pairs = StepCalls(mine, theirs, false);
            EXPECT_EQ(pairs.size(), mine.segments.size() * theirs.segments.size());
            if (mine.segments.empty() || theirs.segments.empty()) continue;
            ASSERT_EQ(runs.size(), 1u);
            EXPECT_EQ(runs[0].q.length, mine.rows);
            EXPECT_EQ(runs[0].k.length, theirs.rows);
            ExpectCallPositions(runs[0], mine, theirs);
          }
        }
      }
    }
  }
}

// ---- From hops to transfers ---------------------------------------------------------------------

TEST(RingTransfers, DkvBlockPlacesDvAfterDk) {
  std::vector<float> buffer(DkvBytes(kShape, 5) / sizeof(float));
  EXPECT_EQ(buffer.size(), 2u * 2 * 5 * 128);
  const DkvBlock b = DkvBlock::At(buffer.data(), kShape, 5);
  EXPECT_EQ(b.elems, 2u * 5 * 128);
  EXPECT_EQ(b.dv, b.dk + b.elems);
  EXPECT_EQ(b.Bytes(), buffer.size() * sizeof(float));
  const DkvBlock empty = DkvBlock::At(nullptr, kShape, 0);
  EXPECT_EQ(empty.dk, nullptr);
  EXPECT_EQ(empty.dv, nullptr);
  EXPECT_EQ(empty.Bytes(), 0u);
}

// A step's batch: K then V of the buffer in hand and the finished accumulator out; K and V
// into the receive slot and the accumulator into kDkvReceive in; the return hop as dk and dv.
TEST(RingTransfers, StepBatchesFollowTheHops) {
  absl::StatusOr<ShardPlan> plan = PlanShards(1001, 3, Layout::kZigzag);
  ASSERT_TRUE(plan.ok());
  const RingSchedule s =
      PlanRingSchedule(*plan, 1, RingDirection::kBackward, kShape, {true, false});
  std::vector<std::byte> caller(2 * KvBytesOf(s.rows)), slots[2];
  std::vector<float> dkv[3];
  RingBuffers b;
  b.caller_kv = {caller.data(), caller.data() + KvBytesOf(s.rows)};
  b.kv_slot_v_offset = KvBytesOf(s.max_rows);
  for (int i = 0; i < 2; ++i) {
    slots[i].resize(2 * b.kv_slot_v_offset);
    b.kv_slots[i] = slots[i].data();
  }
  for (int i = 0; i < 3; ++i) {
    dkv[i].resize(DkvBytes(kShape, s.max_rows) / sizeof(float));
    b.dkv[i] = dkv[i].data();
  }
  for (const RingStepPlan& step : s.steps) {
    SCOPED_TRACE(absl::StrCat("step ", step.step));
    const RingTransfers x = StepTransfers(step, b);
    const size_t kv = step.kv_send ? 2 : 0;
    ASSERT_EQ(x.n_sends, kv + (step.dkv_send ? 1 : 0));
    ASSERT_EQ(x.n_recvs, kv + (step.dkv_recv ? 1 : 0));
    if (step.kv_send) {
      const KvBlock in_hand = b.Kv(step.kv_buffer);
      EXPECT_EQ(x.sends[0].data, in_hand.k);
      EXPECT_EQ(x.sends[1].data, in_hand.v);
      EXPECT_EQ(x.recvs[0].data, b.kv_slots[step.kv_recv->buffer]);
      EXPECT_EQ(x.recvs[1].data, b.kv_slots[step.kv_recv->buffer] + b.kv_slot_v_offset);
      for (size_t i = 0; i < 2; ++i) {
        EXPECT_EQ(x.sends[i].peer, 2);
        EXPECT_EQ(x.recvs[i].peer, 0);
        EXPECT_EQ(x.sends[i].bytes, KvBytesOf(step.block_rows));
      }
    }
    if (step.dkv_send) {
      EXPECT_EQ(x.sends[kv].data, b.dkv[step.dkv_send->buffer]);
      EXPECT_EQ(x.recvs[kv].data, b.dkv[kDkvReceive]);
      EXPECT_EQ(x.recvs[kv].bytes, DkvBytesOf(step.block_rows));
    }
  }
  std::vector<float> own_dk(DkvBytes(kShape, s.rows) / sizeof(float) / 2), own_dv(own_dk.size());
  const DkvBlock own{own_dk.data(), own_dv.data(), own_dk.size()};
  const RingTransfers hop = ReturnHopTransfers(s, b, kShape, own);
  ASSERT_EQ(hop.n_sends, 2u);
  ASSERT_EQ(hop.n_recvs, 2u);
  const DkvBlock finished = DkvBlock::At(b.dkv[s.return_send->buffer], kShape, s.return_send->rows);
  EXPECT_EQ(hop.sends[0].data, finished.dk);
  EXPECT_EQ(hop.sends[1].data, finished.dv);
  EXPECT_EQ(hop.sends[0].bytes + hop.sends[1].bytes, s.return_send->bytes);
  EXPECT_EQ(hop.recvs[0].data, own.dk);
  EXPECT_EQ(hop.recvs[1].data, own.dv);
  EXPECT_EQ(hop.recvs[0].bytes + hop.recvs[1].bytes, s.return_recv->bytes);
}

}  // namespace
}  // namespace ringattn
