// One rank's ring as a plan, a pure value: per step the K/V block in hand, the kernel calls over
// it and how they write, what goes to the next rank and comes from the previous one (which
// block, rows, bytes, which buffer); for the backward also the dK/dV accumulators that follow
// their K/V blocks one step behind and the last hop that returns each to its owner. The host and
// device executors (host_ring.h, device_ring.h) run it; schedule_test.cc checks its properties.
//
// Rank r of W, step s: the block in hand is that of rank r - s (mod W): the caller's K/V at
// step 0, receive slot (s - 1) % 2 after. While s < W - 1 it goes to r + 1, and the block of
// r - s - 1 arrives from r - 1 into slot s % 2. The backward (W > 1) adds, at s >= 1, the
// accumulator finished at s - 1 (buffer (s - 1) % 2, block r - s + 1) -> r + 1 and the
// accumulator of block r - s (ranks r - s .. r - 1) <- r - 1 into buffer kDkvReceive; this
// rank's contribution goes to buffer s % 2, and the received one is added to it after the
// step. After step W - 1 the return hop sends buffer (W - 1) % 2 (block r + 1, complete) to
// r + 1 and receives this rank's own. docs/architecture.md ("The ring step") draws it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "kernels/attention_params.h"  // kNoPosSplit
#include "kernels/attention_shape.h"
#include "ring/layout.h"

namespace ringattn {

// Rank r of `world` at step s computes the block of rank (r - s) mod world, sends it to
// r + 1 and receives the block of (r - s - 1) mod world from r - 1.
inline int RingSourceRank(int rank, int step, int world) {
  return ((rank - step) % world + world) % world;
}
inline int RingNextRank(int rank, int world) { return (rank + 1) % world; }
inline int RingPrevRank(int rank, int world) { return (rank + world - 1) % world; }

// One kernel call of a ring step: the local query rows and the block's key rows it covers, as
// segments (rows and positions), with a second run of positions for either when a whole
// two-segment shard (zigzag) goes into the one call.
struct StepCall {
  Segment q, k;
  int64_t q_split = kNoPosSplit, q_start2 = 0;
  int64_t k_split = kNoPosSplit, k_start2 = 0;
};

// The calls of one step of `mine`'s queries against `theirs`' block. With `position_runs` (the
// backend takes two runs of positions) one call, both shards whole, when each is one run or
// two with a common stride in ascending positions (every layout's shards are); otherwise one
// call per (query segment, key segment) pair, as backends that take one run need. One call
// instead of four per zigzag step: one launch with one tail, and one read-merge-write of the
// fp32 accumulators rather than one per key segment.
std::vector<StepCall> StepCalls(const Shard& mine, const Shard& theirs, bool position_runs);

// Whether the step of `mine`'s queries against `theirs`' block is one call (StepCalls) over
// every local query row and every key row of the block, both shards non-empty: a call that,
// made with a writing output mode, writes every row it is responsible for.
bool StepIsOneWholeCall(const Shard& mine, const Shard& theirs, bool position_runs);

// The shard's rows as one segment when its segments follow each other without a gap in
// positions and in local rows (e.g. zigzag with one rank: chunks 0 and 1); nullopt otherwise
// or when the shard is empty. Lets a one-rank ring make a single kernel call.
std::optional<Segment> AsSingleSegment(const Shard& shard);

enum class RingDirection { kForward, kBackward };

// How one step's calls write.
enum class StepOutput {
  // Forward: merged into the fp32 accumulators o and lse, which hold the earlier steps' partial
  // (o = 0 and lse = -inf before the first). Backward: added into dq and the block's dK/dV
  // accumulator. Calls wholly masked are skipped.
  kMerge,
  // Written into the accumulators (forward: o and lse; backward: dq and the block's dK/dV),
  // every row, even one the masks leave without a key: the first step, so that they need no
  // initialisation pass. Only where the step is one call over both whole shards.
  kWrite,
  // Forward only: merged with the accumulators (read only) and written into the caller's out,
  // in its dtype, and lse (AttentionParams::partial_o): the last step, so that the
  // accumulators need no rounding pass. Needs one whole call, partial input and W > 1.
  kFinalize,
};

// What the plan depends on of the backend.
struct RingBackendTraits {
  bool position_runs = false;  // capabilities().position_runs: one call per step (StepCalls)
  bool partial_input = false;  // capabilities().partial_input: the forward's last step finalizes
};

// Buffers the schedule names; the executors map them to memory (host or device).
inline constexpr int kCallerKv = -1;  // the caller's K and V; K/V receive slots are 0 and 1
// dK/dV accumulators: 0 and 1 hold this rank's contribution (alternating steps); this one
// receives the accumulator from r - 1, and at the return hop this rank's own, complete.
inline constexpr int kDkvReceive = 2;

// One block crossing one hop of the ring.
struct Hop {
  int peer = -1;     // r + 1 for a send, r - 1 for a receive
  int block = -1;    // the rank that owns the block: its K/V, or its dK/dV accumulator
  int64_t rows = 0;  // rows of that block
  size_t bytes = 0;  // K/V: of each of K and V (shape's dtype); dK/dV: dk and dv together, fp32
  int buffer = -1;   // read by a send, written by a receive: kCallerKv or a slot; an accumulator
};

struct RingStepPlan {
  int step = 0;
  int block = 0;              // the rank whose K/V block is in hand, computed in this step
  int64_t block_rows = 0;     // its rows
  int kv_buffer = kCallerKv;  // where it is: the caller's K/V or a receive slot
  StepOutput output = StepOutput::kMerge;
  std::vector<StepCall> calls;          // StepCalls(this rank's shard, the block's shard)
  std::optional<Hop> kv_send, kv_recv;  // step < W - 1: the block in hand out, the next in
  int dkv_buffer = -1;  // backward: the accumulator of this rank's contribution (0 or 1)
  std::optional<Hop> dkv_send, dkv_recv;  // backward, step >= 1: one step behind the K/V
  bool has_transfers() const { return kv_send || kv_recv || dkv_send || dkv_recv; }
};

struct RingSchedule {
  RingDirection direction = RingDirection::kForward;
  int rank = 0;
  int world = 1;
  int64_t rows = 0;      // this rank's
  int64_t max_rows = 0;  // the largest shard's: what a receive slot or an accumulator holds
  std::vector<RingStepPlan> steps;  // [world]
  // Backward, W > 1: after the last step the finished accumulator (block r + 1) goes to its
  // owner, and this rank's own arrives (kDkvReceive) complete.
  std::optional<Hop> return_send, return_recv;
  // One rank whose shard is one run of positions (every layout with one rank), or empty: the
  // whole shard as one segment (length 0 when empty). The device executor then makes one call
  // straight into the caller's outputs instead of the steps.
  std::optional<Segment> one_call;

  // Step 0 writes the accumulators: they need no initialisation (o = 0, lse = -inf; dq = 0).
  bool first_writes() const { return steps.front().output == StepOutput::kWrite; }
  // The forward's last step writes the caller's out and lse: no rounding pass after it.
  bool last_finalizes() const { return steps.back().output == StepOutput::kFinalize; }
};

// The schedule of `rank` (in [0, plan.world)) for `direction`. `shape` gives the sizes of a
// row (dtype, batch, heads, heads_k, head_dim; its row counts are not read).
RingSchedule PlanRingSchedule(const ShardPlan& plan, int rank, RingDirection direction,
                              const AttentionShape& shape, const RingBackendTraits& traits);

// Bytes of one dK/dV accumulator of `rows` rows: dk and dv, fp32 [batch, rows, heads_k,
// head_dim] each.
size_t DkvBytes(const AttentionShape& shape, int64_t rows);

}  // namespace ringattn
