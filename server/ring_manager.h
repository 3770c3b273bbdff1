// Keeps the ring of workers: who registered, who is alive (pings), and the current ring
// (generation, ranks). Forms a ring once enough workers are up, and a new one (new generation)
// after any failure, so that the next request finds a working ring.
#pragma once

#include <atomic>
#include <set>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "ringattn/v1/worker.grpc.pb.h"
#include "proto/cluster_auth.h"
#include "server/rendezvous_store.h"

namespace ringattn {

class ServiceMetrics;

struct WorkerRecord {
  std::string id;
  std::string address;
  std::string backend;
  std::string device;
  std::string transport;
  int64_t pid = 0;
  std::string host_id;  // HostId() of its host; empty when it did not say

  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::WorkerService::Stub> stub;
};

// The call turns of one ring generation (ShardHeader.sequence): the next to hand out, and
// those handed out whose request has not finished.
struct RingTurns {
  std::atomic<int64_t> next{1};
  absl::Mutex mu;
  std::set<int64_t> running ABSL_GUARDED_BY(mu);
  // Hands out a turn and counts it running until Finish.
  int64_t Take() {
    absl::MutexLock lock(&mu);
    const int64_t t = next.fetch_add(1);
    running.insert(t);
    return t;
  }
  void Finish(int64_t turn) {
    absl::MutexLock lock(&mu);
    running.erase(turn);
  }
  // Whether a request of an earlier turn is still running (then `turn`'s workers are waiting).
  bool EarlierRunning(int64_t turn) {
    absl::MutexLock lock(&mu);
    return !running.empty() && *running.begin() < turn;
  }
};

// The ring a request runs on: members in rank order.
struct RingSnapshot {
  int64_t generation = 0;
  std::vector<std::shared_ptr<const WorkerRecord>> members;
  // The ring's call turns, shared by every snapshot of the generation.
  std::shared_ptr<RingTurns> turns;
};

class RingManager {
 public:
  struct Options {
    int expected_workers = 1;                       // ring size
    absl::Duration join_timeout = absl::Seconds(30);
    absl::Duration ping_interval = absl::Milliseconds(500);
    absl::Duration ping_timeout = absl::Seconds(2);
    double ring_timeout_seconds = 60;               // transport timeout handed to workers
    // Carried by every call to a worker (its channels are ClusterChannels).
    std::optional<ClusterSecret> secret;
    // Called (outside the manager's lock) when a member of the formed ring of `generation`
    // stops answering pings: a request running on it cannot finish and should stop now rather
    // than wait for the transport's timeout.
    std::function<void(int64_t generation, const std::string& why)> on_ring_broken;
  };

  RingManager(Options options, RendezvousStore* store, ServiceMetrics* metrics);
  ~RingManager();
  RingManager(const RingManager&) = delete;
  RingManager& operator=(const RingManager&) = delete;

  void Start();
  void Stop();

  // Records a worker; returns its id. A worker re-registering at a known address replaces
  // the old record (a restarted process).
  std::string Register(const v1::RegisterRequest& request);

  // The current ring; UNAVAILABLE while none is formed.
  absl::StatusOr<RingSnapshot> CurrentRing() const;

  // A request on `generation` failed: that ring is no longer trusted; form a new one.
  void ReportFailure(int64_t generation, const std::string& reason);

  bool WaitUntilReady(absl::Duration timeout) const;

  struct Status {
    int64_t generation = 0;
    bool ready = false;
    int expected_workers = 0;
    std::vector<std::shared_ptr<const WorkerRecord>> workers;  // registered and alive
    std::vector<std::shared_ptr<const WorkerRecord>> members;  // of the current ring
  };
  Status GetStatus() const;

 private:
  void Loop();
  void PingAll();
  void TryFormRing();
  std::vector<std::shared_ptr<WorkerRecord>> Unresponsive(
      const std::vector<std::shared_ptr<WorkerRecord>>& workers) const;
  void DropWorkers(const std::vector<std::shared_ptr<WorkerRecord>>& lost);

  const Options options_;
  RendezvousStore* const store_;
  ServiceMetrics* const metrics_;

  mutable absl::Mutex mu_;
  std::vector<std::shared_ptr<WorkerRecord>> workers_ ABSL_GUARDED_BY(mu_);
  int64_t next_worker_id_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  // The formed ring's call turns (from 1 per generation).
  std::shared_ptr<RingTurns> turns_ ABSL_GUARDED_BY(mu_);
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::shared_ptr<WorkerRecord>> members_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace ringattn
