#include "server/local_workers.h"

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/log.h"
#include "proto/cluster_auth.h"

extern char** environ;

namespace ringattn {

absl::StatusOr<pid_t> LocalWorkerPool::Spawn(int slot) {
  std::vector<std::string> args = {
      options_.binary, "worker", "--coordinator=" + options_.coordinator_address,
      "--kernel=" + options_.kernel, "--device=" + std::to_string(slot), "--exit_with_parent",
      // Loopback, whatever RINGATTN_WORKER_LISTEN or RINGATTN_ADVERTISE_HOST say.
      "--worker_listen=127.0.0.1:0", "--advertise_host=127.0.0.1"};
  args.insert(args.end(), options_.extra_args.begin(), options_.extra_args.end());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  // The environment, with the cluster secret (argv is world-readable in /proc; the environment
  // is the owner's).
  const std::string secret_var =
      absl::StrCat(ClusterSecret::kEnvironmentVariable, "=", options_.cluster_secret);
  const std::string prefix = absl::StrCat(ClusterSecret::kEnvironmentVariable, "=");
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, prefix.c_str(), prefix.size()) != 0) envp.push_back(*e);
  }
  if (!options_.cluster_secret.empty()) envp.push_back(const_cast<char*>(secret_var.c_str()));
  envp.push_back(nullptr);
  pid_t pid = 0;
  const int rc =
      posix_spawn(&pid, options_.binary.c_str(), nullptr, nullptr, argv.data(), envp.data());
  if (rc != 0) {
    return absl::InternalError(absl::StrCat("cannot start worker ", slot, " (", options_.binary,
                                            "): ", std::strerror(rc)));
  }
  return pid;
}

absl::Status LocalWorkerPool::Start() {
  absl::MutexLock lock(&mu_);
  for (int i = 0; i < options_.count; ++i) {
    absl::StatusOr<pid_t> pid = Spawn(i);
    if (!pid.ok()) return pid.status();
    pids_.push_back(*pid);
  }
  supervisor_ = std::thread([this] { Supervise(); });
  return absl::OkStatus();
}

void LocalWorkerPool::Supervise() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      for (size_t i = 0; i < pids_.size(); ++i) {
        int status = 0;
        if (pids_[i] <= 0 || waitpid(pids_[i], &status, WNOHANG) != pids_[i]) continue;
        LogWarning("serve",
                   absl::StrCat("worker ", i, " (pid ", pids_[i], ") exited (",
                                WIFSIGNALED(status) ? "signal " : "code ",
                                WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status), ")",
                                options_.restart ? "; starting it again" : ""),
                   {{"slot", i}, {"pid", pids_[i]}});
        pids_[i] = -1;
        if (!options_.restart) continue;
        absl::StatusOr<pid_t> pid = Spawn(static_cast<int>(i));
        if (pid.ok()) {
          pids_[i] = *pid;
          ++restarts_;
        } else {
          LogError("serve", pid.status().message());
        }
      }
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
}

void LocalWorkerPool::Stop() {
  std::vector<pid_t> pids;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    pids = pids_;
  }
  if (supervisor_.joinable()) supervisor_.join();
  for (pid_t p : pids) {
    if (p > 0) kill(p, SIGTERM);
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(3);
  for (pid_t p : pids) {
    if (p <= 0) continue;
    while (waitpid(p, nullptr, WNOHANG) == 0) {
      if (absl::Now() > deadline) {
        kill(p, SIGKILL);
        waitpid(p, nullptr, 0);
        break;
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
  }
}

std::vector<pid_t> LocalWorkerPool::pids() const {
  absl::MutexLock lock(&mu_);
  return pids_;
}

int LocalWorkerPool::restarts() const {
  absl::MutexLock lock(&mu_);
  return restarts_;
}

}  // namespace ringattn
