#include "server/admission_queue.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace ringattn {

AdmissionQueue::Hold::~Hold() { queue_->Release(client_, bytes_); }

size_t AdmissionQueue::client_max_jobs() const {
  const double share = std::clamp(limits_.client_share, 0.0, 1.0);
  return std::max<size_t>(1, static_cast<size_t>(std::ceil(limits_.max_jobs * share)));
}

int64_t AdmissionQueue::client_max_bytes() const {
  const double share = std::clamp(limits_.client_share, 0.0, 1.0);
  return static_cast<int64_t>(static_cast<double>(limits_.max_bytes) * share);
}

absl::StatusOr<std::unique_ptr<AdmissionQueue::Hold>> AdmissionQueue::HoldBytes(
    const std::string& client, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  if (limits_.max_bytes > 0) {
    const int64_t share = client_max_bytes();
    if (bytes > share) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the request's ", bytes, " bytes exceed what one client may hold: ", share,
                       " bytes (--max_queued_bytes ", limits_.max_bytes, " x --max_client_share ",
                       limits_.client_share, ")"));
    }
    if (held_bytes_ + bytes > limits_.max_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the service holds ", held_bytes_, " bytes of requests; the request's ", bytes,
          " more would pass --max_queued_bytes ", limits_.max_bytes, "; retry later"));
    }
    auto it = clients_.find(client);
    const int64_t mine = it == clients_.end() ? 0 : it->second.held_bytes;
    if (mine + bytes > share) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "client '", client, "' holds ", mine, " bytes of requests; the request's ", bytes,
          " more would pass its share, ", share, " bytes (--max_queued_bytes ", limits_.max_bytes,
          " x --max_client_share ", limits_.client_share, "); retry once one is answered"));
    }
  }
  clients_[client].held_bytes += bytes;
  held_bytes_ += bytes;
  return std::make_unique<Hold>(this, client, bytes);
}

void AdmissionQueue::Release(const std::string& client, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  held_bytes_ -= bytes;
  auto it = clients_.find(client);
  if (it == clients_.end()) return;
  it->second.held_bytes -= bytes;
  ForgetIfIdle(it);
}

void AdmissionQueue::ForgetIfIdle(std::map<std::string, Client>::iterator it) {
  // A client served is remembered a while longer (ForgetLongIdle), for the order of Pop.
  if (it->second.queued == 0 && it->second.held_bytes == 0 && it->second.last_served == 0) {
    clients_.erase(it);
  }
}

void AdmissionQueue::ForgetLongIdle() {
  // Bounds the clients remembered. One forgotten ranks with the clients never served (first),
  // which favours only a client idle for that many pops.
  const uint64_t horizon = std::max<uint64_t>(1024, 4 * limits_.max_jobs);
  if (served_ <= horizon) return;
  for (auto it = clients_.begin(); it != clients_.end();) {
    const Client& c = it->second;
    if (c.queued == 0 && c.held_bytes == 0 && c.last_served + horizon < served_) {
      it = clients_.erase(it);
    } else {
      ++it;
    }
  }
}

absl::Status AdmissionQueue::Push(std::shared_ptr<AttendJob> job) {
  absl::MutexLock lock(&mu_);
  if (closed_) return absl::UnavailableError("the coordinator is shutting down");
  if (jobs_.size() >= limits_.max_jobs) {
    return absl::ResourceExhaustedError(
        absl::StrCat("admission queue full (", limits_.max_jobs,
                     " requests waiting, --max_queue); retry later"));
  }
  Client& mine = clients_[job->client];
  if (mine.queued >= client_max_jobs()) {
    const std::string client = job->client;
    ForgetIfIdle(clients_.find(client));
    return absl::ResourceExhaustedError(absl::StrCat(
        "client '", client, "' has ", client_max_jobs(),
        " requests waiting, its share of the admission queue (--max_queue ", limits_.max_jobs,
        " x --max_client_share ", limits_.client_share, "); retry once one is answered"));
  }
  ++mine.queued;
  jobs_.push_back(std::move(job));
  return absl::OkStatus();
}

std::shared_ptr<AttendJob> AdmissionQueue::Pop(absl::Duration wait) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !jobs_.empty() || closed_; };
  mu_.AwaitWithTimeout(absl::Condition(&ready), wait);
  if (jobs_.empty()) return nullptr;
  // The oldest job of the client served least recently (arrival order breaks ties).
  auto next = jobs_.begin();
  uint64_t next_served = clients_[(*next)->client].last_served;
  for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
    const uint64_t served = clients_[(*it)->client].last_served;
    if (served < next_served) {
      next = it;
      next_served = served;
    }
  }
  std::shared_ptr<AttendJob> job = std::move(*next);
  jobs_.erase(next);
  auto client = clients_.find(job->client);
  --client->second.queued;
  client->second.last_served = ++served_;
  ForgetLongIdle();
  return job;
}

bool AdmissionQueue::Remove(const std::shared_ptr<AttendJob>& job) {
  absl::MutexLock lock(&mu_);
  auto it = std::find(jobs_.begin(), jobs_.end(), job);
  if (it == jobs_.end()) return false;
  jobs_.erase(it);
  auto client = clients_.find(job->client);
  if (client != clients_.end()) {
    --client->second.queued;
    ForgetIfIdle(client);
  }
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

int64_t AdmissionQueue::held_bytes() const {
  absl::MutexLock lock(&mu_);
  return held_bytes_;
}

}  // namespace ringattn
