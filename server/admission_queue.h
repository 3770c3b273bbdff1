// The bounded queue between the request handlers and the single ring dispatcher. Past its
// capacity a request is refused at once (RESOURCE_EXHAUSTED) instead of waiting unboundedly.
#pragma once

#include <atomic>
#include <deque>
#include <memory>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "ringattn/v1/attention.pb.h"
#include "server/attend_request.h"

namespace ringattn {

// One admitted request, shared by its handler (which waits) and the dispatcher (which runs it).
struct AttendJob {
  const v1::AttendRequest* request = nullptr;  // owned by the handler, alive until done
  ValidatedAttend problem;
  absl::Time arrival;
  absl::Time deadline = absl::InfiniteFuture();
  std::atomic<bool> cancelled{false};  // the client went away
  absl::Notification done;
  absl::Status status;                 // valid once done
  v1::AttendResponse response;         // valid once done and ok
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
