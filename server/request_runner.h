// Runs one validated request through the ring: cuts the shards, sends every worker its
// RunShard concurrently (carrying the remaining deadline), gathers the outputs back into
// sequence order, and fills the response's plan and timings.
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

}  // namespace ringattn
