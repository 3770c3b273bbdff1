#include "server/admission_queue.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace ringattn {

absl::Status AdmissionQueue::Push(std::shared_ptr<AttendJob> job) {
  absl::MutexLock lock(&mu_);
  if (closed_) return absl::UnavailableError("the coordinator is shutting down");
  if (jobs_.size() >= capacity_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "admission queue full (", capacity_, " requests waiting); retry later"));
  }
  jobs_.push_back(std::move(job));
  return absl::OkStatus();
}

std::shared_ptr<AttendJob> AdmissionQueue::Pop(absl::Duration wait) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !jobs_.empty() || closed_; };
  mu_.AwaitWithTimeout(absl::Condition(&ready), wait);
  if (jobs_.empty()) return nullptr;
  std::shared_ptr<AttendJob> job = std::move(jobs_.front());
  jobs_.pop_front();
  return job;
}

bool AdmissionQueue::Remove(const std::shared_ptr<AttendJob>& job) {
  absl::MutexLock lock(&mu_);
  auto it = std::find(jobs_.begin(), jobs_.end(), job);
  if (it == jobs_.end()) return false;
  jobs_.erase(it);
  return true;
}

void AdmissionQueue::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
}

size_t AdmissionQueue::depth() const {
  absl::MutexLock lock(&mu_);
  return jobs_.size();
}

}  // namespace ringattn
