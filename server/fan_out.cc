#include "server/fan_out.h"

#include <utility>

namespace ringattn {

void Cancellation::Cancel(absl::Status reason) {
  absl::MutexLock lock(&mu_);
  if (!reason_.ok()) return;
  reason_ = std::move(reason);
  if (listener_) listener_();
}

absl::Status Cancellation::reason() const {
  absl::MutexLock lock(&mu_);
  return reason_;
}

void Cancellation::Listen(std::function<void()> listener) {
  absl::MutexLock lock(&mu_);
  listener_ = std::move(listener);
  if (listener_ && !reason_.ok()) listener_();
}

// The callbacks only record and wake the caller, which does the cancelling: gRPC may run a
// callback inside TryCancel, and a callback that cancelled would then take a context's lock
// twice.
std::vector<grpc::Status> FanOut(int n, const FanOutOptions& options, const StartCall& start) {
  std::vector<grpc::ClientContext> contexts(n);
  if (options.deadline != absl::InfiniteFuture()) {
    for (grpc::ClientContext& ctx : contexts)
      ctx.set_deadline(absl::ToChronoTime(options.deadline));
  }
  absl::Mutex mu;
  std::vector<grpc::Status> statuses(n);
  int pending = n;
  bool failed = false;
  bool cancelled = false;
  if (options.cancellation != nullptr) {
    options.cancellation->Listen([&] {
      absl::MutexLock lock(&mu);
      cancelled = true;
    });
  }
  for (int i = 0; i < n; ++i) {
    start(i, &contexts[i], [&, i](grpc::Status s) {
      absl::MutexLock lock(&mu);
      failed |= !s.ok();
      statuses[i] = std::move(s);
      --pending;
    });
  }
  bool stopped = false;  // every call was cancelled
  const auto wake = [&] {
    const bool stop = cancelled || (failed && options.cancel_all_on_failure);
    return pending == 0 || (stop && !stopped);
  };
  {
    absl::MutexLock lock(&mu);
    while (true) {
      mu.Await(absl::Condition(&wake));
      if (pending == 0) break;
      stopped = true;
      mu.Unlock();
      for (grpc::ClientContext& ctx : contexts) ctx.TryCancel();
      mu.Lock();
    }
  }
  if (options.cancellation != nullptr) options.cancellation->Listen(nullptr);
  return statuses;
}

}  // namespace ringattn
