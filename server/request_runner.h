// Runs one validated request through the ring: cuts the shards, sends every worker its
// RunShard (or RunShardBackward) concurrently (carrying the remaining deadline), gathers the
// outputs back into sequence order, and fills the response's plan and timings.
#pragma once

#include <atomic>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "ringattn/v1/attention.pb.h"
#include "server/attend_request.h"
#include "server/ring_manager.h"

namespace ringattn {

struct RunControl {
  absl::Time deadline = absl::InfiniteFuture();
  // Set when the client went away; the runner cancels the worker calls.
  const std::atomic<bool>* cancelled = nullptr;
};

// Fills response->out, lse (when asked), plan and the scatter/gather/worker timings.
// UNAVAILABLE naming the worker when one fails; DEADLINE_EXCEEDED or CANCELLED when those
// stopped it. Any failure leaves the workers' ring broken; the caller reports it.
absl::Status RunOnRing(const v1::AttendRequest& request, const ValidatedAttend& problem,
                       const RingSnapshot& ring, const RunControl& control,
                       v1::AttendResponse* response);

// The backward: scatters q, k, v, out, dout and lse, gathers dq, dk and dv (in q's dtype) and
// fills the plan and timings; failures as RunOnRing (a worker's INVALID_ARGUMENT or
// UNIMPLEMENTED, e.g. a cuda_reference worker refusing the backward, is passed through as it
// came).
absl::Status RunBackwardOnRing(const v1::AttendBackwardRequest& request,
                               const ValidatedAttendBackward& problem, const RingSnapshot& ring,
                               const RunControl& control, v1::AttendBackwardResponse* response);

}  // namespace ringattn
