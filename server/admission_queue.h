// The bounded queue between the request handlers and the single ring dispatcher. Past its
// capacity a request is refused at once (RESOURCE_EXHAUSTED) instead of waiting unboundedly.
#pragma once

#include <atomic>
#include <deque>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "ringattn/v1/attention.pb.h"
#include "server/attend_request.h"

namespace ringattn {

// One admitted request, shared by its handler (which waits) and the dispatcher (which runs it).
// Forward (Attend, AttendStream) and backward (AttendBackward) requests share the one queue, so
// that every worker runs them in the same order.
struct AttendJob {
  enum class Kind { kForward, kBackward };
  Kind kind = Kind::kForward;
  // kForward: the request (owned by the handler, alive until done), its problem, its answer.
  const v1::AttendRequest* request = nullptr;
  ValidatedAttend problem;
  v1::AttendResponse response;  // valid once done and ok
  // kBackward: the same three.
  const v1::AttendBackwardRequest* backward_request = nullptr;
  ValidatedAttendBackward backward_problem;
  v1::AttendBackwardResponse backward_response;  // valid once done and ok

  absl::Time arrival;
  absl::Time deadline = absl::InfiniteFuture();
  std::atomic<bool> cancelled{false};  // the client went away
  absl::Notification done;
  absl::Status status;  // valid once done

  // The request id and the timings of whichever kind this is.
  std::string& request_id() {
    return kind == Kind::kForward ? problem.request_id : backward_problem.attend.request_id;
  }
  v1::Timings* timings() {
    return kind == Kind::kForward ? response.mutable_timings()
                                  : backward_response.mutable_timings();
  }
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
