// Ring flash attention, backward: the gradients of q, k and v of the ring forward
// (ring_attention.h), with the same shards, layouts and options.
//
// K and V circulate exactly as in the forward (rank r sends to r + 1, receives from r - 1; at
// step s the block in hand is that of rank src = r - s). Each rank computes its queries'
// contribution against the block in hand: dQ accumulates locally in fp32, and the block's
// dK/dV contribution goes into an fp32 accumulator that travels around the ring after its
// K/V block, one step behind, gathering every rank's contribution before a last hop returns it
// to the block's owner.
//
// The schedule, W = 3, blocks A, B, C of ranks 0, 1, 2. Each cell is the block computed in that
// step; "+X" is the accumulator of X arriving during the step, from the rank that computed X
// in the step before; it is added to this rank's contribution to X after the step's compute:
//
//            step 0    step 1       step 2       return hop
//   rank 0   A         C   +C       B   +B       gets A (complete) from rank 2
//   rank 1   B         A   +A       C   +C       gets B (complete) from rank 0
//   rank 2   C         B   +B       A   +A       gets C (complete) from rank 1
//
// In general, at step s rank r posts, in one batch:
//   K, V of block r - s            -> r + 1   (s < W - 1; as the forward)
//   acc of block r - s + 1         -> r + 1   (s >= 1: what it finished at step s - 1)
//   acc of block r - s             <- r - 1   (s >= 1: the block it computes now)
// computes its contribution to block r - s into a fresh fp32 buffer, waits, and adds the
// received accumulator into it: the block's accumulator now holds the contributions of ranks
// r - s, ..., r, in that order. After step W - 1 the accumulator of block r + 1 holds every
// rank's contribution, and one last hop to r + 1 hands it to its owner. The accumulator is
// sent one step behind its K/V so that nothing waits for a compute to finish before its
// transfer can start: every transfer of step s carries what was ready before step s began.
// Every sum is in a fixed order, so the result is deterministic, and it is rounded to the
// output dtype once, at the end, so the error does not grow with W.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention_backward_params.h"
#include "kernels/dtype.h"
#include "ring/layout.h"
#include "ring/ring_backward_step.h"  // RingBackwardTensors, ValidateRingBackward
#include "ring/ring_step.h"           // RingAttentionOptions, RingTimings
#include "ring/transport/communicator.h"

namespace ringattn {

// Runs the backward ring on this rank; `t` holds host pointers (ring_backward_step.h). Every
// rank of `comm` must call it with the same plan, options and sizes as its forward. Timings: one
// entry per step (source_rank is the K/V block computed); the last step's comm_wait_seconds
// includes the return hop. On any failure the communicator is aborted so that peers fail too rather
// than wait.
absl::StatusOr<RingTimings> RingFlashAttnBackward(Communicator& comm,
                                                  AttentionBackwardBackend& backend,
                                                  const ShardPlan& plan,
                                                  const RingBackwardTensors& t,
                                                  const RingAttentionOptions& options);

}  // namespace ringattn
