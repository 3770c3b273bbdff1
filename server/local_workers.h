// Starts and supervises local worker processes (`ringattn worker --coordinator=...`) for the
// embedded default: a worker that exits is started again, so the coordinator can re-form its
// ring after a crash.
#pragma once

#include <sys/types.h>

#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace ringattn {

class LocalWorkerPool {
 public:
  struct Options {
    std::string binary;               // the ringattn executable
    int count = 2;
    std::string coordinator_address;  // host:port of its internal plane
    std::string cluster_secret;       // given to the workers in their environment, not argv
    std::string kernel = "auto";
    bool restart = true;              // start a worker again when it exits
    std::vector<std::string> extra_args;
  };

  explicit LocalWorkerPool(Options options) : options_(std::move(options)) {}
  ~LocalWorkerPool() { Stop(); }
  LocalWorkerPool(const LocalWorkerPool&) = delete;
  LocalWorkerPool& operator=(const LocalWorkerPool&) = delete;

  absl::Status Start();
  // SIGTERM to every worker, SIGKILL after a grace period; no restarts after this.
  void Stop();
  std::vector<pid_t> pids() const;
  int restarts() const;

 private:
  absl::StatusOr<pid_t> Spawn(int slot);
  void Supervise();

  const Options options_;
  mutable absl::Mutex mu_;
  std::vector<pid_t> pids_ ABSL_GUARDED_BY(mu_);
  int restarts_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread supervisor_;
};

}  // namespace ringattn
