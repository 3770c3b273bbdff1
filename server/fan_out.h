// Calls to several workers at once with the gRPC callback API, waited for together: no thread
// per call and no polling. A failed call (when asked) or a raised Cancellation cancels every
// call still running.
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace ringattn {

// The cancellation of one request: raised at most once, by whoever learns that its client went
// away or its deadline passed, and watched by whoever runs it. Thread-safe.
class Cancellation {
 public:
  // Records `reason` (CANCELLED, DEADLINE_EXCEEDED, or UNAVAILABLE when the ring broke under
  // the request) and calls the listener; only the first call counts.
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

struct FanOutOptions {
  absl::Time deadline = absl::InfiniteFuture();  // of every call
  bool cancel_all_on_failure = false;            // the first failed call cancels the others
  Cancellation* cancellation = nullptr;          // when raised, cancels every call; may be null
};

// Starts call `i` on `context` (a stub's async() method); `done` gets its status.
using StartCall = std::function<void(int i, grpc::ClientContext* context,
                                     std::function<void(grpc::Status)> done)>;

// Starts `n` calls at once and returns their statuses after every call's callback ran. The
// calls' requests and responses must outlive this call.
std::vector<grpc::Status> FanOut(int n, const FanOutOptions& options, const StartCall& start);

}  // namespace ringattn
