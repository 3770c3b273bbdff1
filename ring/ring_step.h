// What the ring executors (host_ring.h, device_ring.h), forward and backward, share: the
// options, the shard tensors and timings they take and return, their checks, one step's kernel
// calls (the backward's built on the forward's) and one step's transfers as the communicators
// take them. Which block, buffer and output mode each step has is the schedule's (schedule.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"
#include "kernels/attention_shape.h"
#include "kernels/dtype.h"
#include "ring/layout.h"
#include "ring/schedule.h"
#include "ring/transport/communicator.h"  // SendOp, RecvOp

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
  float softcap = 0.0f;            // 0 disables
  bool deterministic = false;      // the forward is deterministic either way
  bool return_attn_probs = false;  // refused: the ring never forms the matrix
};

// The element type and sizes of one rank's shard tensors (every rank has the same).
struct RingShardSizes {
  DType dtype = DType::kBF16;  // q, k, v (and out)
  int batch = 0;
  int heads = 0;
  int heads_k = 0;
  int head_dim = 0;

  // The shape of a shard of `rows` rows (queries and keys alike).
  AttentionShape shape(int64_t rows) const {
    return AttentionShape::Self(dtype, batch, rows, heads, heads_k, head_dim);
  }
};

// This rank's shard for the forward, rows in the plan's local order, all contiguous, host or
// device memory as the backend and communicator expect.
struct RingShardTensors : RingShardSizes {
  const void* q = nullptr;  // [batch, rows, heads, head_dim]
  const void* k = nullptr;  // [batch, rows, heads_k, head_dim]
  const void* v = nullptr;  // [batch, rows, heads_k, head_dim]
  void* out = nullptr;      // [batch, rows, heads, head_dim], element type dtype
  float* lse = nullptr;     // [batch, heads, rows], or null
};

// This rank's shard for the backward, as the forward's (host for RingFlashAttnBackward, device
// for RingFlashAttnBackwardDevice).
struct RingBackwardTensors : RingShardSizes {
  DType grad_dtype = DType::kF32;  // dq, dk, dv: dtype or fp32
  const void* q = nullptr;         // [batch, rows, heads, head_dim]
  const void* k = nullptr;         // [batch, rows, heads_k, head_dim]
  const void* v = nullptr;         // [batch, rows, heads_k, head_dim]
  const void* out = nullptr;       // [batch, rows, heads, head_dim]: the ring forward's output
  const float* lse = nullptr;      // [batch, heads, rows]: the ring forward's LSE
  const void* dout = nullptr;      // [batch, rows, heads, head_dim]
  void* dq = nullptr;              // [batch, rows, heads, head_dim], grad_dtype
  void* dk = nullptr;              // [batch, rows, heads_k, head_dim], grad_dtype
  void* dv = nullptr;              // [batch, rows, heads_k, head_dim], grad_dtype
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
  // Device forward: GPU time from the call's first to its last operation on the compute stream
  // (accumulator set-up, steps, waits and rounding), and host time from the call's start until
  // everything was enqueued. total - device is host overhead and the final wait's latency;
  // device - compute - comm wait is set-up and rounding. 0 for the host executor.
  double device_seconds = 0;
  double launch_seconds = 0;
  // Device workers: the inputs' host-to-device and the outputs' device-to-host copies around
  // the ring (outside total_seconds); 0 for the host executor.
  double host_to_device_seconds = 0;
  double device_to_host_seconds = 0;
  double compute_seconds() const;
  double comm_wait_seconds() const;
};

// ---- Checks: every ring refuses alike, before any transfer -----------------------------------

// Checks the options against the sizes (every error names the option).
absl::Status ValidateRingOptions(const RingAttentionOptions& options, const RingShardSizes& t);

// As ValidateRingOptions (dropout and return_attn_probs refused with the forward's errors),
// and grad_dtype.
absl::Status ValidateRingBackward(const RingAttentionOptions& options,
                                  const RingBackwardTensors& t);

// InvalidArgument unless every pointer of `t` is set, when `rank` holds rows > 0 (a rank with
// no rows has nothing to point at).
absl::Status CheckShardTensorsSet(const RingBackwardTensors& t, int rank, int64_t rows);

// options.seq_bounds (packed sequences), when set: InvalidArgument naming seq_bounds unless it
// runs from 0 to the plan's seqlen without decreasing and the backend (`backend_name`) takes
// them (`supported`).
absl::Status CheckPackedSequences(const RingAttentionOptions& options, const ShardPlan& plan,
                                  bool supported, std::string_view backend_name);

// InvalidArgument unless `plan` is for `world` ranks and `rank` is one of them.
absl::Status CheckPlanMatchesGroup(const ShardPlan& plan, int rank, int world);

// options.softmax_scale, or 1 / sqrt(head_dim).
float RingSoftmaxScale(const RingAttentionOptions& options, int head_dim);

// ---- Buffers and transfers --------------------------------------------------------------------

// The K and V of one shard as the ring carries them: each [batch, rows, heads_k, head_dim],
// in the memory the backend reads.
struct KvBlock {
  const std::byte* k = nullptr;
  const std::byte* v = nullptr;
};

// The fp32 dK/dV accumulator of one K/V block of `rows` rows: dk [batch, rows, heads_k,
// head_dim] followed by dv of the same shape, at the start of a buffer sized for the largest
// shard (host or device memory). Sent and received as one transfer of Bytes().
struct DkvBlock {
  float* dk = nullptr;
  float* dv = nullptr;
  size_t elems = 0;  // of each of dk and dv

  static DkvBlock At(float* buffer, const AttentionShape& shape, int64_t rows) {
    const size_t elems = static_cast<size_t>(shape.batch) * rows * shape.kv_row_elems();
    return {buffer, buffer == nullptr ? nullptr : buffer + elems, elems};
  }
  size_t Bytes() const { return 2 * elems * sizeof(float); }
};

// Where one call's buffers are, under the schedule's numbers (host or device memory).
struct RingBuffers {
  KvBlock caller_kv;            // kCallerKv
  std::byte* kv_slots[2] = {};  // each K then V of the largest shard
  size_t kv_slot_v_offset = 0;  // bytes from a slot's K to its V
  float* dkv[3] = {};           // backward: accumulators 0, 1 and kDkvReceive

  KvBlock Kv(int buffer) const {
    if (buffer == kCallerKv) return caller_kv;
    return {kv_slots[buffer], kv_slots[buffer] + kv_slot_v_offset};
  }
};

// One batch of transfers, as Communicator::Start and DeviceCommunicator::Enqueue take it.
struct RingTransfers {
  SendOp sends[4] = {};
  RecvOp recvs[4] = {};
  size_t n_sends = 0, n_recvs = 0;
  absl::Span<const SendOp> send_ops() const { return {sends, n_sends}; }
  absl::Span<const RecvOp> recv_ops() const { return {recvs, n_recvs}; }
};

// A step's batch: K and V of the block in hand to r + 1, then the finished accumulator; from
// r - 1 the next block's K and V, then the accumulator of the block in hand.
RingTransfers StepTransfers(const RingStepPlan& step, const RingBuffers& b);

// The backward's return hop: the finished accumulator of block r + 1 to r + 1, and this rank's
// own from r - 1 into `own` (the kDkvReceive buffer or the caller's dk and dv): dk and dv as
// separate transfers, since `own` may be two buffers.
RingTransfers ReturnHopTransfers(const RingSchedule& s, const RingBuffers& b,
                                 const AttentionShape& shape, const DkvBlock& own);

// ---- One step's kernel calls ------------------------------------------------------------------

// The forward's view of a backward shard (sizes, q, k, v; no out or lse).
RingShardTensors ForwardView(const RingBackwardTensors& t);

// The kernel call for local query segment `qs` against key segment `ks` of a block whose
// shard has `k_rows` rows; merges into the fp32 accumulators o_acc [batch, q_rows, heads,
// head_dim] and lse_acc [batch, heads, q_rows]. `alibi_slopes` ([heads] fp32 or null) must be
// in the backend's memory space: the host executor passes options.alibi_slopes.data(), the
// device executor its device copy.
AttentionParams SegmentPairParams(const RingShardTensors& t, int64_t q_rows, const Segment& qs,
                                  const KvBlock& kv, int64_t k_rows, const Segment& ks,
                                  float* o_acc, float* lse_acc, const RingAttentionOptions& options,
                                  const float* alibi_slopes, float scale);

// The backward call of the same pair, adding into the fp32 dq accumulator [batch, q_rows,
// heads, head_dim] and the block's dK/dV accumulator: SegmentPairParams places q, k, v and the
// positions, its o and lse slots carrying dq and delta (the shapes of the forward's o and lse).
AttentionBackwardParams SegmentPairBackwardParams(const RingBackwardTensors& t, int64_t q_rows,
                                                  const Segment& qs, const KvBlock& kv,
                                                  int64_t k_rows, const Segment& ks, float* dq_acc,
                                                  float* delta, const DkvBlock& dkv,
                                                  const RingAttentionOptions& options,
                                                  const float* alibi, float scale);

// Sets p's second runs of positions from `c` (SegmentPairParams(c.q, c.k) sets the first).
void ApplyPositionRuns(const StepCall& c, AttentionParams* p);

// Whether any (query, key) pair of `p` survives the causal and window masks.
bool AnyKeyAllowed(const AttentionParams& p);

// One forward step: `s`'s queries against the block in hand (`kv`), step.calls into the fp32
// accumulators o_acc, lse_acc as step.output says (kMerge: calls wholly masked skipped; kWrite,
// kFinalize: the one call, always made; kFinalize writes t.out and t.lse). Every call runs in
// `ctx` (the device executor's compute stream; none on the host). Adds the calls made to
// *kernel_calls.
absl::Status ComputeRingStep(AttentionBackend& backend, const ExecutionContext& ctx,
                             const RingSchedule& s, const RingStepPlan& step,
                             const RingShardTensors& t, const KvBlock& kv, float* o_acc,
                             float* lse_acc, const RingAttentionOptions& options,
                             const float* alibi, float scale, int* kernel_calls);

// One backward step, the same calls: adding into dq_acc and `dkv` (kMerge, calls wholly masked
// skipped; the caller zeroes `dkv` first, which holds this rank's contribution to the block
// only), or writing both whole (kWrite: the one call with accumulate off, neither zeroed).
absl::Status ComputeBackwardStep(AttentionBackend& backend, const ExecutionContext& ctx,
                                 const RingSchedule& s, const RingStepPlan& step,
                                 const RingBackwardTensors& t, const KvBlock& kv, float* dq_acc,
                                 float* delta, const DkvBlock& dkv,
                                 const RingAttentionOptions& options, const float* alibi,
                                 float scale, int* kernel_calls);

// D = rowsum(dout * out) of every local query row, by the backend in `ctx`, into delta
// [batch, heads, rows]: once per rank rather than once per call.
absl::Status ComputeShardDelta(AttentionBackend& backend, const ExecutionContext& ctx,
                               const RingBackwardTensors& t, int64_t rows, float* delta);

}  // namespace ringattn
