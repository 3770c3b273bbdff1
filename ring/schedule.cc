#include "ring/schedule.h"

#include <optional>
#include <vector>

namespace ringattn {
namespace {

// A shard as one call's rows: `whole` covers every row from local row 0 with the first run's
// positions; a second run starts at row `split` at position `start2`.
struct ShardRuns {
  Segment whole;
  int64_t split = kNoPosSplit;
  int64_t start2 = 0;
};

std::optional<ShardRuns> AsPositionRuns(const Shard& shard) {
  if (shard.segments.empty() || shard.segments.size() > 2) return std::nullopt;
  const Segment& a = shard.segments[0];
  if (a.local_offset != 0) return std::nullopt;
  ShardRuns runs;
  runs.whole = a;
  runs.whole.length = shard.rows;
  if (shard.segments.size() == 1) {
    if (a.length != shard.rows) return std::nullopt;
    return runs;
  }
  const Segment& b = shard.segments[1];
  const bool rows_follow = b.local_offset == a.length && a.length + b.length == shard.rows;
  const bool ascending = b.start > a.start + (a.length - 1) * a.stride;
  if (!rows_follow || b.stride != a.stride || !ascending) return std::nullopt;
  runs.split = a.length;
  runs.start2 = b.start;
  return runs;
}

}  // namespace

std::vector<StepCall> StepCalls(const Shard& mine, const Shard& theirs, bool position_runs) {
  std::vector<StepCall> calls;
  if (position_runs) {
    const std::optional<ShardRuns> q = AsPositionRuns(mine);
    const std::optional<ShardRuns> k = AsPositionRuns(theirs);
    if (q.has_value() && k.has_value()) {
      calls.push_back({q->whole, k->whole, q->split, q->start2, k->split, k->start2});
      return calls;
    }
  }
  for (const Segment& qs : mine.segments) {
    for (const Segment& ks : theirs.segments) calls.push_back({qs, ks});
  }
  return calls;
}

bool StepIsOneWholeCall(const Shard& mine, const Shard& theirs, bool position_runs) {
  if (mine.rows == 0 || theirs.rows == 0) return false;
  const std::vector<StepCall> calls = StepCalls(mine, theirs, position_runs);
  return calls.size() == 1 && calls[0].q.local_offset == 0 && calls[0].q.length == mine.rows &&
         calls[0].k.local_offset == 0 && calls[0].k.length == theirs.rows;
}

std::optional<Segment> AsSingleSegment(const Shard& shard) {
  if (shard.segments.empty()) return std::nullopt;
  Segment merged = shard.segments.front();
  if (merged.local_offset != 0) return std::nullopt;
  for (size_t i = 1; i < shard.segments.size(); ++i) {
    const Segment& next = shard.segments[i];
    const bool rows_follow = next.local_offset == merged.local_offset + merged.length;
    const bool positions_follow = next.start == merged.start + merged.length * merged.stride &&
                                  (next.stride == merged.stride || next.length == 1);
    if (!rows_follow || !positions_follow) return std::nullopt;
    merged.length += next.length;
  }
  if (merged.length != shard.rows) return std::nullopt;
  return merged;
}

size_t DkvBytes(const AttentionShape& shape, int64_t rows) {
  return 2 * static_cast<size_t>(shape.batch) * rows * shape.kv_row_elems() * sizeof(float);
}

RingSchedule PlanRingSchedule(const ShardPlan& plan, int rank, RingDirection direction,
                              const AttentionShape& shape, const RingBackendTraits& traits) {
  RingSchedule s;
  s.direction = direction;
  s.rank = rank;
  s.world = plan.world;
  s.rows = plan.shards[rank].rows;
  s.max_rows = plan.max_rows();
  const int world = s.world;
  const int next = RingNextRank(rank, world);
  const int prev = RingPrevRank(rank, world);
  const bool backward = direction == RingDirection::kBackward;
  const Shard& mine = plan.shards[rank];
  auto rows_of = [&](int block) { return plan.shards[block].rows; };
  auto kv_hop = [&](int peer, int block, int buffer) {
    return Hop{peer, block, rows_of(block), shape.WithRows(0, rows_of(block)).kv_bytes(), buffer};
  };
  auto dkv_hop = [&](int peer, int block, int buffer) {
    return Hop{peer, block, rows_of(block), DkvBytes(shape, rows_of(block)), buffer};
  };

  // The first step (the rank's own block) writes, and the forward's last finalizes, where the
  // step is one call over both whole shards (every layout with the cpu and cuda kernels).
  const bool first_writes = StepIsOneWholeCall(mine, mine, traits.position_runs);
  const bool last_finalizes =
      !backward && world > 1 && traits.partial_input &&
      StepIsOneWholeCall(mine, plan.shards[RingSourceRank(rank, world - 1, world)],
                         traits.position_runs);

  s.steps.resize(world);
  for (int step = 0; step < world; ++step) {
    RingStepPlan& p = s.steps[step];
    p.step = step;
    p.block = RingSourceRank(rank, step, world);
    p.block_rows = rows_of(p.block);
    p.kv_buffer = step == 0 ? kCallerKv : (step - 1) % 2;
    if (step == 0 && first_writes) {
      p.output = StepOutput::kWrite;
    } else if (step == world - 1 && last_finalizes) {
      p.output = StepOutput::kFinalize;
    }
    p.calls = StepCalls(mine, plan.shards[p.block], traits.position_runs);
    if (step + 1 < world) {
      p.kv_send = kv_hop(next, p.block, p.kv_buffer);
      p.kv_recv = kv_hop(prev, RingSourceRank(rank, step + 1, world), step % 2);
    }
    if (!backward) continue;
    p.dkv_buffer = step % 2;
    if (step >= 1) {
      p.dkv_send = dkv_hop(next, RingSourceRank(rank, step - 1, world), (step - 1) % 2);
      p.dkv_recv = dkv_hop(prev, p.block, kDkvReceive);
    }
  }
  if (backward && world > 1) {
    s.return_send = dkv_hop(next, RingSourceRank(rank, world - 1, world), (world - 1) % 2);
    s.return_recv = dkv_hop(prev, rank, kDkvReceive);
  }
  if (world == 1) {
    s.one_call = s.rows == 0 ? std::optional<Segment>(Segment{}) : AsSingleSegment(mine);
  }
  return s;
}

}  // namespace ringattn
