// Ring flash attention on the host, forward and backward: the host executor of the ring's
// schedule (schedule.h) over a host Communicator and a host backend. Every rank holds one
// shard of Q, K and V (ShardPlan); K/V blocks travel around the ring (rank r sends to r + 1 and
// receives from r - 1) while each rank computes its queries against the block in hand.
//
// Forward: partial results merge by log-sum-exp into fp32 accumulators, rounded once at the
// end, so the error does not grow with the number of ranks. Backward: dQ accumulates locally in
// fp32; each block's fp32 dK/dV accumulator follows its K/V block one step behind, gathering
// every rank's contribution in a fixed order, and a last hop returns it to its owner.
//
// Per step the executor posts the step's transfers (Communicator::Start), computes the block in
// hand, waits for the transfers and, in the backward, adds the received accumulator to its own
// contribution. Kernels get the communicator's aborted() to poll (ExecutionContext::cancel):
// an abort (a cancelled request, a deadline, a failed peer) stops the step in hand within a
// block of work and fails the call with the abort's reason. device_ring.h is the device
// executor of the same schedule.
#pragma once

#include "absl/status/statusor.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_backward_params.h"
#include "ring/layout.h"
#include "ring/ring_step.h"  // RingAttentionOptions, Ring{Shard,Backward}Tensors, RingTimings
#include "ring/transport/communicator.h"

namespace ringattn {

// Runs the forward ring on this rank. Every rank of `comm` must call it with the same plan,
// options and sizes. On any failure the communicator is aborted so that peers fail too
// rather than wait.
absl::StatusOr<RingTimings> RingFlashAttnForward(Communicator& comm, AttentionBackend& backend,
                                                 const ShardPlan& plan, const RingShardTensors& t,
                                                 const RingAttentionOptions& options);

// Runs the backward ring on this rank: the gradients of q, k and v of the forward with the same
// plan, options and sizes on every rank. Timings: one entry per step (source_rank is the K/V
// block computed); the last step's comm_wait_seconds includes the return hop. Failures abort
// the communicator, as the forward's.
absl::StatusOr<RingTimings> RingFlashAttnBackward(Communicator& comm, AttentionBackend& backend,
                                                  const ShardPlan& plan,
                                                  const RingBackwardTensors& t,
                                                  const RingAttentionOptions& options);

}  // namespace ringattn
