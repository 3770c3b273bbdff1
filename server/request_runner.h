// Runs one validated request of a compute RPC through the ring, as its table (proto/
// compute_rpcs.h) says: cuts every input into the ranks' shards, calls every worker at once
// (FanOut, carrying the caller's deadline and cancellation), gathers the outputs back into
// sequence order, and fills the response's plan and timings. Tensors in the caller's shared
// memory (`client_shared`) are read and written there: by the workers on this host themselves,
// by the coordinator for the others. With an `arena` (may be null) and workers on this host, the
// request's other tensors go to those workers the same way, through the arena.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "google/protobuf/message.h"
#include "proto/compute_rpcs.h"
#include "ringattn/v1/attention.pb.h"
#include "server/attend_request.h"
#include "server/fan_out.h"
#include "server/ring_manager.h"
#include "server/shared_memory_arena.h"
#include "server/shared_tensors.h"

namespace ringattn {

struct RunControl {
  absl::Time deadline = absl::InfiniteFuture();
  Cancellation* cancellation = nullptr;  // may be null
  // Set to true when the first worker call is issued: a failure before it (a region that
  // shrank) is the request's alone and leaves the ring intact. May be null.
  bool* workers_called = nullptr;
  // Called once, just before the worker calls are issued (not when the request fails before):
  // from then on the next request may start its own scatter while this one computes.
  std::function<void()> fanning_out;
  // Set to true when the request failed by its cancellation or deadline while a request of an
  // earlier turn was still running: its workers were waiting for their turn, which they skip,
  // and the ring is intact. May be null.
  bool* ring_intact = nullptr;
  // The coordinator's shared memory for the request's bytes (see RunOnRing), used by this
  // request alone until it finishes; null: none.
  SharedMemoryArena* arena = nullptr;
  // The request's span (base/trace_context.h), sent as `traceparent` metadata on every worker
  // call; empty: none.
  std::string traceparent;
};

// Room in `arena` for the tensors of `request` that `placed` does not hold: its inputs, then
// the outputs it wants, each at a 256-byte-aligned offset of one mapping (reserved here), as
// SharedTensors by table name. Empty, reserving nothing, when `placed` holds them all. Copies
// no data: the caller fills the inputs (a copy, or a stream's chunks landing there).
absl::StatusOr<SharedTensors> LayOutInArena(const ComputeRpc& rpc, const AttentionShape& shape,
                                            const google::protobuf::Message& request,
                                            const SharedTensors& placed,
                                            SharedMemoryArena& arena);

// Runs `request` (of `rpc`, checked into `problem`) on `ring`: fills the outputs the request
// wants into `response`, and `plan` and the scatter/gather/worker timings. UNAVAILABLE naming the
// worker when one fails (a worker's INVALID_ARGUMENT or UNIMPLEMENTED, e.g. a cuda_reference
// worker refusing the backward, is passed through as it came); DEADLINE_EXCEEDED or CANCELLED
// when those stopped it, every worker call cancelled. Any failure leaves the workers' ring
// broken; the caller reports it.
absl::Status RunOnRing(const ComputeRpc& rpc, const ValidatedAttend& problem,
                       const google::protobuf::Message& request,
                       const SharedTensors& client_shared, SharedMemoryArena* arena,
                       const RingSnapshot& ring,
                       const RunControl& control, google::protobuf::Message* response,
                       v1::ShardPlan* plan, v1::Timings* timings);

}  // namespace ringattn
