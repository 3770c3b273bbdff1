#include "server/request_runner.h"

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "base/shared_memory.h"
#include "base/status_macros.h"
#include "base/trace_context.h"
#include "proto/convert.h"
#include "ring/layout.h"

namespace ringattn {

namespace {

using google::protobuf::Message;

double SecondsSince(absl::Time t0) { return absl::ToDoubleSeconds(absl::Now() - t0); }

// The most telling status of a failed ring: the caller's own cancellation or deadline first,
// then a worker's error (the first by rank; others are usually its echoes).
absl::Status RingFailure(const std::vector<grpc::Status>& statuses, const RingSnapshot& ring,
                         const RunControl& control) {
  const absl::Status cancelled =
      control.cancellation != nullptr ? control.cancellation->reason() : absl::OkStatus();
  if (absl::IsCancelled(cancelled)) {
    return absl::CancelledError("the client cancelled the request; workers stopped");
  }
  if (absl::IsDeadlineExceeded(cancelled) || absl::Now() >= control.deadline) {
    return absl::DeadlineExceededError("deadline exceeded while the ring was computing");
  }
  if (!cancelled.ok()) return cancelled;  // stopped for another reason (a member stopped answering)
  for (size_t r = 0; r < statuses.size(); ++r) {
    const grpc::Status& s = statuses[r];
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

// Sizes `whole` to [view.outer, plan.seqlen, view.row_bytes] and writes every rank's shard
// (`shard_of(rank)`) into its rows. INTERNAL naming the rank when a shard has the wrong size.
absl::Status Gather(const ShardPlan& plan, const RowView& view,
                    const std::function<const std::string&(int)>& shard_of, std::string* whole) {
  whole->resize(static_cast<size_t>(view.outer) * plan.seqlen * view.row_bytes);
  // Each rank's rows land in disjoint bytes of *whole (resized above, not again).
  std::vector<absl::Status> statuses(plan.world);
  ForEachRankInParallel(plan.world, [&](int r) {
    statuses[r] = InsertShardBytes(plan, r, shard_of(r), view.outer, view.row_bytes, whole);
  });
  for (int r = 0; r < plan.world; ++r) {
    if (!statuses[r].ok()) {
      return absl::InternalError(absl::StrCat("worker rank ", r, ": ", statuses[r].message()));
    }
  }
  return absl::OkStatus();
}

// The fields every shard request of `problem` shares.
v1::ShardHeader ShardHeaderOf(const RingSnapshot& ring, const ValidatedAttend& problem,
                              Layout layout) {
  v1::ShardHeader h;
  h.set_generation(ring.generation);
  h.set_request_id(problem.request_id);
  *h.mutable_shape() = ShapeToProto(problem.shape);
  h.set_layout(LayoutToProto(layout));
  *h.mutable_options() = OptionsToProto(problem.options);
  return h;
}

// Whether rank r's worker maps the request's shared memory itself: it is on this host.
bool WorkerMapsSharedMemory(const RingSnapshot& ring, int r) {
  static const std::string* const kThisHost = new std::string(HostId());
  return ring.members[r]->host_id == *kThisHost;
}

void AddShardShm(const std::string& name, const SharedTensor& t, v1::ShardHeader* h) {
  v1::ShardShm& s = (*h->mutable_shm())[name];
  if (t.mapping != nullptr) {
    s.set_key(t.mapping->key());
  } else {
    s.set_cuda_handle(t.cuda->handle);
  }
  s.set_offset(t.object_offset());
  s.set_byte_size(t.bytes);
}

// FAILED_PRECONDITION naming the tensor when one in CUDA memory has a rank that cannot reach
// it: only GPU workers on this host open a client's allocation.
absl::Status CheckCudaReachable(const SharedTensors& shared, const RingSnapshot& ring) {
  for (const auto& [name, t] : shared) {
    if (t.cuda == nullptr) continue;
    for (size_t r = 0; r < ring.members.size(); ++r) {
      const WorkerRecord& w = *ring.members[r];
      if (!WorkerMapsSharedMemory(ring, static_cast<int>(r)) || w.transport != "nccl") {
        return absl::FailedPreconditionError(absl::StrCat(
            name, " is in CUDA shared memory, which only GPU workers on the service's host can "
            "reach; rank ", r, "'s worker (", w.backend, " on ", w.device, ") ",
            WorkerMapsSharedMemory(ring, static_cast<int>(r)) ? "has no GPU"
                                                              : "is on another host"));
      }
    }
  }
  return absl::OkStatus();
}

// Places the tensors of `request` that are not in the client's shared memory into `arena` for
// the workers on this host: inputs copied in, wanted outputs given room. Adds them to
// `reachable`; `arena_outputs` lists the outputs to copy back into the response.
absl::Status PlaceInArena(const ComputeRpc& rpc, const ValidatedAttend& p, const Message& request,
                          SharedMemoryArena& arena, SharedTensors* reachable,
                          std::vector<const ComputeTensor*>* arena_outputs) {
  RA_ASSIGN_OR_RETURN(SharedTensors laid, LayOutInArena(rpc, p.shape, request, *reachable, arena));
  for (const ComputeTensor& in : rpc.inputs) {
    auto it = laid.find(in.name);
    if (it == laid.end()) continue;
    RA_RETURN_IF_ERROR(ParallelCopy(it->second.data(), TensorField(request, in.name).data().data(),
                                    it->second.bytes, "the coordinator's arena"));
  }
  for (const ComputeTensor& out : rpc.outputs) {
    if (laid.count(out.name) > 0) arena_outputs->push_back(&out);
  }
  reachable->merge(laid);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SharedTensors> LayOutInArena(const ComputeRpc& rpc, const AttentionShape& shape,
                                            const Message& request, const SharedTensors& placed,
                                            SharedMemoryArena& arena) {
  std::vector<std::pair<const ComputeTensor*, int64_t>> slots;  // tensor, offset
  int64_t total = 0;
  auto take = [&](const ComputeTensor& t) {
    if (placed.count(t.name) > 0) return;
    slots.emplace_back(&t, total);
    total += (static_cast<int64_t>(BytesOf(t.kind, shape)) + 255) / 256 * 256;
  };
  for (const ComputeTensor& in : rpc.inputs) take(in);
  for (const ComputeTensor& out : rpc.outputs) {
    if (Wants(request, out)) take(out);
  }
  SharedTensors laid;
  if (slots.empty()) return laid;
  RA_ASSIGN_OR_RETURN(std::shared_ptr<SharedMemoryMapping> mapping, arena.Reserve(total));
  for (const auto& [t, at] : slots) {
    laid.emplace(t->name,
                 SharedTensor{mapping, nullptr, at, static_cast<int64_t>(BytesOf(t->kind, shape))});
  }
  return laid;
}

absl::Status RunOnRing(const ComputeRpc& rpc, const ValidatedAttend& p, const Message& request,
                       const SharedTensors& client_shared, SharedMemoryArena* arena,
                       const RingSnapshot& ring, const RunControl& control, Message* response,
                       v1::ShardPlan* plan_proto, v1::Timings* timings) {
  // Scatter: the plan, then each rank's rows of every input, in layout order. Inputs in shared
  // memory go as references to workers on this host, as bytes read from it to the others.
  const absl::Time scatter0 = absl::Now();
  const int world = static_cast<int>(ring.members.size());
  const Layout layout = p.ResolvedLayout();
  absl::StatusOr<ShardPlan> plan_or = PlanShards(p.shape.seqlen_q, world, layout);
  if (!plan_or.ok()) return plan_or.status();
  const ShardPlan& plan = *plan_or;

  // What the workers on this host reach through shared memory: the client's tensors, and with
  // an arena every other tensor of the request too.
  SharedTensors shared = client_shared;
  std::vector<const ComputeTensor*> arena_outputs;
  bool any_worker_maps = false;
  for (int r = 0; r < world; ++r) any_worker_maps |= WorkerMapsSharedMemory(ring, r);
  if (arena != nullptr && any_worker_maps) {
    RA_RETURN_IF_ERROR(PlaceInArena(rpc, p, request, *arena, &shared, &arena_outputs));
  }

  // A region replaced or shrunk since it was registered fails this request only, before any
  // worker starts (a worker failing on it would break the ring for everyone).
  RA_RETURN_IF_ERROR(CheckCudaReachable(shared, ring));
  for (const auto& [name, t] : shared) {
    if (t.mapping != nullptr && !t.mapping->StillCurrent()) {
      return absl::FailedPreconditionError(absl::StrCat(
          name, ": the shared-memory object '", t.mapping->key(),
          "' shrank, vanished or was replaced since it was registered; register it again"));
    }
  }

  const v1::ShardHeader header = ShardHeaderOf(ring, p, layout);
  std::vector<std::unique_ptr<Message>> requests(world);
  std::vector<std::unique_ptr<Message>> responses(world);
  std::vector<absl::Status> scattered(world);
  ForEachRankInParallel(world, [&](int r) {
    requests[r].reset(rpc.shard_request->New());
    responses[r].reset(rpc.shard_response->New());
    Message* req = requests[r].get();
    v1::ShardHeader* h = MutableShardHeader(req);
    *h = header;
    const bool worker_maps = !shared.empty() && WorkerMapsSharedMemory(ring, r);
    for (const ComputeTensor& out : rpc.outputs) {
      if (out.wanted_if != nullptr) SetBoolField(req, out.wanted_if, Wants(request, out));
      auto placed = shared.find(out.name);
      if (worker_maps && placed != shared.end()) AddShardShm(out.name, placed->second, h);
    }
    for (const ComputeTensor& in : rpc.inputs) {
      const RowView view = RowsOf(in.kind, p.shape);
      auto placed = shared.find(in.name);
      if (placed == shared.end()) {
        SetBytesField(req, in.name,
                      ExtractShardBytes(plan, r, TensorField(request, in.name).data(), view.outer,
                                        view.row_bytes));
      } else if (worker_maps) {
        AddShardShm(in.name, placed->second, h);
      } else {
        std::string bytes(view.outer * plan.shards[r].rows * view.row_bytes, '\0');
        const absl::Status s = GuardedAccess(absl::StrCat(in.name, ".shm"), [&] {
          ExtractShard(plan, r, placed->second.data(), view.outer, view.row_bytes, bytes.data());
        });
        if (!s.ok()) {
          scattered[r] = s;
          return;
        }
        SetBytesField(req, in.name, std::move(bytes));
      }
    }
  });
  for (const absl::Status& s : scattered) RA_RETURN_IF_ERROR(s);
  const absl::Time workers0 = absl::Now();
  timings->set_scatter_seconds(absl::ToDoubleSeconds(workers0 - scatter0));

  // The call's turn on the ring: every rank runs the ring passes in this order, so the next
  // request's inputs can be staged while this one computes. Taken only now that every call
  // will be issued (a turn that never reaches a rank would stall the ones after it).
  const int64_t sequence = ring.turns != nullptr ? ring.turns->Take() : 0;
  absl::Cleanup finish_turn = [&ring, sequence] {
    if (ring.turns != nullptr) ring.turns->Finish(sequence);
  };
  for (int r = 0; r < world; ++r) MutableShardHeader(requests[r].get())->set_sequence(sequence);

  // Every rank at once: the ranks must all be in the ring together. The first failure, or the
  // request's cancellation, cancels every call, so that no worker keeps computing for nobody.
  if (control.workers_called != nullptr) *control.workers_called = true;
  if (control.fanning_out) control.fanning_out();
  FanOutOptions fan_out;
  fan_out.deadline = control.deadline;
  fan_out.cancel_all_on_failure = true;
  fan_out.cancellation = control.cancellation;
  std::vector<double> call_seconds(world, 0.0);  // each rank's own RPC, issue to response
  const std::vector<grpc::Status> statuses = FanOut(
      world, fan_out, [&](int r, grpc::ClientContext* ctx, std::function<void(grpc::Status)> done) {
        const absl::Time call0 = absl::Now();
        if (!control.traceparent.empty()) ctx->AddMetadata(kTraceparentKey, control.traceparent);
        rpc.call(ring.members[r]->stub.get(), ctx, *requests[r], responses[r].get(),
                 [&call_seconds, r, call0, done = std::move(done)](grpc::Status s) {
                   call_seconds[r] = SecondsSince(call0);
                   done(std::move(s));
                 });
      });
  const absl::Time gather0 = absl::Now();
  timings->set_workers_seconds(absl::ToDoubleSeconds(gather0 - workers0));
  for (const grpc::Status& s : statuses) {
    if (s.ok()) continue;
    const absl::Status failure = RingFailure(statuses, ring, control);
    if (control.ring_intact != nullptr && ring.turns != nullptr &&
        (absl::IsCancelled(failure) || absl::IsDeadlineExceeded(failure))) {
      *control.ring_intact = ring.turns->EarlierRunning(sequence);
    }
    return failure;
  }

  // Gather: each rank's rows of every wanted output back into sequence order, into the
  // response or into the caller's shared memory (where workers on this host wrote theirs).
  for (const ComputeTensor& out : rpc.outputs) {
    if (!Wants(request, out)) continue;
    v1::Tensor* t = MutableTensorField(response, out.name);
    t->set_dtype(DTypeOf(out.kind, p.shape));
    for (int64_t d : DimsOf(out.kind, p.shape)) t->add_shape(d);
    const RowView view = RowsOf(out.kind, p.shape);
    auto placed = shared.find(out.name);
    if (placed == shared.end()) {
      RA_RETURN_IF_ERROR(Gather(
          plan, view,
          [&](int r) -> const std::string& { return BytesField(*responses[r], out.name); },
          t->mutable_data()));
      continue;
    }
    for (int r = 0; r < world; ++r) {
      const std::string& bytes = BytesField(*responses[r], out.name);
      const size_t want = view.outer * plan.shards[r].rows * view.row_bytes;
      if (WorkerMapsSharedMemory(ring, r)) {
        if (!bytes.empty()) {
          return absl::InternalError(absl::StrCat("worker rank ", r, " sent ", out.name,
                                                  " bytes instead of writing shared memory"));
        }
        continue;
      }
      if (bytes.size() != want) {
        return absl::InternalError(absl::StrCat("worker rank ", r, ": ", out.name, " has ",
                                                bytes.size(), " bytes, expected ", want));
      }
      RA_RETURN_IF_ERROR(GuardedAccess(absl::StrCat("output_shm['", out.name, "']"), [&] {
        InsertShard(plan, r, bytes.data(), view.outer, view.row_bytes, placed->second.data());
      }));
    }
  }
  for (const ComputeTensor* out : arena_outputs) {
    const SharedTensor& st = shared.at(out->name);
    std::string* data = MutableTensorField(response, out->name)->mutable_data();
    data->resize(st.bytes);
    RA_RETURN_IF_ERROR(ParallelCopy(data->data(), st.data(), st.bytes, "the coordinator's arena"));
  }
  for (int r = 0; r < world; ++r) {
    v1::WorkerTiming* wt = timings->add_workers();
    *wt = ShardTiming(*responses[r]);
    wt->set_rank(r);
    wt->set_rows(plan.shards[r].rows);
    wt->set_call_seconds(call_seconds[r]);
  }
  *plan_proto = ShardPlanToProto(plan);
  timings->set_gather_seconds(SecondsSince(gather0));
  return absl::OkStatus();
}

}  // namespace ringattn
