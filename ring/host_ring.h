// Ring flash attention, forward: every rank holds one shard of Q, K and V (ShardPlan); K/V
// blocks travel around the ring (rank r sends to r + 1 and receives from r - 1) while each rank
// computes its queries against the block in hand; partial results merge by log-sum-exp into
// fp32 accumulators, so the error does not grow with the number of ranks.
//
// This is the host driver (host backend, host transport); device_ring.h is its device twin.
#pragma once

#include "absl/status/statusor.h"
#include "kernels/attention_backend.h"
#include "ring/layout.h"
#include "ring/transport/communicator.h"
// RingAttentionOptions, RingShardTensors, RingTimings and ValidateRingOptions live in
// ring_step.h, shared with the device driver (device_ring.h).
#include "ring/ring_step.h"

namespace ringattn {

// Runs the forward ring on this rank. Every rank of `comm` must call it with the same plan,
// options and sizes. On any failure the communicator is aborted so that peers fail too
// rather than wait.
absl::StatusOr<RingTimings> RingFlashAttnForward(Communicator& comm, AttentionBackend& backend,
                                                 const ShardPlan& plan, const RingShardTensors& t,
                                                 const RingAttentionOptions& options);

}  // namespace ringattn
