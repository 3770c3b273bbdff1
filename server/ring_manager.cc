#include "server/ring_manager.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <climits>
#include <functional>

#include "absl/strings/str_cat.h"
#include "base/log.h"
#include "server/fan_out.h"
#include "server/metrics.h"

namespace ringattn {
namespace {

constexpr char kComponent[] = "coordinator";

std::shared_ptr<grpc::Channel> WorkerChannel(const std::string& address,
                                            const std::optional<ClusterSecret>& secret) {
  grpc::ChannelArguments args;
  // Shards of long sequences are large; the coordinator already enforced the request limit.
  args.SetMaxReceiveMessageSize(INT_MAX);
  args.SetMaxSendMessageSize(INT_MAX);
  if (secret.has_value()) return ClusterChannel(address, args, *secret);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

}  // namespace

RingManager::RingManager(Options options, RendezvousStore* store, ServiceMetrics* metrics)
    : options_(options), store_(store), metrics_(metrics) {
  // Workers refuse a generation at or below the newest they have joined, so generations must
  // keep rising across coordinator restarts: start from the clock.
  absl::MutexLock lock(&mu_);
  generation_ = absl::ToUnixMillis(absl::Now());
}

RingManager::~RingManager() { Stop(); }

void RingManager::Start() { thread_ = std::thread([this] { Loop(); }); }

void RingManager::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

std::string RingManager::Register(const v1::RegisterRequest& request) {
  auto w = std::make_shared<WorkerRecord>();
  w->address = request.address();
  w->backend = request.backend();
  w->device = request.device();
  w->transport = request.transport();
  w->pid = request.pid();
  w->host_id = request.host_id();
  w->channel = WorkerChannel(w->address, options_.secret);
  w->stub = v1::WorkerService::NewStub(w->channel);
  absl::MutexLock lock(&mu_);
  w->id = absl::StrCat("w", next_worker_id_++);
  for (auto it = workers_.begin(); it != workers_.end(); ++it) {
    if ((*it)->address == w->address) {
      workers_.erase(it);
      ready_ = false;  // a member may have restarted under us
      break;
    }
  }
  workers_.push_back(w);
  if (metrics_ != nullptr) metrics_->SetWorkersUp(static_cast<int>(workers_.size()));
  return w->id;
}

absl::StatusOr<RingSnapshot> RingManager::CurrentRing() const {
  absl::MutexLock lock(&mu_);
  if (!ready_) {
    return absl::UnavailableError(absl::StrCat(
        "the ring is not formed (", workers_.size(), " workers registered, ",
        options_.expected_workers, " needed); retry shortly"));
  }
  RingSnapshot s;
  s.generation = generation_;
  s.members.assign(members_.begin(), members_.end());
  s.turns = turns_;
  return s;
}

void RingManager::ReportFailure(int64_t generation, const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (generation == generation_ && ready_) {
    ready_ = false;
    LogWarning(kComponent,
               absl::StrCat("ring generation ", generation, " failed: ", reason, "; re-forming"),
               {{"generation", generation}});
  }
}

bool RingManager::WaitUntilReady(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(absl::Condition(&ready_), timeout);
}

RingManager::Status RingManager::GetStatus() const {
  absl::MutexLock lock(&mu_);
  Status s;
  s.generation = ready_ ? generation_ : 0;
  s.ready = ready_;
  s.expected_workers = options_.expected_workers;
  s.workers.assign(workers_.begin(), workers_.end());
  if (ready_) s.members.assign(members_.begin(), members_.end());
  return s;
}

void RingManager::Loop() {
  absl::Time next_ping = absl::Now();
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Milliseconds(50))) return;
    }
    if (absl::Now() >= next_ping) {
      PingAll();
      next_ping = absl::Now() + options_.ping_interval;
    }
    TryFormRing();
  }
}

// Drops workers that do not answer a ping; a lost member breaks the ring.
void RingManager::PingAll() {
  std::vector<std::shared_ptr<WorkerRecord>> workers;
  {
    absl::MutexLock lock(&mu_);
    workers = workers_;
  }
  DropWorkers(Unresponsive(workers));
}

// Pings `workers` once, all at a time; returns those that did not answer.
std::vector<std::shared_ptr<WorkerRecord>> RingManager::Unresponsive(
    const std::vector<std::shared_ptr<WorkerRecord>>& workers) const {
  const v1::PingRequest request;
  std::vector<v1::PingResponse> responses(workers.size());
  FanOutOptions fan_out;
  fan_out.deadline = absl::Now() + options_.ping_timeout;
  const std::vector<grpc::Status> statuses =
      FanOut(static_cast<int>(workers.size()), fan_out,
             [&](int i, grpc::ClientContext* ctx, std::function<void(grpc::Status)> done) {
               workers[i]->stub->async()->Ping(ctx, &request, &responses[i], std::move(done));
             });
  std::vector<std::shared_ptr<WorkerRecord>> lost;
  for (size_t i = 0; i < workers.size(); ++i) {
    if (!statuses[i].ok()) lost.push_back(workers[i]);
  }
  return lost;
}

void RingManager::DropWorkers(const std::vector<std::shared_ptr<WorkerRecord>>& lost) {
  if (lost.empty()) return;
  int64_t broken = 0;  // the generation of the formed ring a lost member broke
  std::string why;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& w : lost) {
      LogWarning(kComponent,
                 absl::StrCat("worker ", w->id, " at ", w->address, " stopped answering"),
                 {{"worker_id", w->id}, {"worker", w->address}});
      std::erase(workers_, w);
      if (std::find(members_.begin(), members_.end(), w) != members_.end()) {
        if (ready_) {
          broken = generation_;
          why = absl::StrCat("worker ", w->id, " at ", w->address, " stopped answering");
        }
        ready_ = false;
      }
    }
    if (metrics_ != nullptr) metrics_->SetWorkersUp(static_cast<int>(workers_.size()));
  }
  if (broken != 0 && options_.on_ring_broken) options_.on_ring_broken(broken, why);
}

void RingManager::TryFormRing() {
  std::vector<std::shared_ptr<WorkerRecord>> candidates;
  {
    absl::MutexLock lock(&mu_);
    if (ready_ || static_cast<int>(workers_.size()) < options_.expected_workers) return;
    candidates.assign(workers_.begin(), workers_.begin() + options_.expected_workers);
  }
  // A dead candidate would keep the others waiting in the rendezvous until join_timeout.
  if (auto lost = Unresponsive(candidates); !lost.empty()) {
    DropWorkers(lost);
    return;
  }
  int64_t generation;
  {
    absl::MutexLock lock(&mu_);
    generation = ++generation_;
  }
  const std::vector<std::shared_ptr<WorkerRecord>>& members = candidates;
  const std::string prefix = absl::StrCat("ring/", generation, "/");
  const int world = static_cast<int>(members.size());
  std::vector<v1::JoinRingRequest> requests(world);
  std::vector<v1::JoinRingResponse> responses(world);
  for (int r = 0; r < world; ++r) {
    requests[r].set_generation(generation);
    requests[r].set_rank(r);
    requests[r].set_world_size(world);
    requests[r].set_store_prefix(prefix);
    requests[r].set_timeout_seconds(options_.ring_timeout_seconds);
  }
  // A rank that fails to join cancels the others, which would wait for it until join_timeout.
  FanOutOptions fan_out;
  fan_out.deadline = absl::Now() + options_.join_timeout;
  fan_out.cancel_all_on_failure = true;
  const std::vector<grpc::Status> results = FanOut(
      world, fan_out, [&](int r, grpc::ClientContext* ctx, std::function<void(grpc::Status)> done) {
        members[r]->stub->async()->JoinRing(ctx, &requests[r], &responses[r], std::move(done));
      });
  const bool failed =
      std::any_of(results.begin(), results.end(), [](const grpc::Status& s) { return !s.ok(); });
  store_->ErasePrefix(prefix);
  for (int r = 0; r < world; ++r) {
    if (!results[r].ok() && results[r].error_code() != grpc::StatusCode::CANCELLED) {
      LogWarning(kComponent,
                 absl::StrCat("rank ", r, " (", members[r]->address, ") failed to join ring ",
                              generation, ": ", results[r].error_message()),
                 {{"generation", generation}, {"rank", r}, {"worker", members[r]->address}});
    }
  }
  if (failed) {
    absl::SleepFor(absl::Milliseconds(100));
    return;
  }
  absl::MutexLock lock(&mu_);
  if (generation != generation_) return;  // superseded while joining
  members_ = members;
  turns_ = std::make_shared<RingTurns>();
  ready_ = true;
  if (metrics_ != nullptr) metrics_->RecordRingFormed();
  LogInfo(kComponent,
          absl::StrCat("ring generation ", generation, " formed with ", world, " workers"),
          {{"generation", generation}, {"workers", world}});
}

}  // namespace ringattn
