// The bounded queue between the request handlers and the single ring dispatcher, fair between
// clients. Admission is bounded twice: by requests waiting (max_jobs) and by request bytes the
// service holds (max_bytes: requests being received, queued or running, held from when their
// size is known until their call ends). One client may take at most `client_share` of either
// bound, so that a client flooding the service leaves room for the others. Past a bound a
// request is refused at once (RESOURCE_EXHAUSTED naming the limit) instead of waiting. The
// dispatcher takes the oldest job of the client served least recently: a client's queued jobs
// do not delay another client's by more than one of them.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
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
  std::string client;  // the caller's identity: whose share of the queue the job takes
  std::string traceparent;  // the request's span, passed on to the worker calls
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
  struct Limits {
    size_t max_jobs = 16;                  // requests waiting (--max_queue)
    int64_t max_bytes = int64_t{8} << 30;  // request bytes held (--max_queued_bytes); <= 0: none
    double client_share = 0.5;             // of each bound, per client (--max_client_share)
  };

  // Request bytes held for a client until destroyed (the call that holds them ends).
  class Hold {
   public:
    Hold(AdmissionQueue* queue, std::string client, int64_t bytes)
        : queue_(queue), client_(std::move(client)), bytes_(bytes) {}
    ~Hold();
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;

   private:
    AdmissionQueue* const queue_;
    const std::string client_;
    const int64_t bytes_;
  };

  explicit AdmissionQueue(Limits limits) : limits_(limits) {}

  // Holds `bytes` of request for `client`: RESOURCE_EXHAUSTED naming --max_queued_bytes when
  // the service or the client's share has no room for them. The hold must not outlive the queue.
  absl::StatusOr<std::unique_ptr<Hold>> HoldBytes(const std::string& client, int64_t bytes);
  // Queues `job` (of job->client). RESOURCE_EXHAUSTED naming --max_queue when the queue or the
  // client's share of it is full; UNAVAILABLE once closed.
  absl::Status Push(std::shared_ptr<AttendJob> job);
  // The next job (the oldest of the client served least recently), or null after `wait` or
  // once closed and empty.
  std::shared_ptr<AttendJob> Pop(absl::Duration wait);
  // Takes a job out before it ran; false when the dispatcher already has it.
  bool Remove(const std::shared_ptr<AttendJob>& job);
  void Close();
  size_t depth() const;
  int64_t held_bytes() const;

  // The most requests waiting, and bytes held, of one client.
  size_t client_max_jobs() const;
  int64_t client_max_bytes() const;

 private:
  struct Client {
    size_t queued = 0;
    int64_t held_bytes = 0;
    uint64_t last_served = 0;  // 0: not since it was last idle
  };
  void Release(const std::string& client, int64_t bytes);
  // Forgets a client with nothing queued or held that was never served.
  void ForgetIfIdle(std::map<std::string, Client>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forgets idle clients served long ago (their order is then that of clients never served).
  void ForgetLongIdle() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Limits limits_;
  mutable absl::Mutex mu_;
  std::deque<std::shared_ptr<AttendJob>> jobs_ ABSL_GUARDED_BY(mu_);  // in arrival order
  std::map<std::string, Client> clients_ ABSL_GUARDED_BY(mu_);
  int64_t held_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t served_ ABSL_GUARDED_BY(mu_) = 0;  // jobs popped
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace ringattn
