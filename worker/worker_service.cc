#include "worker/worker_service.h"

#include <chrono>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "proto/convert.h"
#include "ring/host_ring.h"
#include "ring/layout.h"
#include "ring/ring_backward.h"

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

// Bytes of a tensor with the given dimensions; InvalidArgument naming it on overflow.
absl::StatusOr<size_t> TensorBytes(const char* name, std::initializer_list<int64_t> dims,
                                   int64_t element_bytes) {
  int64_t n = element_bytes;
  for (int64_t d : dims) {
    if (__builtin_mul_overflow(n, d, &n)) {
      return absl::InvalidArgumentError(absl::StrCat(name, " is too large to address"));
    }
  }
  return static_cast<size_t>(n);
}

absl::Status CheckBytes(const char* name, const std::string& data, size_t want, int batch,
                        int64_t rows, int heads, int head_dim, DType dtype, int rank) {
  if (data.size() == want) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(name, " has ", data.size(), " bytes but rank ", rank, "'s shard needs ", want,
                   " ([batch=", batch, ", rows=", rows, ", heads=", heads, ", head_dim=", head_dim,
                   "] ", std::string(DTypeName(dtype)), ")"));
}

}  // namespace

WorkerServiceImpl::WorkerServiceImpl(
    std::shared_ptr<v1::CoordinatorService::StubInterface> coordinator,
    std::unique_ptr<RingEngine> engine)
    : coordinator_(std::move(coordinator)), engine_(std::move(engine)) {}

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

int64_t WorkerServiceImpl::generation() const {
  absl::MutexLock lock(&mu_);
  return ring_ != nullptr ? ring_->generation : 0;
}

grpc::Status WorkerServiceImpl::Ping(grpc::ServerContext* /*context*/,
                                     const v1::PingRequest* /*request*/,
                                     v1::PingResponse* response) {
  absl::MutexLock lock(&mu_);
  response->set_generation(ring_ != nullptr ? ring_->generation : 0);
  response->set_busy(busy_);
  return grpc::Status::OK;
}

grpc::Status WorkerServiceImpl::JoinRing(grpc::ServerContext* context,
                                         const v1::JoinRingRequest* request,
                                         v1::JoinRingResponse* /*response*/) {
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

grpc::Status WorkerServiceImpl::RunOnCurrentRing(
    const char* rpc, int64_t generation,
    const std::function<absl::Status(const std::shared_ptr<Ring>&)>& run,
    google::protobuf::Message* response) {
  // Refuse a stale request without waiting behind a run or a rendezvous.
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return grpc::Status(grpc::UNAVAILABLE, "the worker is shutting down");
    absl::Status s = CheckGeneration(rpc, generation);
    if (!s.ok()) return ToGrpcStatus(s);
  }
  absl::MutexLock run_lock(&run_mu_);
  std::shared_ptr<Ring> ring;
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return grpc::Status(grpc::UNAVAILABLE, "the worker is shutting down");
    absl::Status s = CheckGeneration(rpc, generation);
    if (!s.ok()) return ToGrpcStatus(s);
    ring = ring_;
    busy_ = true;
  }
  const absl::Status s = run(ring);
  if (!s.ok()) {
    // The ring is unusable now (its peers may be mid-step): abort it so that they fail at once,
    // and forget it so that Ping tells the coordinator to form a new one.
    DropRing(ring, s);
    response->Clear();
  }
  {
    absl::MutexLock lock(&mu_);
    busy_ = false;
  }
  return ToGrpcStatus(s);
}

grpc::Status WorkerServiceImpl::RunShard(grpc::ServerContext* context,
                                         const v1::RunShardRequest* request,
                                         v1::RunShardResponse* response) {
  return RunOnCurrentRing(
      "RunShard", request->generation(),
      [&](const std::shared_ptr<Ring>& ring) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return Run(context, *request, ring, response);
      },
      response);
}

grpc::Status WorkerServiceImpl::RunShardBackward(grpc::ServerContext* context,
                                                 const v1::RunShardBackwardRequest* request,
                                                 v1::RunShardBackwardResponse* response) {
  return RunOnCurrentRing(
      "RunShardBackward", request->generation(),
      [&](const std::shared_ptr<Ring>& ring) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return RunBackward(context, *request, ring, response);
      },
      response);
}

namespace {

// The sizes of this rank's shard, from the fields RunShardRequest and RunShardBackwardRequest
// share, checked.
struct ShardSpec {
  DType dtype = DType::kF32;
  int batch = 0;
  int heads = 0;
  int heads_k = 0;
  int head_dim = 0;
  ShardPlan plan;
  int64_t rows = 0;      // of this rank
  size_t q_bytes = 0;    // [batch, rows, heads, head_dim] of dtype (q, out, dout, dq)
  size_t kv_bytes = 0;   // [batch, rows, heads_k, head_dim] of dtype (k, v, dk, dv)
  size_t lse_bytes = 0;  // [batch, heads, rows] fp32

  absl::Status Check(const char* name, const std::string& data, bool kv, int rank) const {
    return CheckBytes(name, data, kv ? kv_bytes : q_bytes, batch, rows, kv ? heads_k : heads,
                      head_dim, dtype, rank);
  }
};

template <typename ShardRequest>
absl::StatusOr<ShardSpec> ParseShard(const ShardRequest& request, int rank, int world) {
  ShardSpec spec;
  RA_ASSIGN_OR_RETURN(spec.dtype, DTypeFromProto(request.dtype()));
  RA_ASSIGN_OR_RETURN(const std::optional<Layout> requested, LayoutFromProto(request.layout()));
  if (!requested.has_value()) {
    return absl::InvalidArgumentError(
        "layout must be LAYOUT_CONTIGUOUS, LAYOUT_ZIGZAG or LAYOUT_STRIPE (the coordinator "
        "resolves AUTO), got LAYOUT_AUTO");
  }
  spec.batch = request.batch();
  spec.heads = request.heads();
  spec.heads_k = request.heads_k();
  spec.head_dim = request.head_dim();
  const int64_t seqlen = request.seqlen();
  for (const auto& [name, value] : {std::pair<const char*, int64_t>{"batch", spec.batch},
                                    {"heads", spec.heads},
                                    {"heads_k", spec.heads_k},
                                    {"head_dim", spec.head_dim}}) {
    if (value <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be > 0, got ", value));
    }
  }
  if (seqlen < 0) {
    return absl::InvalidArgumentError(absl::StrCat("seqlen must be >= 0, got ", seqlen));
  }
  RA_ASSIGN_OR_RETURN(spec.plan, PlanShards(seqlen, world, *requested));
  spec.rows = spec.plan.shards[rank].rows;
  const int esize = DTypeSize(spec.dtype);
  RA_ASSIGN_OR_RETURN(spec.q_bytes,
                      TensorBytes("q", {spec.batch, spec.rows, spec.heads, spec.head_dim}, esize));
  RA_ASSIGN_OR_RETURN(
      spec.kv_bytes, TensorBytes("k", {spec.batch, spec.rows, spec.heads_k, spec.head_dim}, esize));
  RA_ASSIGN_OR_RETURN(spec.lse_bytes,
                      TensorBytes("lse", {spec.batch, spec.heads, spec.rows}, sizeof(float)));
  RA_RETURN_IF_ERROR(spec.Check("q", request.q(), false, rank));
  RA_RETURN_IF_ERROR(spec.Check("k", request.k(), true, rank));
  RA_RETURN_IF_ERROR(spec.Check("v", request.v(), true, rank));
  return spec;
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
  timing->set_backend(backend);
  for (const RingStepTiming& st : timings.steps) {
    v1::StepTiming* step = timing->add_steps();
    step->set_source_rank(st.source_rank);
    step->set_compute_seconds(st.compute_seconds);
    step->set_comm_wait_seconds(st.comm_wait_seconds);
  }
}

}  // namespace

absl::Status WorkerServiceImpl::Run(grpc::ServerContext* context,
                                    const v1::RunShardRequest& request,
                                    const std::shared_ptr<Ring>& ring,
                                    v1::RunShardResponse* response) {
  RingConnection& comm = *ring->conn;
  const int rank = comm.rank();
  const std::string what = absl::StrCat("rank ", rank, " of ring generation ", ring->generation,
                                        ", request '", request.request_id(), "'");
  RA_ASSIGN_OR_RETURN(const ShardSpec spec, ParseShard(request, rank, comm.world_size()));
  const RingAttentionOptions options = OptionsFromProto(request.options());

  std::string* out = response->mutable_out();
  out->resize(spec.q_bytes);
  std::string* lse = response->mutable_lse();
  if (request.return_lse()) lse->resize(spec.lse_bytes);
  RingShardTensors t;
  t.dtype = spec.dtype;
  t.batch = spec.batch;
  t.heads = spec.heads;
  t.heads_k = spec.heads_k;
  t.head_dim = spec.head_dim;
  t.q = request.q().data();
  t.k = request.k().data();
  t.v = request.v().data();
  t.out = out->data();
  t.lse = request.return_lse() ? reinterpret_cast<float*>(lse->data()) : nullptr;

  RA_ASSIGN_OR_RETURN(const RingTimings timings,
                      RunWatched(context, what, comm,
                                 [&] { return comm.Forward(spec.plan, t, options); }));
  FillTiming(rank, spec.rows, timings, engine_->backend_name(), response->mutable_timing());
  return absl::OkStatus();
}

absl::Status WorkerServiceImpl::RunBackward(grpc::ServerContext* context,
                                            const v1::RunShardBackwardRequest& request,
                                            const std::shared_ptr<Ring>& ring,
                                            v1::RunShardBackwardResponse* response) {
  RingConnection& comm = *ring->conn;
  const int rank = comm.rank();
  const std::string what =
      absl::StrCat("rank ", rank, " of ring generation ", ring->generation, ", backward of ",
                   "request '", request.request_id(), "'");
  RA_ASSIGN_OR_RETURN(const ShardSpec spec, ParseShard(request, rank, comm.world_size()));
  RA_RETURN_IF_ERROR(spec.Check("out", request.out(), false, rank));
  RA_RETURN_IF_ERROR(spec.Check("dout", request.dout(), false, rank));
  if (request.lse().size() != spec.lse_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("lse has ", request.lse().size(), " bytes but rank ", rank,
                     "'s shard needs ", spec.lse_bytes, " ([batch=", spec.batch, ", heads=",
                     spec.heads, ", rows=", spec.rows, "] fp32)"));
  }
  const RingAttentionOptions options = OptionsFromProto(request.options());

  std::string* dq = response->mutable_dq();
  std::string* dk = response->mutable_dk();
  std::string* dv = response->mutable_dv();
  dq->resize(spec.q_bytes);
  dk->resize(spec.kv_bytes);
  dv->resize(spec.kv_bytes);
  RingBackwardTensors t;
  t.dtype = spec.dtype;
  t.grad_dtype = spec.dtype;  // accumulated in fp32, rounded once at the end
  t.batch = spec.batch;
  t.heads = spec.heads;
  t.heads_k = spec.heads_k;
  t.head_dim = spec.head_dim;
  t.q = request.q().data();
  t.k = request.k().data();
  t.v = request.v().data();
  t.out = request.out().data();
  t.dout = request.dout().data();
  t.lse = reinterpret_cast<const float*>(request.lse().data());
  t.dq = dq->data();
  t.dk = dk->data();
  t.dv = dv->data();

  RA_ASSIGN_OR_RETURN(const RingTimings timings,
                      RunWatched(context, what, comm,
                                 [&] { return comm.Backward(spec.plan, t, options); }));
  FillTiming(rank, spec.rows, timings, engine_->backend_name(), response->mutable_timing());
  return absl::OkStatus();
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
