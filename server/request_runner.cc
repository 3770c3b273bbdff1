#include "server/request_runner.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "proto/convert.h"
#include "ring/layout.h"
#include "ringattn/v1/worker.grpc.pb.h"

namespace ringattn {
namespace {

double SecondsSince(absl::Time t0) { return absl::ToDoubleSeconds(absl::Now() - t0); }

// The worker calls of one request, one per rank, in flight together.
struct RingCalls {
  explicit RingCalls(int world) : contexts(world), statuses(world) {}
  std::vector<grpc::ClientContext> contexts;
  std::vector<grpc::Status> statuses;
};

// The most telling status of a failed ring: the caller's own deadline or cancellation first,
// then a worker's error (the first by rank; others are usually its echoes).
absl::Status RingFailure(const RingCalls& calls, const RingSnapshot& ring,
                         const RunControl& control) {
  if (control.cancelled != nullptr && control.cancelled->load()) {
    return absl::CancelledError("the client cancelled the request; workers stopped");
  }
  if (absl::Now() >= control.deadline) {
    return absl::DeadlineExceededError("deadline exceeded while the ring was computing");
  }
  for (size_t r = 0; r < calls.statuses.size(); ++r) {
    const grpc::Status& s = calls.statuses[r];
    if (s.ok()) continue;
    if (s.error_code() == grpc::StatusCode::INVALID_ARGUMENT ||
        s.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
      return FromGrpcStatus(s);
    }
    return absl::UnavailableError(absl::StrCat("worker rank ", r, " (", ring.members[r]->address,
                                               ") failed: ", s.error_message()));
  }
  return absl::InternalError("ring failed without a worker error");
}

// Runs `call(rank, context)` (one blocking worker RPC) for every rank at once: the ranks must
// all be in the ring together. On the first failure, or when the client goes away, cancels
// every call still running so that no worker keeps computing for nobody (the client's
// cancellation is polled). OK when every call succeeded, else RingFailure.
absl::Status RunOnEveryRank(const RingSnapshot& ring, const RunControl& control,
                            const std::function<grpc::Status(int, grpc::ClientContext*)>& call) {
  const int world = static_cast<int>(ring.members.size());
  RingCalls calls(world);
  for (grpc::ClientContext& ctx : calls.contexts) {
    ctx.set_deadline(absl::ToChronoTime(control.deadline));
  }
  absl::Mutex mu;
  absl::CondVar changed;
  std::vector<bool> done(world, false);
  int finished = 0;
  bool any_failed = false;
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      grpc::Status s = call(r, &calls.contexts[r]);
      absl::MutexLock lock(&mu);
      calls.statuses[r] = std::move(s);
      done[r] = true;
      ++finished;
      any_failed |= !calls.statuses[r].ok();
      changed.Signal();
    });
  }
  {
    absl::MutexLock lock(&mu);
    bool cancelled_calls = false;
    while (finished < world) {
      changed.WaitWithTimeout(&mu, absl::Milliseconds(5));
      const bool client_gone = control.cancelled != nullptr && control.cancelled->load();
      if ((any_failed || client_gone) && !cancelled_calls) {
        for (int r = 0; r < world; ++r) {
          if (!done[r]) calls.contexts[r].TryCancel();
        }
        cancelled_calls = true;
      }
    }
  }
  for (auto& t : threads) t.join();
  if (any_failed) return RingFailure(calls, ring, control);
  return absl::OkStatus();
}

// The fields RunShardRequest and RunShardBackwardRequest share.
template <typename ShardRequest>
void FillShardHeader(const RingSnapshot& ring, const ValidatedAttend& p, v1::DType dtype,
                     Layout layout, const v1::AttentionOptions& options, ShardRequest* req) {
  req->set_generation(ring.generation);
  req->set_request_id(p.request_id);
  req->set_dtype(dtype);
  req->set_batch(p.batch);
  req->set_seqlen(p.seqlen);
  req->set_heads(p.heads);
  req->set_heads_k(p.heads_k);
  req->set_head_dim(p.head_dim);
  req->set_layout(LayoutToProto(layout));
  *req->mutable_options() = options;
}

// Sizes `whole` to [outer, plan.seqlen, row_bytes] and writes every rank's shard
// (`shard_of(rank)`) into its rows. INTERNAL naming the rank when a shard has the wrong size.
// Runs fn(r) for every rank, one thread each (none for one rank). Scatter and gather are
// memory-bound row copies between the whole tensors and the shards, disjoint per rank: on one
// thread a 384 MB request (2 ranks, 2 x H100 run) took 0.30 s to scatter and 0.22 s to gather.
void ForEachRankInParallel(int world, const std::function<void(int)>& fn) {
  if (world == 1) {
    fn(0);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(world);
  for (int r = 0; r < world; ++r) threads.emplace_back(fn, r);
  for (std::thread& t : threads) t.join();
}

absl::Status Gather(const ShardPlan& plan, int64_t outer, size_t row_bytes,
                    const std::function<const std::string&(int)>& shard_of, std::string* whole) {
  whole->resize(static_cast<size_t>(outer) * plan.seqlen * row_bytes);
  // Each rank's rows land in disjoint bytes of *whole (resized above, not again).
  std::vector<absl::Status> statuses(plan.world);
  ForEachRankInParallel(plan.world, [&](int r) {
    statuses[r] = InsertShardBytes(plan, r, shard_of(r), outer, row_bytes, whole);
  });
  for (int r = 0; r < plan.world; ++r) {
    if (!statuses[r].ok()) {
      return absl::InternalError(absl::StrCat("worker rank ", r, ": ", statuses[r].message()));
    }
  }
  return absl::OkStatus();
}

// A tensor of the response: dtype, shape and (gathered) data.
v1::Tensor* StartTensor(v1::DType dtype, const google::protobuf::RepeatedField<int64_t>& shape,
                        v1::Tensor* t) {
  t->set_dtype(dtype);
  *t->mutable_shape() = shape;
  return t;
}

// One row of timings->workers per rank, from its answer.
void AddWorkerTimings(const ShardPlan& plan,
                      const std::function<const v1::WorkerTiming&(int)>& timing_of,
                      v1::Timings* timings) {
  for (int r = 0; r < plan.world; ++r) {
    v1::WorkerTiming* wt = timings->add_workers();
    *wt = timing_of(r);
    wt->set_rank(r);
    wt->set_rows(plan.shards[r].rows);
  }
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
  const int64_t lse_outer = static_cast<int64_t>(p.batch) * p.heads;

  // Scatter: each rank's rows of q, k, v in layout order.
  const absl::Time scatter0 = absl::Now();
  std::vector<v1::RunShardRequest> requests(world);
  std::vector<v1::RunShardResponse> responses(world);
  ForEachRankInParallel(world, [&](int r) {
    v1::RunShardRequest& req = requests[r];
    FillShardHeader(ring, p, request.q().dtype(), layout, request.options(), &req);
    req.set_return_lse(p.return_lse);
    *req.mutable_q() = ExtractShardBytes(plan, r, *p.q_bytes, p.batch, q_row);
    *req.mutable_k() = ExtractShardBytes(plan, r, *p.k_bytes, p.batch, kv_row);
    *req.mutable_v() = ExtractShardBytes(plan, r, *p.v_bytes, p.batch, kv_row);
  });
  response->mutable_timings()->set_scatter_seconds(SecondsSince(scatter0));

  if (absl::Status s = RunOnEveryRank(ring, control,
                                      [&](int r, grpc::ClientContext* ctx) {
                                        return ring.members[r]->stub->RunShard(ctx, requests[r],
                                                                               &responses[r]);
                                      });
      !s.ok()) {
    return s;
  }

  // Gather: each rank's rows back into sequence order.
  const absl::Time gather0 = absl::Now();
  v1::Tensor* out = StartTensor(request.q().dtype(), request.q().shape(), response->mutable_out());
  absl::Status s = Gather(
      plan, p.batch, q_row, [&](int r) -> const std::string& { return responses[r].out(); },
      out->mutable_data());
  if (s.ok() && p.return_lse) {
    v1::Tensor* lse = response->mutable_lse();
    lse->set_dtype(v1::DTYPE_FP32);
    for (int64_t d : {static_cast<int64_t>(p.batch), static_cast<int64_t>(p.heads), p.seqlen}) {
      lse->add_shape(d);
    }
    s = Gather(
        plan, lse_outer, sizeof(float),
        [&](int r) -> const std::string& { return responses[r].lse(); }, lse->mutable_data());
  }
  if (!s.ok()) return s;
  AddWorkerTimings(
      plan, [&](int r) -> const v1::WorkerTiming& { return responses[r].timing(); },
      response->mutable_timings());
  *response->mutable_plan() = ShardPlanToProto(plan);
  response->mutable_timings()->set_gather_seconds(SecondsSince(gather0));
  return absl::OkStatus();
}

absl::Status RunBackwardOnRing(const v1::AttendBackwardRequest& request,
                               const ValidatedAttendBackward& problem, const RingSnapshot& ring,
                               const RunControl& control, v1::AttendBackwardResponse* response) {
  const ValidatedAttend& p = problem.attend;
  const int world = static_cast<int>(ring.members.size());
  const Layout layout = p.ResolvedLayout();
  absl::StatusOr<ShardPlan> plan_or = PlanShards(p.seqlen, world, layout);
  if (!plan_or.ok()) return plan_or.status();
  const ShardPlan& plan = *plan_or;
  const size_t q_row = p.q_row_bytes();
  const size_t kv_row = p.kv_row_bytes();
  const int64_t lse_outer = static_cast<int64_t>(p.batch) * p.heads;

  // Scatter: each rank's rows of q, k, v, out, dout and lse in layout order.
  const absl::Time scatter0 = absl::Now();
  std::vector<v1::RunShardBackwardRequest> requests(world);
  std::vector<v1::RunShardBackwardResponse> responses(world);
  ForEachRankInParallel(world, [&](int r) {
    v1::RunShardBackwardRequest& req = requests[r];
    FillShardHeader(ring, p, request.q().dtype(), layout, request.options(), &req);
    *req.mutable_q() = ExtractShardBytes(plan, r, *p.q_bytes, p.batch, q_row);
    *req.mutable_k() = ExtractShardBytes(plan, r, *p.k_bytes, p.batch, kv_row);
    *req.mutable_v() = ExtractShardBytes(plan, r, *p.v_bytes, p.batch, kv_row);
    *req.mutable_out() = ExtractShardBytes(plan, r, *problem.out_bytes, p.batch, q_row);
    *req.mutable_dout() = ExtractShardBytes(plan, r, *problem.dout_bytes, p.batch, q_row);
    *req.mutable_lse() =
        ExtractShardBytes(plan, r, *problem.lse_bytes, lse_outer, sizeof(float));
  });
  response->mutable_timings()->set_scatter_seconds(SecondsSince(scatter0));

  if (absl::Status s = RunOnEveryRank(ring, control,
                                      [&](int r, grpc::ClientContext* ctx) {
                                        return ring.members[r]->stub->RunShardBackward(
                                            ctx, requests[r], &responses[r]);
                                      });
      !s.ok()) {
    return s;
  }

  // Gather: dq like q, dk and dv like k and v.
  const absl::Time gather0 = absl::Now();
  const v1::DType dtype = request.q().dtype();
  v1::Tensor* dq = StartTensor(dtype, request.q().shape(), response->mutable_dq());
  v1::Tensor* dk = StartTensor(dtype, request.k().shape(), response->mutable_dk());
  v1::Tensor* dv = StartTensor(dtype, request.v().shape(), response->mutable_dv());
  absl::Status s = Gather(
      plan, p.batch, q_row, [&](int r) -> const std::string& { return responses[r].dq(); },
      dq->mutable_data());
  if (s.ok()) {
    s = Gather(
        plan, p.batch, kv_row, [&](int r) -> const std::string& { return responses[r].dk(); },
        dk->mutable_data());
  }
  if (s.ok()) {
    s = Gather(
        plan, p.batch, kv_row, [&](int r) -> const std::string& { return responses[r].dv(); },
        dv->mutable_data());
  }
  if (!s.ok()) return s;
  AddWorkerTimings(
      plan, [&](int r) -> const v1::WorkerTiming& { return responses[r].timing(); },
      response->mutable_timings());
  *response->mutable_plan() = ShardPlanToProto(plan);
  response->mutable_timings()->set_gather_seconds(SecondsSince(gather0));
  return absl::OkStatus();
}

}  // namespace ringattn
