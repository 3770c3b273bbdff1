#include "worker/worker_service.h"

#include <algorithm>

#include <chrono>
#include <cmath>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "proto/compute_rpcs.h"
#include "proto/convert.h"
#include "proto/trace_metadata.h"
#include "ring/host_ring.h"
#include "ring/layout.h"

namespace ringattn {
namespace {

// Longest JoinRing timeout accepted; keeps the chrono arithmetic far from overflow.
constexpr double kMaxTimeoutSeconds = 7 * 24 * 3600.0;

// Watches a server call from a side thread while its handler is blocked (in a rendezvous or
// the ring), and calls `on_stop` once, with DEADLINE_EXCEEDED or CANCELLED, when the call's
// deadline passes or its client goes away.
class CallWatcher {
 public:
  CallWatcher(grpc::ServerContext* context, std::string what,
              std::function<void(const absl::Status&)> on_stop)
      : context_(context), what_(std::move(what)), on_stop_(std::move(on_stop)) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~CallWatcher() { Stop().IgnoreError(); }

  CallWatcher(const CallWatcher&) = delete;
  CallWatcher& operator=(const CallWatcher&) = delete;

  // Stops watching; returns the reason it fired, or OK when it did not.
  absl::Status Stop() {
    if (!done_.HasBeenNotified()) done_.Notify();
    if (thread_.joinable()) thread_.join();
    return reason_;
  }

 private:
  static constexpr absl::Duration kPollInterval = absl::Milliseconds(10);

  void Loop() {
    do {
      absl::Status why = Check();
      if (!why.ok()) {
        reason_ = why;  // read only after the join in Stop
        on_stop_(why);
        return;
      }
    } while (!done_.WaitForNotificationWithTimeout(kPollInterval));
  }

  absl::Status Check() const {
    // The deadline first: gRPC also marks a call whose deadline passed as cancelled.
    if (context_->deadline() <= std::chrono::system_clock::now()) {
      return absl::DeadlineExceededError(absl::StrCat(what_, ": the call's deadline passed"));
    }
    if (context_->IsCancelled()) {
      return absl::CancelledError(absl::StrCat(what_, ": the caller cancelled the call"));
    }
    return absl::OkStatus();
  }

  grpc::ServerContext* const context_;
  const std::string what_;
  const std::function<void(const absl::Status&)> on_stop_;
  absl::Notification done_;
  absl::Status reason_;
  std::thread thread_;
};

absl::Status Annotate(const absl::Status& s, const std::string& prefix) {
  return absl::Status(s.code(), absl::StrCat(prefix, std::string(s.message())));
}

}  // namespace

WorkerServiceImpl::WorkerServiceImpl(
    std::shared_ptr<v1::CoordinatorService::StubInterface> coordinator,
    std::unique_ptr<RingEngine> engine, ClusterSecret secret, WorkerMetrics* metrics,
    int staging_sets)
    : coordinator_(std::move(coordinator)),
      secret_(std::move(secret)),
      metrics_(metrics),
      engine_(std::move(engine)),
      slot_sets_(std::max(1, staging_sets)) {}

WorkerServiceImpl::~WorkerServiceImpl() { Shutdown(); }

void WorkerServiceImpl::Shutdown() {
  std::shared_ptr<Ring> ring;
  std::shared_ptr<CoordinatorStore> store;
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
    ring = std::move(ring_);
    ring_.reset();
    store = joining_store_;
  }
  const absl::Status reason = absl::UnavailableError("the worker is shutting down");
  if (ring != nullptr) ring->conn->Abort(reason);
  if (store != nullptr) store->Cancel(reason);
}

absl::Time WorkerServiceImpl::last_ping() const {
  absl::MutexLock lock(&mu_);
  return last_ping_;
}

int64_t WorkerServiceImpl::generation() const {
  absl::MutexLock lock(&mu_);
  return ring_ != nullptr ? ring_->generation : 0;
}

grpc::Status WorkerServiceImpl::Ping(grpc::ServerContext* context,
                                     const v1::PingRequest* /*request*/,
                                     v1::PingResponse* response) {
  if (absl::Status s = secret_.Check(*context); !s.ok()) return ToGrpcStatus(s);
  absl::MutexLock lock(&mu_);
  last_ping_ = absl::Now();
  response->set_generation(ring_ != nullptr ? ring_->generation : 0);
  response->set_busy(busy_);
  return grpc::Status::OK;
}

grpc::Status WorkerServiceImpl::JoinRing(grpc::ServerContext* context,
                                         const v1::JoinRingRequest* request,
                                         v1::JoinRingResponse* /*response*/) {
  if (absl::Status s = secret_.Check(*context); !s.ok()) return ToGrpcStatus(s);
  return ToGrpcStatus(Join(context, *request));
}

absl::Status WorkerServiceImpl::Join(grpc::ServerContext* context,
                                     const v1::JoinRingRequest& request) {
  const int64_t generation = request.generation();
  const int world = request.world_size();
  const int rank = request.rank();
  if (generation <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("generation must be > 0 (0 means no ring), got ", generation));
  }
  if (world < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world_size must be >= 1, got ", world));
  }
  if (rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank must be in [0, world_size=", world, "), got ", rank));
  }
  const double timeout_s = request.timeout_seconds();
  if (!(timeout_s > 0) || !(timeout_s <= kMaxTimeoutSeconds)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "timeout_seconds must be > 0 and <= ", kMaxTimeoutSeconds, ", got ", timeout_s));
  }
  const auto timeout = std::chrono::milliseconds(
      std::max<int64_t>(1, static_cast<int64_t>(std::llround(timeout_s * 1000))));
  const std::string what =
      absl::StrCat("JoinRing(generation ", generation, ", rank ", rank, " of ", world, ")");
  const absl::Status superseded =
      absl::AbortedError(absl::StrCat("superseded by JoinRing for generation ", generation));

  // Leave the old ring first: a shard still running on it fails at once and releases run_mu_.
  std::shared_ptr<Ring> old_ring;
  std::shared_ptr<CoordinatorStore> old_store;
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return absl::UnavailableError("the worker is shutting down");
    if (generation <= newest_generation_) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, " is stale: this worker was already asked to join generation ",
                       newest_generation_));
    }
    newest_generation_ = generation;
    old_ring = std::move(ring_);
    ring_.reset();
    old_store = joining_store_;
  }
  if (old_ring != nullptr) old_ring->conn->Abort(superseded);
  if (old_store != nullptr) old_store->Cancel(superseded);
  old_ring.reset();

  absl::MutexLock run_lock(&run_mu_);
  auto store = std::make_shared<CoordinatorStore>(coordinator_, request.store_prefix(), timeout);
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return absl::UnavailableError("the worker is shutting down");
    if (newest_generation_ != generation) {
      return absl::AbortedError(absl::StrCat(what, " was superseded by generation ",
                                             newest_generation_, " before it started"));
    }
    joining_store_ = store;
  }

  absl::StatusOr<std::unique_ptr<RingConnection>> comm;
  {
    CallWatcher watcher(context, what, [&store](const absl::Status& why) { store->Cancel(why); });
    comm = engine_->Connect(rank, world, store, timeout);
  }

  std::unique_ptr<RingConnection> unused;
  absl::Status result;
  {
    absl::MutexLock lock(&mu_);
    if (joining_store_ == store) joining_store_.reset();
    if (!comm.ok()) {
      // A cancelled rendezvous reports why it was cancelled, not how the transport noticed.
      const absl::Status cancelled = store->cancel_status();
      result = Annotate(cancelled.ok() ? comm.status() : cancelled, what + ": ");
    } else if (shut_down_ || newest_generation_ != generation) {
      unused = *std::move(comm);
      result = absl::AbortedError(absl::StrCat(what, ": superseded while connecting"));
    } else {
      auto ring = std::make_shared<Ring>();
      ring->generation = generation;
      ring->conn = *std::move(comm);
      ring_ = std::move(ring);
    }
  }
  if (unused != nullptr) unused->Abort(result);
  return result;
}

absl::Status WorkerServiceImpl::CheckGeneration(const char* rpc, int64_t generation) const {
  if (ring_ == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(rpc, " for ring generation ", generation,
                     ", but this worker is in no ring (none formed, or the last one failed)"));
  }
  if (ring_->generation != generation) {
    return absl::FailedPreconditionError(absl::StrCat(rpc, " for ring generation ", generation,
                                                      ", but this worker is in generation ",
                                                      ring_->generation));
  }
  return absl::OkStatus();
}

class WorkerServiceImpl::Turn {
 public:
  Turn(WorkerServiceImpl* w, std::shared_ptr<Ring> ring, int64_t sequence,
       grpc::ServerContext* context)
      : w_(w),
        ring_(std::move(ring)),
        sequence_(sequence),
        context_(context),
        set_(w->slot_sets_[sequence % w->slot_sets_.size()]) {}
  ~Turn() {
    Release();
    End();
  }
  Turn(const Turn&) = delete;
  Turn& operator=(const Turn&) = delete;

  SlotSet& set() { return set_; }

  // Waits for the staging set.
  absl::Status Begin() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    absl::MutexLock lock(&w_->mu_);
    auto free = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return !set_.in_use; };
    RA_RETURN_IF_ERROR(WaitFor(free, "its staging set"));
    set_.in_use = true;
    began_ = true;
    return absl::OkStatus();
  }

  // Waits for the turn, then takes run_mu_.
  absl::Status Take() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (sequence_ > 0) {
      absl::MutexLock lock(&w_->mu_);
      auto due = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return w_->shut_down_ || w_->ring_ != ring_ || ring_->next_sequence >= sequence_;
      };
      RA_RETURN_IF_ERROR(WaitFor(due, absl::StrCat("turn ", sequence_)));
      if (w_->shut_down_) return absl::UnavailableError("the worker is shutting down");
      if (w_->ring_ != ring_) {
        return absl::FailedPreconditionError(absl::StrCat(
            "ring generation ", ring_->generation, " was dropped while the call waited its turn"));
      }
      if (ring_->next_sequence != sequence_) {
        return absl::FailedPreconditionError(absl::StrCat("turn ", sequence_, " already passed (",
                                                          ring_->next_sequence, " is due)"));
      }
      // Stopped by now, before the pass began: skip it too (the other ranks' calls are stopped
      // alike), rather than start a pass that its watcher would abort at once.
      RA_RETURN_IF_ERROR(GiveUpIfStopped(absl::StrCat("turn ", sequence_)));
    }
    w_->run_mu_.Lock();
    held_ = true;
    absl::MutexLock lock(&w_->mu_);
    w_->busy_ = true;
    return absl::OkStatus();
  }

  // Whether the call gave up (cancelled or past its deadline) before its ring pass: nothing of
  // the ring was touched, so it stays.
  bool skipped() const { return skipped_; }

  void Release() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (!held_) return;
    {
      absl::MutexLock lock(&w_->mu_);
      w_->busy_ = false;
      if (sequence_ > 0 && ring_->next_sequence == sequence_) Advance();
    }
    held_ = false;
    w_->run_mu_.Unlock();
  }

 private:
  // Frees the staging set.
  void End() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (!began_) return;
    absl::MutexLock lock(&w_->mu_);
    set_.in_use = false;
    began_ = false;
  }

  // Passes the due turn on, and every later one given up meanwhile. Under mu_.
  void Advance() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    ++ring_->next_sequence;
    while (ring_->skipped.erase(ring_->next_sequence) > 0) ++ring_->next_sequence;
  }

  // Under mu_: the call's stop (deadline, cancel) as an error that skips its turn, or OK.
  absl::Status GiveUpIfStopped(const std::string& waiting_for) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    absl::Status why;
    if (context_->deadline() <= std::chrono::system_clock::now()) {
      why = absl::DeadlineExceededError(
          absl::StrCat("the call's deadline passed while it waited for ", waiting_for));
    } else if (context_->IsCancelled()) {
      why = absl::CancelledError(
          absl::StrCat("the caller cancelled the call while it waited for ", waiting_for));
    }
    if (why.ok()) return why;
    if (sequence_ > 0 && !skipped_) {
      skipped_ = true;
      if (ring_->next_sequence == sequence_) {
        Advance();
      } else if (ring_->next_sequence < sequence_) {
        ring_->skipped.insert(sequence_);
      }
    }
    return why;
  }

  // Under mu_: waits until `ready`, giving up when the call stops.
  template <typename Ready>
  absl::Status WaitFor(Ready& ready, const std::string& what) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    while (!w_->mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Milliseconds(10))) {
      RA_RETURN_IF_ERROR(GiveUpIfStopped(what));
    }
    return absl::OkStatus();
  }

  WorkerServiceImpl* const w_;
  const std::shared_ptr<Ring> ring_;
  const int64_t sequence_;
  grpc::ServerContext* const context_;
  SlotSet& set_;
  bool began_ = false;
  bool held_ = false;
  bool skipped_ = false;
};

grpc::Status WorkerServiceImpl::RunOnCurrentRing(
    const char* rpc, int64_t generation, int64_t sequence, grpc::ServerContext* context,
    const std::function<absl::Status(const std::shared_ptr<Ring>&, Turn&, SlotSet&)>& run,
    google::protobuf::Message* response) {
  if (sequence < 0) {
    return grpc::Status(grpc::INVALID_ARGUMENT,
                        absl::StrCat("header.sequence must be >= 0, got ", sequence));
  }
  // Refuse a stale request without waiting behind a run or a rendezvous.
  std::shared_ptr<Ring> ring;
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return grpc::Status(grpc::UNAVAILABLE, "the worker is shutting down");
    absl::Status s = CheckGeneration(rpc, generation);
    if (!s.ok()) return ToGrpcStatus(s);
    ring = ring_;
  }
  Turn turn(this, ring, sequence, context);
  absl::Status s = turn.Begin();
  if (s.ok()) s = run(ring, turn, turn.set());
  turn.Release();
  if (!s.ok() && !turn.skipped()) {
    // The ring is unusable now (its peers may be mid-step): abort it so that they fail at once,
    // and forget it so that Ping tells the coordinator to form a new one.
    DropRing(ring, s);
    response->Clear();
  }
  return ToGrpcStatus(s);
}

namespace {

absl::StatusOr<ShardSpec> ParseShardHeader(const v1::ShardHeader& header, int rank, int world) {
  ShardSpec spec;
  RA_ASSIGN_OR_RETURN(spec.shape, ShapeFromProto(header.shape()));
  if (spec.shape.seqlen_q != spec.shape.seqlen_k) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape.seqlen_k (", spec.shape.seqlen_k, ") must equal shape.seqlen_q (",
                     spec.shape.seqlen_q, "): the ring computes self-attention over one sequence"));
  }
  RA_ASSIGN_OR_RETURN(const std::optional<Layout> requested, LayoutFromProto(header.layout()));
  if (!requested.has_value()) {
    return absl::InvalidArgumentError(
        "layout must be LAYOUT_CONTIGUOUS, LAYOUT_ZIGZAG or LAYOUT_STRIPE (the coordinator "
        "resolves AUTO), got LAYOUT_AUTO");
  }
  RA_ASSIGN_OR_RETURN(spec.plan, PlanShards(spec.shape.seqlen_q, world, *requested));
  spec.rank = rank;
  const int64_t rows = spec.plan.shards[rank].rows;
  spec.shard = spec.shape.WithRows(rows, rows);
  spec.options = OptionsFromProto(header.options());
  return spec;
}

// Every input of `rpc` that `request` carries as bytes has the bytes this rank's shard needs.
absl::Status CheckShardInputs(const ComputeRpc& rpc, const google::protobuf::Message& request,
                              const v1::ShardHeader& header, const ShardSpec& spec) {
  for (const ComputeTensor& in : rpc.inputs) {
    const size_t have = BytesField(request, in.name).size();
    const size_t want = BytesOf(in.kind, spec.shard);
    if (header.shm().count(in.name) > 0) {
      if (have != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            in.name, " has ", have, " bytes but is also in shared memory (header.shm)"));
      }
      continue;
    }
    if (have != want) {
      return absl::InvalidArgumentError(absl::StrCat(in.name, " has ", have, " bytes but rank ",
                                                     spec.rank, "'s shard needs ", want, " (",
                                                     DescribeRows(in.kind, spec.shard), ")"));
    }
  }
  for (const auto& [name, shm] : header.shm()) {
    bool known = false;
    for (const ComputeTensor& t : rpc.inputs) known |= name == t.name;
    for (const ComputeTensor& t : rpc.outputs) known |= name == t.name;
    if (!known) {
      return absl::InvalidArgumentError(
          absl::StrCat("header.shm['", name.substr(0, 64), "'] names no tensor of ",
                       std::string(rpc.name)));
    }
  }
  return absl::OkStatus();
}

// The sizes of a ring's shard tensors (RingShardTensors, RingBackwardTensors) from the shape.
template <typename Tensors>
void SetShardSizes(const AttentionShape& s, Tensors* t) {
  t->dtype = s.dtype;
  t->batch = s.batch;
  t->heads = s.heads;
  t->heads_k = s.heads_k;
  t->head_dim = s.head_dim;
}

// A whole tensor in a client's shared memory (system: mapped; CUDA: opened on this worker's
// GPU), viewed as the rows ExtractShard cuts.
struct SharedTensorView {
  std::shared_ptr<SharedMemoryMapping> mapping;  // keeps `data` mapped; null for CUDA memory
  std::shared_ptr<char> device;                  // keeps a CUDA allocation open
  char* data = nullptr;
  RowView rows;
};

// Opens `shm`, which must hold the whole of `t` for the problem in `spec`.
absl::StatusOr<SharedTensorView> OpenWhole(const ComputeTensor& t, const v1::ShardShm& shm,
                                           const ShardSpec& spec, SharedMemoryCache* cache,
                                           RingEngine& engine) {
  const int64_t want = static_cast<int64_t>(BytesOf(t.kind, spec.shape));
  const std::string field = absl::StrCat("header.shm['", t.name, "']");
  if (shm.byte_size() != want) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".byte_size is ", shm.byte_size(),
                                                   "; the whole ", t.name, " has ", want));
  }
  SharedTensorView view;
  view.rows = RowsOf(t.kind, spec.shape);
  if (!shm.cuda_handle().empty()) {
    if (shm.offset() < 0 || shm.offset() > INT64_MAX - shm.byte_size()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".offset is ", shm.offset()));
    }
    absl::StatusOr<std::shared_ptr<char>> base =
        engine.OpenCudaShared(shm.cuda_handle(), shm.offset() + shm.byte_size());
    if (!base.ok()) return Annotate(base.status(), field + ": ");
    view.data = base->get() + shm.offset();
    view.device = *std::move(base);
    return view;
  }
  RA_ASSIGN_OR_RETURN(std::shared_ptr<SharedMemoryMapping> m,
                      cache->Open(shm.key(), shm.offset(), shm.byte_size(), field));
  view.data = m->data();
  view.mapping = std::move(m);
  return view;
}

// Whether rank's shard of a tensor in CUDA memory is the whole tensor in order, at an address
// the kernels take (256-byte aligned, as cudaMalloc's): then the ring uses it in place.
bool UsableInPlace(const ShardPlan& plan, int rank, const SharedTensorView& view) {
  if (view.device == nullptr || reinterpret_cast<uintptr_t>(view.data) % 256 != 0) return false;
  size_t bytes = 0;
  for (const ShardPiece& p : ShardPieces(plan, rank, view.rows.outer, view.rows.row_bytes)) {
    if (p.shard_offset != p.whole_offset) return false;
    bytes += p.bytes;
  }
  return bytes == view.rows.outer * static_cast<size_t>(plan.seqlen) * view.rows.row_bytes;
}

// The copies of rank's rows between a whole tensor in shared memory and its shard in `shard`:
// out of shared memory (`to_shard`) or back into it.
std::vector<CopySpan> RowCopies(const ShardPlan& plan, int rank, const SharedTensorView& view,
                                char* shard, bool to_shard) {
  std::vector<CopySpan> copies;
  for (const ShardPiece& p : ShardPieces(plan, rank, view.rows.outer, view.rows.row_bytes)) {
    if (to_shard) {
      copies.push_back({shard + p.shard_offset, view.data + p.whole_offset, p.bytes});
    } else {
      copies.push_back({view.data + p.whole_offset, shard + p.shard_offset, p.bytes});
    }
  }
  return copies;
}

// FAILED_PRECONDITION when `mapping`'s object was truncated under the request (a device copying
// from pinned pages sees no SIGBUS: the request fails here instead).
// Null (CUDA memory): nothing to check.
absl::Status CheckStillMapped(const SharedMemoryMapping* mapping, const std::string& what) {
  if (mapping == nullptr || !mapping->Shrunk()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      what, ": the shared-memory region shrank or vanished during the request (object '",
      mapping->key(), "')"));
}

// Runs `ring_op` (one ring pass on `comm`) with a watcher that aborts the ring when the call is
// cancelled or past its deadline; a call stopped by its caller reports why, even if the ring got
// to the end first.
absl::StatusOr<RingTimings> RunWatched(
    grpc::ServerContext* context, const std::string& what, RingConnection& comm,
    const std::function<absl::StatusOr<RingTimings>()>& ring_op) {
  absl::StatusOr<RingTimings> timings;
  absl::Status stopped;
  {
    CallWatcher watcher(context, what, [&comm](const absl::Status& why) { comm.Abort(why); });
    timings = ring_op();
    stopped = watcher.Stop();
  }
  if (!stopped.ok()) return stopped;
  if (!timings.ok()) return Annotate(timings.status(), what + ": ");
  return timings;
}

void FillTiming(int rank, int64_t rows, const RingTimings& timings, const std::string& backend,
                v1::WorkerTiming* timing) {
  timing->set_rank(rank);
  timing->set_rows(rows);
  timing->set_compute_seconds(timings.compute_seconds());
  timing->set_comm_wait_seconds(timings.comm_wait_seconds());
  timing->set_ring_seconds(timings.total_seconds);
  timing->set_device_seconds(timings.device_seconds);
  timing->set_launch_seconds(timings.launch_seconds);
  timing->set_host_to_device_seconds(timings.host_to_device_seconds);
  timing->set_device_to_host_seconds(timings.device_to_host_seconds);
  timing->set_backend(backend);
  for (const RingStepTiming& st : timings.steps) {
    v1::StepTiming* step = timing->add_steps();
    step->set_source_rank(st.source_rank);
    step->set_compute_seconds(st.compute_seconds);
    step->set_comm_wait_seconds(st.comm_wait_seconds);
  }
}

}  // namespace

absl::StatusOr<WorkerServiceImpl::SharedShard> WorkerServiceImpl::StageShared(
    SlotSet& set, size_t slot, size_t bytes, SharedMemoryMapping* mapping) {
  bool pinned = true;  // CUDA memory: device copies
  if (mapping != nullptr) {
    RA_ASSIGN_OR_RETURN(pinned, engine_->PinHost(*mapping));
  }
  if (set.slots.size() <= slot) set.slots.resize(slot + 1);
  StagingSlot& s = set.slots[slot];
  if (s.data == nullptr || s.bytes < bytes || s.engine_memory != pinned) {
    s.data.reset();  // freed before the new one is allocated
    s.bytes = 0;
    if (pinned) {
      RA_ASSIGN_OR_RETURN(s.data, engine_->AllocateShard(bytes));
    } else {
      RA_ASSIGN_OR_RETURN(s.data, engine_->AllocateHost(bytes));
    }
    s.bytes = bytes;
    s.engine_memory = pinned;
  }
  return SharedShard{s.data.get(), pinned};
}

absl::Status WorkerServiceImpl::CopyRows(const SharedShard& shard,
                                         const std::vector<CopySpan>& copies,
                                         absl::string_view what) {
  if (shard.engine_memory) return engine_->CopyShard(copies, what);
  return ParallelCopy(copies, what);
}

namespace {

// Seconds since t0.
double Since(absl::Time t0) { return absl::ToDoubleSeconds(absl::Now() - t0); }

// The worker's log line per shard call: the request, the trace the coordinator passed on (this
// call's span a child of its), how it ended and how long the handler took.
void LogShard(const char* method, const v1::ShardHeader& header, const TraceContext& span,
              const absl::Status& status, const v1::WorkerTiming* timing, double seconds) {
  std::vector<LogField> fields = {{"request_id", header.request_id()},
                                  {"rpc", method},
                                  {"code", absl::StatusCodeToString(status.code())},
                                  {"generation", header.generation()},
                                  {"sequence", header.sequence()},
                                  {"trace_id", span.trace_id},
                                  {"span_id", span.span_id}};
  if (!span.parent_span_id.empty()) fields.emplace_back("parent_span_id", span.parent_span_id);
  if (timing != nullptr) fields.emplace_back("rank", timing->rank());
  fields.emplace_back("handler_ms", seconds * 1e3);
  if (!status.ok()) fields.emplace_back("error", status.message());
  Log(status.ok() ? LogLevel::kInfo : LogLevel::kWarning, "worker", "shard", fields);
}

}  // namespace

template <typename Request, typename Response>
grpc::Status WorkerServiceImpl::RunCompute(const ComputeRpc& rpc, const char* method,
                                           const char* what_kind, grpc::ServerContext* context,
                                           const Request& request, Response* response,
                                           const ShardOp<Request>& op) {
  if (absl::Status s = secret_.Check(*context); !s.ok()) return ToGrpcStatus(s);
  const absl::Time handler0 = absl::Now();
  int64_t bytes_sent = 0;
  const TraceContext span = SpanOfCall(*context);
  const grpc::Status status = RunOnCurrentRing(
      method, request.header().generation(), request.header().sequence(), context,
      [&](const std::shared_ptr<Ring>& ring, Turn& turn,
          SlotSet& set) ABSL_NO_THREAD_SAFETY_ANALYSIS -> absl::Status {
        RingConnection& comm = *ring->conn;
        const int rank = comm.rank();
        const v1::ShardHeader& header = request.header();
        const std::string what =
            absl::StrCat("rank ", rank, " of ring generation ", ring->generation, ", ", what_kind,
                         "request '", header.request_id(), "'");
        RA_ASSIGN_OR_RETURN(const ShardSpec spec,
                            ParseShardHeader(header, rank, comm.world_size()));
        RA_RETURN_IF_ERROR(CheckShardInputs(rpc, request, header, spec));

        // The tensors in the client's shared memory: the whole tensor mapped, this rank's rows
        // read into (inputs) or later written from (outputs) staging.
        struct SharedOutput {
          const ComputeTensor* tensor;
          SharedTensorView view;
          SharedShard shard;
        };
        std::vector<SharedOutput> shared_outputs;
        std::vector<SharedTensorView> held;  // tensors used in place, open for the call
        ShardBuffers buffers;
        double read_seconds = 0;
        size_t slot = 0;
        for (const ComputeTensor& in : rpc.inputs) {
          auto shm = header.shm().find(in.name);
          if (shm == header.shm().end()) {
            buffers.inputs.push_back(BytesField(request, in.name).data());
            continue;
          }
          const absl::Time read0 = absl::Now();
          RA_ASSIGN_OR_RETURN(SharedTensorView view,
                              OpenWhole(in, shm->second, spec, &shared_memory_, *engine_));
          if (UsableInPlace(spec.plan, rank, view)) {
            buffers.inputs.push_back(view.data);
            held.push_back(std::move(view));
            read_seconds += Since(read0);
            continue;
          }
          RA_ASSIGN_OR_RETURN(const SharedShard staged,
                              StageShared(set, slot++, BytesOf(in.kind, spec.shard), view.mapping.get()));
          const std::string where = absl::StrCat(in.name, " in shared memory");
          RA_RETURN_IF_ERROR(
              CopyRows(staged, RowCopies(spec.plan, rank, view, staged.data, true), where));
          RA_RETURN_IF_ERROR(CheckStillMapped(view.mapping.get(), where));
          buffers.inputs.push_back(staged.data);
          held.push_back(std::move(view));
          read_seconds += Since(read0);
        }
        for (const ComputeTensor& out : rpc.outputs) {
          if (!Wants(request, out)) {
            buffers.outputs.push_back(nullptr);
            continue;
          }
          const size_t bytes = BytesOf(out.kind, spec.shard);
          auto shm = header.shm().find(out.name);
          if (shm == header.shm().end()) {
            buffers.outputs.push_back(SizeBytesField(response, out.name, bytes));
            continue;
          }
          RA_ASSIGN_OR_RETURN(SharedTensorView view,
                              OpenWhole(out, shm->second, spec, &shared_memory_, *engine_));
          if (UsableInPlace(spec.plan, rank, view)) {
            buffers.outputs.push_back(view.data);
            held.push_back(std::move(view));
            continue;
          }
          RA_ASSIGN_OR_RETURN(const SharedShard staged,
                              StageShared(set, slot++, bytes, view.mapping.get()));
          buffers.outputs.push_back(staged.data);
          shared_outputs.push_back({&out, std::move(view), staged});
        }

        // The ring pass in this call's turn (the previous call's outputs may still be leaving,
        // the next one's inputs arriving).
        const absl::Time turn0 = absl::Now();
        RA_RETURN_IF_ERROR(turn.Take());
        const absl::Time ring0 = absl::Now();
        RA_ASSIGN_OR_RETURN(const RingTimings timings, RunWatched(context, what, comm, [&] {
                              return op(comm, spec, request, buffers);
                            }));
        turn.Release();
        bytes_sent = RingBytesSent(
            spec.plan, rank,
            &rpc == &AttendBackwardRpc() ? RingDirection::kBackward : RingDirection::kForward,
            spec.shape);
        const absl::Time write0 = absl::Now();
        for (const SharedOutput& out : shared_outputs) {
          const std::string where = absl::StrCat(out.tensor->name, " in shared memory");
          RA_RETURN_IF_ERROR(CopyRows(
              out.shard, RowCopies(spec.plan, rank, out.view, out.shard.data, false), where));
          RA_RETURN_IF_ERROR(CheckStillMapped(out.view.mapping.get(), where));
        }
        const absl::Time send0 = absl::Now();
        v1::WorkerTiming* timing = response->mutable_timing();
        FillTiming(rank, spec.shard.seqlen_q, timings, engine_->backend_name(), timing);
        timing->set_receive_seconds(absl::ToDoubleSeconds(turn0 - handler0) - read_seconds);
        timing->set_turn_wait_seconds(absl::ToDoubleSeconds(ring0 - turn0));
        timing->set_shared_memory_read_seconds(read_seconds);
        timing->set_shared_memory_write_seconds(absl::ToDoubleSeconds(send0 - write0));
        timing->set_send_seconds(Since(send0));
        return absl::OkStatus();
      },
      response);
  if (status.ok()) {
    response->mutable_timing()->set_handler_seconds(Since(handler0));
  }
  if (metrics_ != nullptr) {
    metrics_->RecordCall(rpc.name, static_cast<absl::StatusCode>(status.error_code()),
                         response->timing(), bytes_sent);
  }
  LogShard(method, request.header(), span, FromGrpcStatus(status),
           status.ok() ? &response->timing() : nullptr, Since(handler0));
  return status;
}

grpc::Status WorkerServiceImpl::RunShard(grpc::ServerContext* context,
                                         const v1::RunShardRequest* request,
                                         v1::RunShardResponse* response) {
  return RunCompute<v1::RunShardRequest, v1::RunShardResponse>(
      AttendRpc(), "RunShard", "", context, *request, response,
      [](RingConnection& comm, const ShardSpec& spec, const v1::RunShardRequest& /*req*/,
         const ShardBuffers& io) {
        RingShardTensors t;  // AttendRpc's order: in q, k, v; out out, lse
        SetShardSizes(spec.shape, &t);
        t.q = io.inputs[0];
        t.k = io.inputs[1];
        t.v = io.inputs[2];
        t.out = io.outputs[0];
        t.lse = reinterpret_cast<float*>(io.outputs[1]);  // null unless return_lse
        return comm.Forward(spec.plan, t, spec.options);
      });
}

grpc::Status WorkerServiceImpl::RunShardBackward(grpc::ServerContext* context,
                                                 const v1::RunShardBackwardRequest* request,
                                                 v1::RunShardBackwardResponse* response) {
  return RunCompute<v1::RunShardBackwardRequest, v1::RunShardBackwardResponse>(
      AttendBackwardRpc(), "RunShardBackward", "backward of ", context, *request, response,
      [](RingConnection& comm, const ShardSpec& spec, const v1::RunShardBackwardRequest& /*req*/,
         const ShardBuffers& io) {
        RingBackwardTensors t;  // AttendBackwardRpc's order: in q, k, v, out, dout, lse;
        SetShardSizes(spec.shape, &t);  // out dq, dk, dv
        t.grad_dtype = spec.shape.dtype;  // accumulated in fp32, rounded once at the end
        t.q = io.inputs[0];
        t.k = io.inputs[1];
        t.v = io.inputs[2];
        t.out = io.inputs[3];
        t.dout = io.inputs[4];
        t.lse = reinterpret_cast<const float*>(io.inputs[5]);
        t.dq = io.outputs[0];
        t.dk = io.outputs[1];
        t.dv = io.outputs[2];
        return comm.Backward(spec.plan, t, spec.options);
      });
}

void WorkerServiceImpl::DropRing(const std::shared_ptr<Ring>& ring, const absl::Status& reason) {
  ring->conn->Abort(reason);
  std::shared_ptr<Ring> dropped;
  absl::MutexLock lock(&mu_);
  if (ring_ == ring) {
    dropped = std::move(ring_);
    ring_.reset();
  }
}

}  // namespace ringattn
