// Runs one validated request of a compute RPC through the ring, as its table (proto/
// compute_rpcs.h) says: cuts every input into the ranks' shards, starts every worker's call at
// once with the gRPC callback API (carrying the caller's deadline), gathers the outputs back
// into sequence order, and fills the response's plan and timings.
#pragma once

#include <functional>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "google/protobuf/message.h"
#include "proto/compute_rpcs.h"
#include "ringattn/v1/attention.pb.h"
#include "server/attend_request.h"
#include "server/ring_manager.h"

namespace ringattn {

// The cancellation of one request: raised at most once, by whoever learns that its client went
// away or its deadline passed, and watched by whoever runs it. Thread-safe.
class Cancellation {
 public:
  // Records `reason` (CANCELLED or DEADLINE_EXCEEDED) and calls the listener; only the first
  // call counts.
  void Cancel(absl::Status reason) ABSL_LOCKS_EXCLUDED(mu_);
  // OK until cancelled, then the reason.
  absl::Status reason() const ABSL_LOCKS_EXCLUDED(mu_);
  // Calls `listener` (it must not block) on Cancel, or now when already cancelled. Listen(nullptr)
  // stops listening and returns once a running listener has returned.
  void Listen(std::function<void()> listener) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  mutable absl::Mutex mu_;
  absl::Status reason_ ABSL_GUARDED_BY(mu_);
  std::function<void()> listener_ ABSL_GUARDED_BY(mu_);
};

struct RunControl {
  absl::Time deadline = absl::InfiniteFuture();
  Cancellation* cancellation = nullptr;  // may be null
};

// Runs `request` (of `rpc`, checked into `problem`) on `ring`: fills the outputs the request
// wants into `response`, and `plan` and the scatter/gather/worker timings. UNAVAILABLE naming the
// worker when one fails (a worker's INVALID_ARGUMENT or UNIMPLEMENTED, e.g. a cuda_reference
// worker refusing the backward, is passed through as it came); DEADLINE_EXCEEDED or CANCELLED
// when those stopped it, every worker call cancelled. Any failure leaves the workers' ring
// broken; the caller reports it.
absl::Status RunOnRing(const ComputeRpc& rpc, const ValidatedAttend& problem,
                       const google::protobuf::Message& request, const RingSnapshot& ring,
                       const RunControl& control, google::protobuf::Message* response,
                       v1::ShardPlan* plan, v1::Timings* timings);

}  // namespace ringattn
