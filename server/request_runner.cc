#include "server/request_runner.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "proto/convert.h"
#include "worker/ring/layout.h"

namespace ringattn {
namespace {

double SecondsSince(absl::Time t0) { return absl::ToDoubleSeconds(absl::Now() - t0); }

// One worker call in flight.
struct ShardCall {
  grpc::ClientContext ctx;
  v1::RunShardRequest request;
  v1::RunShardResponse response;
  grpc::Status status;
  bool done = false;
};

// The most telling status of a failed ring: the caller's own deadline or cancellation first,
// then a worker's error (the first by rank; others are usually its echoes).
absl::Status RingFailure(const std::vector<std::unique_ptr<ShardCall>>& calls,
                         const RingSnapshot& ring, const RunControl& control) {
  if (control.cancelled != nullptr && control.cancelled->load()) {
    return absl::CancelledError("the client cancelled the request; workers stopped");
  }
  if (absl::Now() >= control.deadline) {
    return absl::DeadlineExceededError("deadline exceeded while the ring was computing");
  }
  for (size_t r = 0; r < calls.size(); ++r) {
    const grpc::Status& s = calls[r]->status;
    if (s.ok()) continue;
    if (s.error_code() == grpc::StatusCode::INVALID_ARGUMENT) return FromGrpcStatus(s);
    return absl::UnavailableError(absl::StrCat("worker rank ", r, " (", ring.members[r]->address,
                                               ") failed: ", s.error_message()));
  }
  return absl::InternalError("ring failed without a worker error");
}

}  // namespace

absl::Status RunOnRing(const v1::AttendRequest& request, const ValidatedAttend& p,
                       const RingSnapshot& ring, const RunControl& control,
                       v1::AttendResponse* response) {
  const int world = static_cast<int>(ring.members.size());
  const Layout layout = p.ResolvedLayout();
  absl::StatusOr<ShardPlan> plan_or = PlanShards(p.seqlen, world, layout);
  if (!plan_or.ok()) return plan_or.status();
  const ShardPlan& plan = *plan_or;
  const size_t q_row = p.q_row_bytes();
  const size_t kv_row = p.kv_row_bytes();

  // Scatter: each rank's rows of q, k, v in layout order.
  const absl::Time scatter0 = absl::Now();
  std::vector<std::unique_ptr<ShardCall>> calls;
  for (int r = 0; r < world; ++r) {
    auto call = std::make_unique<ShardCall>();
    v1::RunShardRequest& req = call->request;
    req.set_generation(ring.generation);
    req.set_request_id(p.request_id);
    req.set_dtype(request.q().dtype());
    req.set_batch(p.batch);
    req.set_seqlen(p.seqlen);
    req.set_heads(p.heads);
    req.set_heads_k(p.heads_k);
    req.set_head_dim(p.head_dim);
    req.set_layout(LayoutToProto(layout));
    *req.mutable_options() = request.options();
    req.set_return_lse(p.return_lse);
    *req.mutable_q() = ExtractShardBytes(plan, r, *p.q_bytes, p.batch, q_row);
    *req.mutable_k() = ExtractShardBytes(plan, r, *p.k_bytes, p.batch, kv_row);
    *req.mutable_v() = ExtractShardBytes(plan, r, *p.v_bytes, p.batch, kv_row);
    call->ctx.set_deadline(absl::ToChronoTime(control.deadline));
    calls.push_back(std::move(call));
  }
  response->mutable_timings()->set_scatter_seconds(SecondsSince(scatter0));

  // Every worker's call at once: the ranks must all be in the ring together.
  absl::Mutex mu;
  absl::CondVar changed;
  int finished = 0;
  bool any_failed = false;
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      ShardCall& c = *calls[r];
      c.status = ring.members[r]->stub->RunShard(&c.ctx, c.request, &c.response);
      absl::MutexLock lock(&mu);
      c.done = true;
      ++finished;
      any_failed |= !c.status.ok();
      changed.Signal();
    });
  }
  // On the first failure, or when the client goes away, cancel every call still running so
  // that no worker keeps computing for nobody (the client's cancellation is polled).
  {
    absl::MutexLock lock(&mu);
    bool cancelled_calls = false;
    while (finished < world) {
      changed.WaitWithTimeout(&mu, absl::Milliseconds(5));
      const bool client_gone = control.cancelled != nullptr && control.cancelled->load();
      if ((any_failed || client_gone) && !cancelled_calls) {
        for (auto& c : calls) {
          if (!c->done) c->ctx.TryCancel();
        }
        cancelled_calls = true;
      }
    }
  }
  for (auto& t : threads) t.join();
  if (any_failed) return RingFailure(calls, ring, control);

  // Gather: each rank's rows back into sequence order.
  const absl::Time gather0 = absl::Now();
  v1::Tensor* out = response->mutable_out();
  out->set_dtype(request.q().dtype());
  *out->mutable_shape() = request.q().shape();
  std::string* out_bytes = out->mutable_data();
  out_bytes->resize(p.q_bytes->size());
  std::string* lse_bytes = nullptr;
  if (p.return_lse) {
    v1::Tensor* lse = response->mutable_lse();
    lse->set_dtype(v1::DTYPE_FP32);
    for (int64_t d : {static_cast<int64_t>(p.batch), static_cast<int64_t>(p.heads), p.seqlen}) {
      lse->add_shape(d);
    }
    lse_bytes = lse->mutable_data();
    lse_bytes->resize(static_cast<size_t>(p.batch) * p.heads * p.seqlen * sizeof(float));
  }
  v1::Timings* timings = response->mutable_timings();
  for (int r = 0; r < world; ++r) {
    const v1::RunShardResponse& resp = calls[r]->response;
    absl::Status s = InsertShardBytes(plan, r, resp.out(), p.batch, q_row, out_bytes);
    if (s.ok() && lse_bytes != nullptr) {
      s = InsertShardBytes(plan, r, resp.lse(), static_cast<int64_t>(p.batch) * p.heads,
                           sizeof(float), lse_bytes);
    }
    if (!s.ok()) {
      return absl::InternalError(absl::StrCat("worker rank ", r, ": ", s.message()));
    }
    v1::WorkerTiming* wt = timings->add_workers();
    *wt = resp.timing();
    wt->set_rank(r);
    wt->set_rows(plan.shards[r].rows);
  }
  *response->mutable_plan() = ShardPlanToProto(plan);
  timings->set_gather_seconds(SecondsSince(gather0));
  return absl::OkStatus();
}

}  // namespace ringattn
