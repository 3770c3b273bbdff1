// Ring flash attention, forward: every rank holds one shard of Q, K and V (ShardPlan); K/V
// blocks travel around the ring (rank r sends to r + 1 and receives from r - 1) while each rank
// computes its queries against the block in hand; partial results merge by log-sum-exp into
// fp32 accumulators, so the error does not grow with the number of ranks.
//
// The options follow ring_flash_attn_func(q, k, v, dropout_p, softmax_scale, causal,
// window_size, alibi_slopes, deterministic, return_attn_probs) of the reference Python ring.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention_backend.h"
#include "kernels/dtype.h"
#include "worker/ring/communicator.h"
#include "worker/ring/layout.h"

namespace ringattn {

struct RingAttentionOptions {
  float dropout_p = 0.0f;                   // must be 0: dropout needs the training path
  std::optional<float> softmax_scale;       // default 1 / sqrt(head_dim)
  bool causal = false;
  std::pair<int64_t, int64_t> window_size = {-1, -1};  // (left, right); -1 is unbounded
  std::vector<float> alibi_slopes;          // [heads], or empty for none
  float softcap = 0.0f;                     // 0 disables
  bool deterministic = false;               // the forward is deterministic either way
  bool return_attn_probs = false;           // refused: the ring never forms the matrix
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
  int source_rank = 0;          // owner of the K/V block computed in this step
  double compute_seconds = 0;   // attention of local Q against the block, merge included
  double comm_wait_seconds = 0; // time blocked in Wait after the compute finished
  int kernel_calls = 0;         // segment pairs computed (masked-out pairs are skipped)
};

struct RingTimings {
  std::vector<RingStepTiming> steps;  // [world]
  double total_seconds = 0;
  double compute_seconds() const;
  double comm_wait_seconds() const;
};

// Checks the options against the tensors (every error names the option).
absl::Status ValidateRingOptions(const RingAttentionOptions& options, const RingShardTensors& t);

// Runs the forward ring on this rank. Every rank of `comm` must call it with the same plan,
// options and sizes. On any failure the communicator is aborted so that peers fail too
// rather than wait.
absl::StatusOr<RingTimings> RingFlashAttnForward(Communicator& comm, AttentionBackend& backend,
                                                 const ShardPlan& plan, const RingShardTensors& t,
                                                 const RingAttentionOptions& options);

}  // namespace ringattn
