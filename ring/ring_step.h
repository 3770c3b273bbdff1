// What the host ring driver (ring_attention.h) and the device ring driver (device_ring.h) share:
// the options, the shard tensors and timings they take and return, and one ring step's kernel
// calls. Both drivers run the same algorithm in the same step order; only where the bytes live
// and how a step waits differ, so everything that is neither lives here, once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_params.h"
#include "kernels/dtype.h"
#include "ring/layout.h"

namespace ringattn {

// The options follow ring_flash_attn_func(q, k, v, dropout_p, softmax_scale, causal,
// window_size, alibi_slopes, deterministic, return_attn_probs) of the reference Python ring.
struct RingAttentionOptions {
  // Dropout on the probabilities, in [0, 1): the mask is a hash of (dropout_seed, batch, head,
  // query position, key position) (AttentionParams::dropout_p), the same for every layout,
  // ring size and the backward. Backends without dropout refuse p > 0.
  float dropout_p = 0.0f;
  uint64_t dropout_seed = 0;
  std::optional<float> softmax_scale;  // default 1 / sqrt(head_dim)
  bool causal = false;
  std::pair<int64_t, int64_t> window_size = {-1, -1};  // (left, right); -1 is unbounded
  std::vector<float> alibi_slopes;                     // [heads], host memory, or empty for none
  // Packed variable-length sequences over the whole sequence (FlashAttention's cu_seqlens):
  // [0, ..., seqlen], non-decreasing; sequence i is positions [seq_bounds[i], seq_bounds[i+1])
  // and attends only within itself (AttentionParams::seq_bounds). Empty: one sequence. The cpu
  // kernels take it; the GPU kernels refuse it.
  std::vector<int64_t> seq_bounds;
  float softcap = 0.0f;                                // 0 disables
  bool deterministic = false;                          // the forward is deterministic either way
  bool return_attn_probs = false;                      // refused: the ring never forms the matrix
};

// This rank's shard, rows in the plan's local order, all contiguous, host or device memory as
// the backend and communicator expect.
struct RingShardTensors {
  DType dtype = DType::kBF16;
  int batch = 0;
  int heads = 0;
  int heads_k = 0;
  int head_dim = 0;
  const void* q = nullptr;  // [batch, rows, heads, head_dim]
  const void* k = nullptr;  // [batch, rows, heads_k, head_dim]
  const void* v = nullptr;  // [batch, rows, heads_k, head_dim]
  void* out = nullptr;      // [batch, rows, heads, head_dim], element type dtype
  float* lse = nullptr;     // [batch, heads, rows], or null
};

struct RingStepTiming {
  int source_rank = 0;           // owner of the K/V block computed in this step
  double compute_seconds = 0;    // attention of local Q against the block, merge included
  double comm_wait_seconds = 0;  // time the compute waited for the transfers after it finished
  int kernel_calls = 0;          // segment pairs computed (masked-out pairs are skipped)
};

struct RingTimings {
  std::vector<RingStepTiming> steps;  // [world]
  double total_seconds = 0;
  // Device drivers: GPU time from the call's first to its last operation on the compute stream
  // (accumulator set-up, steps, waits and rounding), and host time from the call's start until
  // everything was enqueued. total - device is host overhead and the final wait's latency;
  // device - compute - comm wait is set-up and rounding. 0 for the host driver.
  double device_seconds = 0;
  double launch_seconds = 0;
  double compute_seconds() const;
  double comm_wait_seconds() const;
};

// Checks the options against the tensors (every error names the option).
absl::Status ValidateRingOptions(const RingAttentionOptions& options, const RingShardTensors& t);

// options.seq_bounds (packed sequences), when set: InvalidArgument naming seq_bounds unless it
// runs from 0 to the plan's seqlen without decreasing and the backend (`backend_name`) takes
// them (`supported`). Every rank refuses alike, before any transfer.
absl::Status CheckPackedSequences(const RingAttentionOptions& options, const ShardPlan& plan,
                                  bool supported, std::string_view backend_name);

// InvalidArgument unless `plan` is for `world` ranks and `rank` is one of them.
absl::Status CheckPlanMatchesGroup(const ShardPlan& plan, int rank, int world);

// options.softmax_scale, or 1 / sqrt(head_dim).
float RingSoftmaxScale(const RingAttentionOptions& options, int head_dim);

// Rank r of `world` at step s computes the block of rank (r - s) mod world, sends it to
// r + 1 and receives the block of (r - s - 1) mod world from r - 1.
inline int RingSourceRank(int rank, int step, int world) {
  return ((rank - step) % world + world) % world;
}
inline int RingNextRank(int rank, int world) { return (rank + 1) % world; }
inline int RingPrevRank(int rank, int world) { return (rank + world - 1) % world; }

// The K and V of one shard as the ring carries them: each [batch, rows, heads_k, head_dim],
// in the memory the backend reads.
struct KvBlock {
  const std::byte* k = nullptr;
  const std::byte* v = nullptr;
};

// Sizes of one rank's tensors, in elements and bytes.
struct ShardGeometry {
  int64_t q_row_elems;   // heads * head_dim
  int64_t kv_row_elems;  // heads_k * head_dim
  size_t elem_bytes;

  static ShardGeometry Of(const RingShardTensors& t) {
    return {static_cast<int64_t>(t.heads) * t.head_dim,
            static_cast<int64_t>(t.heads_k) * t.head_dim, static_cast<size_t>(DTypeSize(t.dtype))};
  }
  // Bytes of one of K or V of a shard of `rows` rows.
  size_t KvBytes(int batch, int64_t rows) const {
    return static_cast<size_t>(batch) * rows * kv_row_elems * elem_bytes;
  }
};

// The kernel call for local query segment `qs` against key segment `ks` of a block whose
// shard has `k_rows` rows; merges into the fp32 accumulators o_acc [batch, q_rows, heads,
// head_dim] and lse_acc [batch, heads, q_rows]. `alibi_slopes` ([heads] fp32 or null) must be
// in the backend's memory space: the host driver passes options.alibi_slopes.data(), the
// device driver its device copy.
AttentionParams SegmentPairParams(const RingShardTensors& t, const ShardGeometry& g, int64_t q_rows,
                                  const Segment& qs, const KvBlock& kv, int64_t k_rows,
                                  const Segment& ks, float* o_acc, float* lse_acc,
                                  const RingAttentionOptions& options, const float* alibi_slopes,
                                  float scale);

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

// Whether the step of `mine`'s queries against `theirs`' block is one call (StepCalls) over every
// local query row and every key row of the block, both shards non-empty: a call that, made with
// a writing output mode, writes every row it is responsible for.
bool StepIsOneWholeCall(const Shard& mine, const Shard& theirs, bool position_runs);

// Sets p's second runs of positions from `c` (SegmentPairParams(c.q, c.k) sets the first).
void ApplyPositionRuns(const StepCall& c, AttentionParams* p);

// Whether any (query, key) pair of `p` survives the causal and window masks.
bool AnyKeyAllowed(const AttentionParams& p);

// Where one ring step's result goes.
enum class StepOutput {
  // Merged into the fp32 accumulators, which hold the earlier steps' partial (o = 0 and
  // lse = -inf before the first).
  kMerge,
  // Written into the accumulators: the first step, so that they need no initialisation pass.
  kWrite,
  // Merged with the accumulators (read only) and written into the caller's out, in its dtype,
  // and lse (AttentionParams::partial_o): the last step, so that the accumulators need no
  // rounding pass.
  kFinalize,
};

struct StepTarget {
  StepOutput mode = StepOutput::kMerge;
  float* o_acc = nullptr;    // [batch, rows, heads, head_dim] fp32
  float* lse_acc = nullptr;  // [batch, heads, rows] fp32
};

// Which of a rank's ring steps write (the first) and finalize (the last) instead of merging.
// Each needs the step to be one kernel call over every local query row (StepCalls), which it
// then makes even where the masks leave it no key (it still writes those rows); finalizing
// also needs a backend that takes a partial (supports_partial_input) and more than one step.
// Where a step does not qualify, the driver initialises the accumulators first (o = 0,
// lse = -inf) or rounds them into out after the last step, as before.
struct RingOutputPlan {
  bool first_writes = false;
  bool last_finalizes = false;
  StepOutput ModeOf(int step, int world) const {
    if (step == 0 && first_writes) return StepOutput::kWrite;
    if (step == world - 1 && last_finalizes) return StepOutput::kFinalize;
    return StepOutput::kMerge;
  }
};
RingOutputPlan PlanRingOutput(const ShardPlan& plan, int rank, int world,
                              const AttentionBackend& backend);

// One ring step's compute: attention of the local queries of `rank` against the block owned by
// `src` (`kv`) in StepCalls' calls, into `target` (kMerge: skipping calls whose positions are
// wholly masked; kWrite and kFinalize: the one call PlanRingOutput vouched for, always made).
// Adds the number of calls made to *kernel_calls.
absl::Status ComputeRingStep(AttentionBackend& backend, const ShardPlan& plan, int rank, int src,
                             const RingShardTensors& t, const ShardGeometry& g, const KvBlock& kv,
                             const StepTarget& target, const RingAttentionOptions& options,
                             const float* alibi_slopes, float scale, int* kernel_calls);

// The shard's rows as one segment when its segments follow each other without a gap in
// positions and in local rows (e.g. zigzag with one rank: chunks 0 and 1); nullopt otherwise
// or when the shard is empty. Lets a one-rank ring make a single kernel call.
std::optional<Segment> AsSingleSegment(const Shard& shard);

}  // namespace ringattn
