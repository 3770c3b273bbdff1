// The bounded queue between the request handlers and the single ring dispatcher. Past its
// capacity a request is refused at once (RESOURCE_EXHAUSTED) instead of waiting unboundedly.
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "ringattn/v1/attention.pb.h"
#include "server/request_runner.h"

namespace ringattn {

// One admitted request of any compute RPC, shared by its handler and the dispatcher: the fields
// every request has and the one function that runs it on a ring. Every worker runs the jobs
// of the one queue in the same order.
struct AttendJob {
  std::string request_id;
  absl::Time arrival;
  absl::Time queued;  // pushed onto the queue; queue_seconds runs from here
  absl::Time deadline = absl::InfiniteFuture();
  Cancellation cancellation;       // the client went away or the deadline passed
  v1::Timings* timings = nullptr;  // the response's; the dispatcher sets queue_seconds
                                   // and ring_wait_seconds
  // Runs the request on `ring` (RunOnRing), filling the handler's response.
  std::function<absl::Status(const RingSnapshot& ring, const RunControl& control)> run;
  // Called once, by the dispatcher after `run` or by the handler that took the job out of the
  // queue; the job's request and response may be gone after it.
  std::function<void(absl::Status)> done;
};

class AdmissionQueue {
 public:
  explicit AdmissionQueue(size_t capacity) : capacity_(capacity) {}

  // RESOURCE_EXHAUSTED naming the capacity when full; UNAVAILABLE once closed.
  absl::Status Push(std::shared_ptr<AttendJob> job);
  // The oldest job, or null after `wait` or once closed and empty.
  std::shared_ptr<AttendJob> Pop(absl::Duration wait);
  // Takes a job out before it ran; false when the dispatcher already has it.
  bool Remove(const std::shared_ptr<AttendJob>& job);
  void Close();
  size_t depth() const;

 private:
  const size_t capacity_;
  mutable absl::Mutex mu_;
  std::deque<std::shared_ptr<AttendJob>> jobs_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace ringattn
