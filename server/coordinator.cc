#include "server/coordinator.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "ringattn_config.h"
#include "proto/chunk_codec.h"
#include "proto/compute_rpcs.h"
#include "proto/convert.h"
#include "proto/trace_metadata.h"
#include "ringattn/v1/attention.grpc.pb.h"
#include "ringattn/v1/worker.grpc.pb.h"
#include "ringattn_version.h"
#include "server/request_log.h"
#include "server/request_runner.h"

namespace ringattn {
namespace {

constexpr char kServiceName[] = "ringattn.v1.AttentionService";
constexpr char kComponent[] = "coordinator";

// The request's id: the client's, or one made from its arrival.
std::string RequestIdOf(const std::string& sent, absl::Time arrival) {
  return sent.empty() ? absl::StrCat("req-", absl::ToUnixMicros(arrival)) : sent;
}

// A port in use is an error, not shared: gRPC sets SO_REUSEPORT unless told not to, and a
// second server on the port would then take half of the connections.
void RefuseSharedPorts(grpc::ServerBuilder* builder) {
  builder->AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
}

double SecondsSince(absl::Time t0) { return absl::ToDoubleSeconds(absl::Now() - t0); }

absl::Time DeadlineOf(const grpc::ServerContextBase& ctx) {
  const auto d = ctx.deadline();
  if (d == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(d);
}

// Why gRPC cancelled a call: its deadline passed, or the client went away. The client's deadline
// timer fires before the server's by the request's transit (the server counts the timeout from
// the arrival): a cancel within 100 ms of the deadline is the deadline's, also on a loaded host.
absl::Status CancelReason(const grpc::CallbackServerContext& ctx) {
  if (DeadlineOf(ctx) <= absl::Now() + absl::Milliseconds(100)) {
    return absl::DeadlineExceededError("deadline exceeded");
  }
  return absl::CancelledError("the client cancelled the request");
}

// Who is calling, for keying what a caller owns (its shared-memory regions): the authenticated
// peer identity when the channel has one, else the peer's address without its port.
std::string CallerIdentity(const grpc::ServerContextBase& ctx) {
  const std::shared_ptr<const grpc::AuthContext> auth = ctx.auth_context();
  if (auth != nullptr && auth->IsPeerAuthenticated()) {
    std::string id;
    for (const grpc::string_ref& part : auth->GetPeerIdentity()) {
      absl::StrAppend(&id, id.empty() ? "" : ",", std::string(part.data(), part.size()));
    }
    return absl::StrCat("auth:", id);
  }
  std::string peer = ctx.peer();  // "ipv4:127.0.0.1:5432", "ipv6:[::1]:5432", "unix:/path"
  if (absl::StartsWith(peer, "ipv4:") || absl::StartsWith(peer, "ipv6:")) {
    const size_t colon = peer.rfind(':');
    if (colon != std::string::npos && colon > 5) peer.resize(colon);
  }
  return absl::StrCat("peer:", peer);
}

// The internal plane's credential: the configured secret or a generated one, with TLS when
// its files are given.
absl::StatusOr<ClusterSecret> InternalCredentials(const Coordinator::Options& o) {
  absl::StatusOr<ClusterSecret> secret = o.cluster_secret.empty()
                                             ? ClusterSecret::Generate()
                                             : ClusterSecret::FromString(o.cluster_secret);
  if (!secret.ok()) return secret.status();
  const TlsFiles& tls = o.internal_tls;
  if (tls.cert.empty() && tls.key.empty() && tls.ca.empty()) return secret;
  return secret->WithTls(tls);
}

// Shared memory is for callers on this host: loopback addresses and Unix sockets.
bool IsLocalCaller(const grpc::ServerContextBase& ctx) {
  const std::string peer = ctx.peer();
  return absl::StartsWith(peer, "ipv4:127.") || absl::StartsWith(peer, "ipv6:[::1]") ||
         absl::StartsWith(peer, "ipv6:%5B::1%5D") || absl::StartsWith(peer, "unix:");
}

// Finishes a unary callback call with `s` at once.
grpc::ServerUnaryReactor* FinishNow(grpc::CallbackServerContext* ctx, const absl::Status& s) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

// The `rpc` labels of the request metrics: every compute RPC and its stream.
std::vector<std::string> RpcLabels() {
  std::vector<std::string> labels;
  for (const ComputeRpc* rpc : ComputeRpcs()) {
    labels.emplace_back(rpc->name);
    labels.push_back(absl::StrCat(std::string(rpc->name), "Stream"));
  }
  return labels;
}

// The message types of a compute RPC and its stream.
template <typename Req, typename Resp, typename StreamReq, typename StreamResp>
struct CallMessages {
  using Request = Req;
  using Response = Resp;
  using StreamRequest = StreamReq;
  using StreamResponse = StreamResp;
};

// The compute RPCs as the coordinator serves them: messages, table, and the checks of a whole
// request and of a stream's header.
struct AttendCall : CallMessages<v1::AttendRequest, v1::AttendResponse, v1::AttendStreamRequest,
                                 v1::AttendStreamResponse> {
  static const ComputeRpc& Rpc() { return AttendRpc(); }
  static constexpr double kForwardMultiple = 1.0;  // its FLOPs in forwards (RequestWork)
  static constexpr auto Validate = ValidateAttendRequest;
  static constexpr auto ValidateHeader = ValidateAttendHeader;
};

struct AttendBackwardCall
    : CallMessages<v1::AttendBackwardRequest, v1::AttendBackwardResponse,
                   v1::AttendBackwardStreamRequest, v1::AttendBackwardStreamResponse> {
  static const ComputeRpc& Rpc() { return AttendBackwardRpc(); }
  static constexpr double kForwardMultiple = 2.5;  // FlashAttention's count
  static constexpr auto Validate = ValidateAttendBackwardRequest;
  static constexpr auto ValidateHeader = ValidateAttendBackwardHeader;
};

}  // namespace

// A unary compute call: submitted on arrival, finished when its job is done.
template <typename Call>
class Coordinator::UnaryCall final : public grpc::ServerUnaryReactor {
 public:
  UnaryCall(Coordinator* c, grpc::CallbackServerContext* ctx, const typename Call::Request* request,
            typename Call::Response* response)
      : c_(c),
        ctx_(ctx),
        request_(request),
        response_(response),
        arrival_(absl::Now()),
        trace_(SpanOfCall(*ctx)),
        request_id_(RequestIdOf(request->request_id(), arrival_)) {
    const absl::Time arrival = arrival_;
    absl::StatusOr<std::string> caller = c_->Caller(*ctx_);
    client_ = caller.ok() ? *caller : CallerIdentity(*ctx_);
    if (!caller.ok()) {
      End(caller.status());
      return;
    }
    // The request's bytes count against admission until this call ends.
    absl::StatusOr<std::unique_ptr<AdmissionQueue::Hold>> hold =
        c_->queue_.HoldBytes(*caller, TensorDataBytes(*request_, Call::Rpc().inputs));
    if (!hold.ok()) {
      End(hold.status());
      return;
    }
    hold_ = *std::move(hold);
    absl::StatusOr<std::shared_ptr<AttendJob>> job =
        c_->Submit<Call>(*request_, response_, *caller, arrival, DeadlineOf(*ctx_), &work_, trace_,
                         [this](absl::Status s) { End(s); });
    if (job.ok()) {
      job_ = *std::move(job);
    } else {
      End(job.status());
    }
  }

  void OnCancel() override {
    if (job_ != nullptr) c_->Cancel(job_, CancelReason(*ctx_));
  }
  void OnDone() override { delete this; }

 private:
  // Unary: gRPC serialises and sends the response after Finish, so the timings cannot include
  // it; send_seconds stays 0 (the streams measure their chunks).
  void End(const absl::Status& s) {
    const ComputeRpc& rpc = Call::Rpc();
    const int64_t bytes_in = TensorDataBytes(*request_, rpc.inputs);
    const int64_t bytes_out = s.ok() ? TensorDataBytes(*response_, rpc.outputs) : 0;
    c_->metrics_.RecordRequest(rpc.name, ToGrpcStatus(s).error_code(), response_->timings(),
                               bytes_in, bytes_out, work_);
    LogRequest({std::string(rpc.name), request_id_, client_, &trace_, s,
                &TensorField(*request_, "q"), &TensorField(*request_, "k"), &response_->timings(),
                SecondsSince(arrival_), bytes_in, bytes_out});
    Finish(ToGrpcStatus(s));
  }

  Coordinator* const c_;
  grpc::CallbackServerContext* const ctx_;
  const typename Call::Request* const request_;
  typename Call::Response* const response_;
  RequestWork work_;  // set by Submit before the job is queued
  const absl::Time arrival_;
  const TraceContext trace_;      // this call's span, passed on to the worker calls
  const std::string request_id_;  // for the log; Submit makes the same one
  std::string client_;            // the caller's identity, for the log
  std::unique_ptr<AdmissionQueue::Hold> hold_;
  std::shared_ptr<AttendJob> job_;  // set before OnCancel can run
};

// A streaming compute call: the request's header and chunks are read and assembled (the chunk
// protocol's breaches are INVALID_ARGUMENT), the job submitted, then the response's header and
// its outputs' chunks written.
template <typename Call>
class Coordinator::StreamCall final
    : public grpc::ServerBidiReactor<typename Call::StreamRequest, typename Call::StreamResponse> {
 public:
  StreamCall(Coordinator* c, grpc::CallbackServerContext* ctx)
      : c_(c),
        ctx_(ctx),
        arrival_(absl::Now()),
        stream_name_(absl::StrCat(std::string(Call::Rpc().name), "Stream")),
        receiver_(absl::StrCat(stream_name_, " request"), absl::StatusCode::kInvalidArgument),
        caller_(c->Caller(*ctx)),
        trace_(SpanOfCall(*ctx)),
        watch_(c->WatchStream(ctx)) {
    if (!caller_.ok()) {
      End(caller_.status());  // before any read: the call ends unread
      return;
    }
    this->StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    Touch(/*server_busy=*/false);
    if (ok) {
      absl::Status s =
          receiver_.Add(&in_, [this](typename Call::Request* h) { return ExpectInputs(h); });
      if (!s.ok()) return End(s);
      this->StartRead(&in_);
      return;
    }
    // The client is done sending, or gone.
    if (absl::Status why = cancel_reason(); !why.ok()) return End(why);
    if (absl::Status s = receiver_.Finish(); !s.ok()) return End(s);
    receive_seconds_ = SecondsSince(arrival_);
    Touch(/*server_busy=*/true);  // until Respond: the job's time, not the client's
    absl::StatusOr<std::shared_ptr<AttendJob>> job =
        c_->Submit<Call>(*receiver_.header(), &response_, *caller_, arrival_, DeadlineOf(*ctx_),
                         &work_, trace_, [this](absl::Status s) { Respond(s); }, landed_);
    if (!job.ok()) return End(job.status());
    absl::Status cancelled;
    {
      absl::MutexLock lock(&mu_);
      job_ = *job;
      cancelled = cancel_reason_;
    }
    if (!cancelled.ok()) c_->Cancel(*job, cancelled);  // cancelled while it was being queued
  }

  void OnWriteDone(bool ok) override {
    Touch(/*server_busy=*/false);
    if (!ok) return End(absl::CancelledError("client went away"));
    out_.Clear();
    if (cursor_->Next(out_.mutable_chunk())) {
      this->StartWrite(&out_);
      return;
    }
    response_.mutable_timings()->set_send_seconds(SecondsSince(send0_));
    response_.mutable_timings()->set_total_seconds(SecondsSince(arrival_));
    End(absl::OkStatus());
  }

  void OnCancel() override {
    const absl::Status reason = CancelReason(*ctx_);
    std::shared_ptr<AttendJob> job;
    {
      absl::MutexLock lock(&mu_);
      cancel_reason_ = reason;
      job = job_;
    }
    if (job != nullptr) c_->Cancel(job, reason);
  }
  void OnDone() override {
    c_->UnwatchStream(watch_);
    delete this;
  }

 private:
  // The header's checks give the sizes of the inputs whose chunks follow, which count against
  // admission from now until the call ends.
  absl::Status ExpectInputs(typename Call::Request* header) {
    RA_ASSIGN_OR_RETURN(const ValidatedAttend problem, Call::ValidateHeader(*header, c_->Limits()));
    int64_t bytes = 0;
    for (const ComputeTensor& in : Call::Rpc().inputs) bytes += BytesOf(in.kind, problem.shape);
    RA_ASSIGN_OR_RETURN(hold_, c_->queue_.HoldBytes(*caller_, bytes));
    if (Land(*header, problem)) return absl::OkStatus();
    for (const ComputeTensor& in : Call::Rpc().inputs) {
      RA_RETURN_IF_ERROR(receiver_.chunks().Expect(
          in.which, in.name, MutableTensorField(header, in.name), BytesOf(in.kind, problem.shape)));
    }
    return absl::OkStatus();
  }

  // Lands the inputs' chunks in an arena of the coordinator's shared memory, with room for the
  // wanted outputs after them: the workers on this host read and write there, and the response's
  // chunks are cut from there, with no copy into and out of the messages. False (nothing done)
  // when no arena is free. (A stream header refers to no region: its validation refuses them.)
  bool Land(const typename Call::Request& header, const ValidatedAttend& problem) {
    const ComputeRpc& rpc = Call::Rpc();
    if (c_->landing_ == nullptr) return false;
    lease_ = c_->landing_->TryAcquire();
    if (lease_ == nullptr) return false;
    absl::StatusOr<SharedTensors> laid =
        LayOutInArena(rpc, problem.shape, header, SharedTensors(), lease_->arena());
    if (!laid.ok()) {  // /dev/shm full: the bytes stay in memory instead
      lease_.reset();
      return false;
    }
    landed_ = *std::move(laid);
    for (const ComputeTensor& in : rpc.inputs) {
      const SharedTensor& st = landed_.at(in.name);
      // Cannot fail: the header's tensors carry no data (checked by the header's validation).
      const absl::Status s = receiver_.chunks().ExpectInto(
          in.which, in.name, TensorField(header, in.name), st.data(), st.bytes);
      if (!s.ok()) {
        landed_.clear();
        lease_.reset();
        return false;
      }
    }
    return true;
  }

  // Bytes of the landed inputs (or outputs).
  int64_t LandedBytes(bool inputs) const {
    int64_t sum = 0;
    for (const ComputeTensor& t : inputs ? Call::Rpc().inputs : Call::Rpc().outputs) {
      auto it = landed_.find(t.name);
      if (it != landed_.end()) sum += it->second.bytes;
    }
    return sum;
  }

  // The job is done: its failure, or the response's header and then its outputs in chunks.
  void Respond(const absl::Status& s) {
    Touch(/*server_busy=*/false);
    if (!s.ok()) return End(s);
    response_.mutable_timings()->set_receive_seconds(receive_seconds_);
    send0_ = absl::Now();
    std::vector<ChunkCursor::Source> outputs;
    for (const ComputeTensor& t : Call::Rpc().outputs) {
      if (!HasTensorField(response_, t.name)) continue;
      auto landed = landed_.find(t.name);
      if (landed != landed_.end()) {
        outputs.push_back({t.which, std::string_view(landed->second.data(),
                                                      static_cast<size_t>(landed->second.bytes))});
      } else {
        outputs.push_back({t.which, TensorField(response_, t.name).data()});
      }
    }
    cursor_.emplace(std::move(outputs), c_->options_.stream_chunk_bytes);
    out_.Clear();
    *out_.mutable_header() = HeaderOf(response_);
    this->StartWrite(&out_);
  }

  void End(const absl::Status& s) {
    const ComputeRpc& rpc = Call::Rpc();
    const typename Call::Request& request = *receiver_.header();
    const int64_t bytes_in = TensorDataBytes(request, rpc.inputs) + LandedBytes(true);
    const int64_t bytes_out =
        s.ok() ? TensorDataBytes(response_, rpc.outputs) + LandedBytes(false) : 0;
    c_->metrics_.RecordRequest(stream_name_, ToGrpcStatus(s).error_code(), response_.timings(),
                               bytes_in, bytes_out, work_);
    LogRequest({stream_name_, RequestIdOf(request.request_id(), arrival_),
                caller_.ok() ? *caller_ : CallerIdentity(*ctx_), &trace_, s,
                &TensorField(request, "q"), &TensorField(request, "k"), &response_.timings(),
                SecondsSince(arrival_), bytes_in, bytes_out});
    this->Finish(ToGrpcStatus(s));
  }

  absl::Status cancel_reason() {
    absl::MutexLock lock(&mu_);
    return cancel_reason_;
  }

  void Touch(bool server_busy) {
    absl::MutexLock lock(&watch_->mu);
    watch_->last = absl::Now();
    watch_->server_busy = server_busy;
  }

  Coordinator* const c_;
  grpc::CallbackServerContext* const ctx_;
  const absl::Time arrival_;
  const std::string stream_name_;  // "AttendStream"
  RequestWork work_;                // set by Submit before the job is queued
  double receive_seconds_ = 0;
  absl::Time send0_;
  typename Call::StreamRequest in_;
  StreamAssembler<typename Call::StreamRequest> receiver_;  // the request, once assembled
  typename Call::Response response_;
  typename Call::StreamResponse out_;
  std::optional<ChunkCursor> cursor_;
  const absl::StatusOr<std::string> caller_;    // Coordinator::Caller
  const TraceContext trace_;                    // this call's span, passed on to the workers
  std::unique_ptr<AdmissionQueue::Hold> hold_;  // the request's bytes, once its header came
  // The landing arena and the tensors in it (Land), lent until the call is done.
  std::unique_ptr<ArenaPool::Lease> lease_;
  SharedTensors landed_;
  absl::Mutex mu_;  // OnCancel runs alongside the other reactions
  absl::Status cancel_reason_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<AttendJob> job_ ABSL_GUARDED_BY(mu_);
  const std::shared_ptr<StreamWatch> watch_;
};

class Coordinator::Services {
 public:
  explicit Services(Coordinator* c) : attention(c), coordinator(c) {}

  class Attention final : public v1::AttentionService::CallbackService {
   public:
    explicit Attention(Coordinator* c) : c_(c) {}

    grpc::ServerUnaryReactor* Attend(grpc::CallbackServerContext* ctx,
                                     const v1::AttendRequest* request,
                                     v1::AttendResponse* response) override {
      return new UnaryCall<AttendCall>(c_, ctx, request, response);
    }

    grpc::ServerBidiReactor<v1::AttendStreamRequest, v1::AttendStreamResponse>* AttendStream(
        grpc::CallbackServerContext* ctx) override {
      return new StreamCall<AttendCall>(c_, ctx);
    }

    grpc::ServerUnaryReactor* AttendBackward(grpc::CallbackServerContext* ctx,
                                             const v1::AttendBackwardRequest* request,
                                             v1::AttendBackwardResponse* response) override {
      return new UnaryCall<AttendBackwardCall>(c_, ctx, request, response);
    }

    grpc::ServerBidiReactor<v1::AttendBackwardStreamRequest, v1::AttendBackwardStreamResponse>*
    AttendBackwardStream(grpc::CallbackServerContext* ctx) override {
      return new StreamCall<AttendBackwardCall>(c_, ctx);
    }

    grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* ctx, const v1::InfoRequest*,
                                      v1::InfoResponse* response) override {
      if (absl::StatusOr<std::string> caller = c_->Caller(*ctx); !caller.ok()) {
        return FinishNow(ctx, caller.status());
      }
      c_->FillInfo(response);
      return FinishNow(ctx, absl::OkStatus());
    }

    grpc::ServerUnaryReactor* RegisterSystemSharedMemory(
        grpc::CallbackServerContext* ctx, const v1::RegisterSystemSharedMemoryRequest* request,
        v1::RegisterSystemSharedMemoryResponse*) override {
      absl::StatusOr<std::string> caller = c_->Caller(*ctx);
      if (!caller.ok()) return FinishNow(ctx, caller.status());
      if (!c_->options_.shared_memory) {
        return FinishNow(ctx, absl::FailedPreconditionError(
                                  "this service has system shared memory disabled"));
      }
      if (!IsLocalCaller(*ctx)) {
        return FinishNow(ctx, absl::PermissionDeniedError(absl::StrCat(
                                  "system shared memory is for callers on the service's host; ",
                                  "this call came from ", ctx->peer())));
      }
      return FinishNow(ctx, c_->shared_memory_.Register(*caller, *request));
    }

    grpc::ServerUnaryReactor* UnregisterSystemSharedMemory(
        grpc::CallbackServerContext* ctx, const v1::UnregisterSystemSharedMemoryRequest* request,
        v1::UnregisterSystemSharedMemoryResponse*) override {
      absl::StatusOr<std::string> caller = c_->Caller(*ctx);
      if (!caller.ok()) return FinishNow(ctx, caller.status());
      return FinishNow(ctx, c_->shared_memory_.Unregister(*caller, request->name()));
    }

    grpc::ServerUnaryReactor* RegisterCudaSharedMemory(
        grpc::CallbackServerContext* ctx, const v1::RegisterCudaSharedMemoryRequest* request,
        v1::RegisterCudaSharedMemoryResponse*) override {
      if (!c_->options_.shared_memory) {
        return FinishNow(ctx, absl::FailedPreconditionError(
                                  "this service has shared memory disabled"));
      }
      if (!IsLocalCaller(*ctx)) {
        return FinishNow(ctx, absl::PermissionDeniedError(absl::StrCat(
                                  "CUDA shared memory is for callers on the service's host; ",
                                  "this call came from ", ctx->peer())));
      }
      return FinishNow(ctx, c_->shared_memory_.Register(CallerIdentity(*ctx), *request));
    }

    grpc::ServerUnaryReactor* UnregisterCudaSharedMemory(
        grpc::CallbackServerContext* ctx, const v1::UnregisterCudaSharedMemoryRequest* request,
        v1::UnregisterCudaSharedMemoryResponse*) override {
      return FinishNow(ctx, c_->shared_memory_.Unregister(CallerIdentity(*ctx), request->name(),
                                                          SharedMemoryRegistry::Kind::kCuda));
    }

    grpc::ServerUnaryReactor* CudaSharedMemoryStatus(
        grpc::CallbackServerContext* ctx, const v1::CudaSharedMemoryStatusRequest* request,
        v1::CudaSharedMemoryStatusResponse* response) override {
      absl::StatusOr<std::vector<v1::CudaSharedMemoryRegion>> regions =
          c_->shared_memory_.ListCuda(CallerIdentity(*ctx), request->name());
      if (regions.ok()) {
        for (v1::CudaSharedMemoryRegion& r : *regions) *response->add_regions() = std::move(r);
      }
      return FinishNow(ctx, regions.status());
    }

    grpc::ServerUnaryReactor* SystemSharedMemoryStatus(
        grpc::CallbackServerContext* ctx, const v1::SystemSharedMemoryStatusRequest* request,
        v1::SystemSharedMemoryStatusResponse* response) override {
      absl::StatusOr<std::string> caller = c_->Caller(*ctx);
      if (!caller.ok()) return FinishNow(ctx, caller.status());
      absl::StatusOr<std::vector<v1::SystemSharedMemoryRegion>> regions =
          c_->shared_memory_.List(*caller, request->name());
      if (regions.ok()) {
        for (v1::SystemSharedMemoryRegion& r : *regions) *response->add_regions() = std::move(r);
      }
      return FinishNow(ctx, regions.status());
    }

   private:
    Coordinator* c_;
  };

  class Internal final : public v1::CoordinatorService::Service {
   public:
    explicit Internal(Coordinator* c) : c_(c) {}

    grpc::Status Register(grpc::ServerContext* ctx, const v1::RegisterRequest* request,
                          v1::RegisterResponse* response) override {
      if (absl::Status s = c_->CheckInternal(*ctx); !s.ok()) return ToGrpcStatus(s);
      if (request->address().empty()) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "address must be host:port");
      }
      response->set_worker_id(c_->ring_->Register(*request));
      LogInfo(kComponent,
              absl::StrCat("worker ", response->worker_id(), " registered at ", request->address(),
                           " (", request->backend(), ", ", request->device(), ")"),
              {{"worker_id", response->worker_id()}, {"worker", request->address()}});
      return grpc::Status::OK;
    }

    grpc::Status StoreSet(grpc::ServerContext* ctx, const v1::StoreSetRequest* request,
                          v1::StoreSetResponse*) override {
      if (absl::Status s = c_->CheckInternal(*ctx); !s.ok()) return ToGrpcStatus(s);
      return ToGrpcStatus(c_->store_.Set(request->key(), request->value()));
    }

    grpc::Status StoreGet(grpc::ServerContext* ctx, const v1::StoreGetRequest* request,
                          v1::StoreGetResponse* response) override {
      if (absl::Status s = c_->CheckInternal(*ctx); !s.ok()) return ToGrpcStatus(s);
      std::vector<std::string> keys(request->keys().begin(), request->keys().end());
      // Bounded by the ring's join timeout even when the caller set no deadline, and freed as
      // soon as the caller goes away.
      const absl::Time deadline =
          std::min(DeadlineOf(*ctx), absl::Now() + c_->options_.ring.join_timeout);
      absl::StatusOr<std::vector<std::string>> values =
          c_->store_.Get(keys, deadline, [ctx] { return ctx->IsCancelled(); });
      if (!values.ok()) return ToGrpcStatus(values.status());
      for (std::string& v : *values) response->add_values(std::move(v));
      return grpc::Status::OK;
    }

   private:
    Coordinator* c_;
  };

  Attention attention;
  Internal coordinator;
};

Coordinator::Coordinator(Options options)
    : options_(std::move(options)),
      shared_memory_(options_.shared_memory_limits),
      metrics_(RpcLabels(), ServiceMetrics::Limits{options_.world_size,
                                                   static_cast<int64_t>(options_.max_queue),
                                                   options_.max_queued_bytes,
                                                   std::max(1, options_.pipeline_depth)}),
      secret_(InternalCredentials(options_)),
      ring_(std::make_unique<RingManager>(
          [&] {
            RingManager::Options r = options_.ring;
            r.expected_workers = options_.world_size;
            if (secret_.ok()) r.secret = *secret_;
            r.on_ring_broken = [this](int64_t generation, const std::string& why) {
              OnRingBroken(generation, why);
            };
            return r;
          }(),
          &store_, &metrics_)),
      queue_(AdmissionQueue::Limits{options_.max_queue, options_.max_queued_bytes,
                                    options_.max_client_share}),
      services_(std::make_unique<Services>(this)) {}

Coordinator::~Coordinator() {
  Shutdown();
  metrics_.StopExposer();  // its samplers read the queue and the ring, about to go
}

absl::Status Coordinator::BuildAndStart() {
  if (options_.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("world_size must be >= 1, got ", options_.world_size));
  }
  metrics_.SampleLoad([this] {
    const AdmissionState a = admission();
    return ServiceMetrics::Load{static_cast<int64_t>(a.queued),
                                static_cast<int64_t>(a.running_count), a.held_bytes,
                                ring_->WaitUntilReady(absl::ZeroDuration())};
  });
  if (!options_.metrics_address.empty()) {
    absl::Status s = metrics_.StartExposer(options_.metrics_address);
    if (!s.ok()) return s;
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  if (!secret_.ok()) return secret_.status();
  std::shared_ptr<grpc::ServerCredentials> public_credentials = grpc::InsecureServerCredentials();
  if (!options_.tls.cert.empty() || !options_.tls.key.empty() || !options_.tls.ca.empty()) {
    if (options_.tls.cert.empty()) {
      return absl::InvalidArgumentError("--tls_key and --tls_client_ca need --tls_cert");
    }
    RA_ASSIGN_OR_RETURN(const TlsPem pem, ReadTlsFiles(options_.tls, "--tls"));
    public_credentials = TlsServerCredentials(pem);
  }
  if (!options_.api_tokens_file.empty()) {
    RA_ASSIGN_OR_RETURN(tokens_, ApiTokens::FromFile(options_.api_tokens_file));
  }
  grpc::ServerBuilder internal;
  internal.AddListeningPort(options_.internal_listen_address, secret_->ServerCredentials(),
                            &internal_port_);
  internal.RegisterService(&services_->coordinator);
  internal.SetMaxReceiveMessageSize(4 << 20);  // registrations and rendezvous values
  // A thread per call in flight on this synchronous service, bounded.
  grpc::ResourceQuota quota("ringattn-internal");
  quota.SetMaxThreads(64);
  internal.SetResourceQuota(quota);
  RefuseSharedPorts(&internal);
  internal_server_ = internal.BuildAndStart();
  if (internal_server_ == nullptr || internal_port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options_.internal_listen_address,
                     " (internal plane; in use, or not this host's address)"));
  }
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.listen_address, public_credentials, &port_);
  builder.RegisterService(&services_->attention);
  auto ms = [](absl::Duration d) {
    return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(d), INT_MAX));
  };
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, ms(options_.connection_idle));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, ms(options_.keepalive_time));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ms(options_.keepalive_timeout));
  // Unary messages carry whole tensors; past this limit gRPC itself answers
  // RESOURCE_EXHAUSTED and clients use AttendStream.
  const int64_t unary = std::min<int64_t>(options_.max_unary_bytes + (1 << 20), INT_MAX);
  builder.SetMaxReceiveMessageSize(static_cast<int>(unary));
  builder.SetMaxSendMessageSize(INT_MAX);
  RefuseSharedPorts(&builder);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options_.listen_address,
                                               " (in use, or not this host's address)"));
  }
  if (!options_.health_listen_address.empty()) {
    grpc::ServerBuilder health;  // the default health service only
    health.AddListeningPort(options_.health_listen_address, grpc::InsecureServerCredentials(),
                            &health_port_);
    RefuseSharedPorts(&health);
    health_server_ = health.BuildAndStart();
    if (health_server_ == nullptr || health_port_ == 0) {
      return absl::UnavailableError(absl::StrCat("cannot listen on ",
                                                 options_.health_listen_address,
                                                 " (health; in use, or not this host's address)"));
    }
  }
  SetServing(false);
  ring_->Start();
  if (options_.shared_memory) {
    landing_ = std::make_unique<ArenaPool>(std::max(1, options_.pipeline_depth) + 1,
                                           "/ringattn_landing");
  }
  for (int i = 0; i < std::max(1, options_.pipeline_depth); ++i) {
    arenas_.push_back(std::make_unique<SharedMemoryArena>(absl::StrCat("/ringattn_arena", i)));
    SharedMemoryArena* arena = options_.shared_memory ? arenas_.back().get() : nullptr;
    dispatchers_.emplace_back([this, arena] { DispatchLoop(arena); });
  }
  status_thread_ = std::thread([this] { StatusLoop(); });
  return absl::OkStatus();
}

int64_t Coordinator::ring_generation() const {
  absl::StatusOr<RingSnapshot> ring = ring_->CurrentRing();
  return ring.ok() ? ring->generation : 0;
}

std::vector<std::string> Coordinator::worker_addresses() const {
  const RingManager::Status st = ring_->GetStatus();
  std::vector<std::string> out;
  for (const auto& w : st.ready ? st.members : st.workers) out.push_back(w->address);
  return out;
}

const std::string& Coordinator::cluster_secret() const {
  static const std::string* const kNone = new std::string();
  return secret_.ok() ? secret_->value() : *kNone;
}

std::string Coordinator::internal_address() const {
  return absl::StrCat("127.0.0.1:", internal_port_);
}

absl::Status Coordinator::CheckInternal(const grpc::ServerContextBase& ctx) const {
  return secret_.ok() ? secret_->Check(ctx) : secret_.status();
}

absl::StatusOr<std::string> Coordinator::Caller(const grpc::ServerContextBase& ctx) const {
  if (!tokens_.has_value()) return CallerIdentity(ctx);
  RA_ASSIGN_OR_RETURN(std::string client, tokens_->Authenticate(ctx));
  return absl::StrCat("client:", client);
}

Coordinator::AdmissionState Coordinator::admission() const {
  AdmissionState state;
  state.queued = queue_.depth();
  state.held_bytes = queue_.held_bytes();
  absl::MutexLock lock(&running_mu_);
  state.running_count = running_.size();
  state.running = state.running_count > 0;
  return state;
}

int Coordinator::metrics_port() const { return metrics_.exposer_port(); }

bool Coordinator::Drain(absl::Duration grace) {
  draining_ = true;
  SetServing(false);
  const absl::Time deadline = absl::Now() + grace;
  while (in_flight_ > 0) {
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return true;
}

void Coordinator::Shutdown() {
  if (stopping_.exchange(true)) return;
  queue_.Close();
  if (server_ != nullptr) server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  if (internal_server_ != nullptr) {
    internal_server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  }
  if (health_server_ != nullptr) health_server_->Shutdown(absl::ToChronoTime(absl::Now()));
  for (std::thread& t : dispatchers_) {
    if (t.joinable()) t.join();
  }
  if (status_thread_.joinable()) status_thread_.join();
  ring_->Stop();
}

void Coordinator::SetServing(bool serving) {
  for (grpc::Server* server : {server_.get(), health_server_.get()}) {
    if (server == nullptr) continue;
    server->GetHealthCheckService()->SetServingStatus(kServiceName, serving);
    server->GetHealthCheckService()->SetServingStatus("", serving);
  }
}

void Coordinator::Wait() {
  if (server_ != nullptr) server_->Wait();
}

void Coordinator::FillInfo(v1::InfoResponse* response) const {
  const RingManager::Status st = ring_->GetStatus();
  response->set_version(RINGATTN_VERSION);
  response->set_world_size(st.ready ? static_cast<int>(st.members.size()) : 0);
  response->set_ready(st.ready);
  response->set_transport("gloo");
  response->set_max_unary_bytes(options_.max_unary_bytes);
  response->set_max_request_bytes(options_.max_request_bytes);
  std::vector<std::string> backends;
  const auto& listed = st.ready ? st.members : st.workers;
  for (size_t i = 0; i < listed.size(); ++i) {
    v1::WorkerInfo* w = response->add_workers();
    w->set_rank(st.ready ? static_cast<int>(i) : -1);
    // No internal addresses on the public API: they are the internal plane's business.
    w->set_backend(listed[i]->backend);
    w->set_device(listed[i]->device);
    w->set_ready(st.ready);
    if (std::find(backends.begin(), backends.end(), listed[i]->backend) == backends.end()) {
      backends.push_back(listed[i]->backend);
    }
    if (!listed[i]->transport.empty()) response->set_transport(listed[i]->transport);
  }
  for (const std::string& b : backends) response->add_backends(b);
}

AttendLimits Coordinator::Limits() const {
  AttendLimits limits;
  limits.max_request_bytes = options_.max_request_bytes;
  return limits;
}

template <typename Call>
absl::StatusOr<std::shared_ptr<AttendJob>> Coordinator::Submit(
    const typename Call::Request& request, typename Call::Response* response,
    const std::string& owner, absl::Time arrival, absl::Time deadline, RequestWork* work,
    const TraceContext& trace,
    std::function<void(absl::Status)> finish, SharedTensors landed) {
  // Counted from here, so that a Drain that starts now waits for this request or it sees the
  // drain and is refused; uncounted again on every refusal below.
  ++in_flight_;
  absl::Cleanup uncount = [this] { --in_flight_; };
  if (draining_) {
    return absl::UnavailableError("the service is shutting down; send the request elsewhere");
  }
  const absl::Time validate0 = absl::Now();
  LandedTensors landed_names;
  for (const auto& [name, t] : landed) landed_names.insert(name);
  RA_ASSIGN_OR_RETURN(ValidatedAttend problem, Call::Validate(request, Limits(), landed_names));
  *work = WorkOf(problem.shape, problem.options.causal, Call::kForwardMultiple);
  // Resolved now, so that a bad reference is refused before queueing, and holding the regions'
  // mappings until the job is done.
  RA_ASSIGN_OR_RETURN(SharedTensors shared, ResolveSharedTensors(Call::Rpc(), request, problem,
                                                                  shared_memory_, owner));
  shared.merge(landed);  // a stream lands only requests without shared-memory references
  problem.request_id = RequestIdOf(problem.request_id, arrival);
  auto job = std::make_shared<AttendJob>();
  job->request_id = problem.request_id;
  job->client = owner;
  job->traceparent = trace.Traceparent();
  job->arrival = arrival;
  job->deadline = std::min(deadline, arrival + options_.max_request_time);
  job->timings = response->mutable_timings();
  job->run = [&request, response, problem, shared = std::move(shared)](
                 const RingSnapshot& ring, const RunControl& control) {
    return RunOnRing(Call::Rpc(), problem, request, shared, control.arena, ring, control, response,
                     response->mutable_plan(), response->mutable_timings());
  };
  job->done = [this, response, arrival, id = problem.request_id,
               finish = std::move(finish)](absl::Status s) {
    if (s.ok()) {
      const absl::Time respond0 = absl::Now();
      response->set_request_id(id);
      v1::Timings* t = response->mutable_timings();
      t->set_respond_seconds(SecondsSince(respond0));
      t->set_total_seconds(SecondsSince(arrival));
    }
    finish(std::move(s));
    --in_flight_;
  };
  job->queued = absl::Now();
  response->mutable_timings()->set_validate_seconds(absl::ToDoubleSeconds(job->queued - validate0));
  RA_RETURN_IF_ERROR(queue_.Push(job));
  std::move(uncount).Cancel();  // admitted: job->done uncounts it
  return job;
}

void Coordinator::Cancel(const std::shared_ptr<AttendJob>& job, const absl::Status& reason) {
  job->cancellation.Cancel(reason);
  if (!queue_.Remove(job)) return;  // the dispatcher has it and sees the cancellation
  job->done(absl::Status(reason.code(), absl::StrCat(reason.message(), " while it was queued")));
}

absl::Status Coordinator::RunJob(AttendJob& job, std::function<void()> fanning_out,
                                 SharedMemoryArena* arena) {
  // A ring being re-formed (after a failure) gets a bounded wait before UNAVAILABLE.
  const absl::Time wait0 = absl::Now();
  const absl::Time ring_deadline = std::min(job.deadline, absl::Now() + options_.ring_wait);
  absl::StatusOr<RingSnapshot> ring = ring_->CurrentRing();
  while (!ring.ok() && absl::Now() < ring_deadline && job.cancellation.reason().ok() &&
         !stopping_) {
    ring_->WaitUntilReady(absl::Milliseconds(50));
    ring = ring_->CurrentRing();
  }
  if (absl::Status why = job.cancellation.reason(); !why.ok()) return why;
  if (!ring.ok()) {
    return absl::Now() >= job.deadline
               ? absl::DeadlineExceededError("deadline exceeded waiting for the ring to form")
               : ring.status();
  }
  job.timings->set_ring_wait_seconds(SecondsSince(wait0));
  {
    absl::MutexLock lock(&running_mu_);
    for (auto& [running, generation] : running_) {
      if (running.get() == &job) generation = ring->generation;
    }
  }
  bool workers_called = false;
  bool ring_intact = false;
  const absl::Status s =
      job.run(*ring, RunControl{job.deadline, &job.cancellation, &workers_called,
                                std::move(fanning_out), &ring_intact, arena, job.traceparent});
  if (!s.ok() && workers_called && !ring_intact) {
    ring_->ReportFailure(ring->generation, s.ToString());
  }
  return s;
}

void Coordinator::DispatchLoop(SharedMemoryArena* arena) {
  while (!stopping_) {
    // One job at a time leaves the queue, once the one before it has reached its workers: the
    // queue's order (and its fairness) is the order the ring sees.
    {
      absl::MutexLock lock(&running_mu_);
      auto free = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(running_mu_) { return !starting_; };
      if (!running_mu_.AwaitWithTimeout(absl::Condition(&free), absl::Milliseconds(100))) {
        continue;
      }
      starting_ = true;
    }
    bool started = false;
    const auto release = [this, &started] {
      if (started) return;
      started = true;
      absl::MutexLock lock(&running_mu_);
      starting_ = false;
    };
    std::shared_ptr<AttendJob> job = queue_.Pop(absl::Milliseconds(100));
    if (job == nullptr) {
      release();
      continue;
    }
    job->timings->set_queue_seconds(SecondsSince(job->queued));
    {
      absl::MutexLock lock(&running_mu_);
      running_.emplace_back(job, 0);
    }
    const absl::Status s = RunJob(*job, release, arena);
    release();
    {
      absl::MutexLock lock(&running_mu_);
      std::erase_if(running_, [&job](const auto& r) { return r.first == job; });
    }
    job->done(s);
  }
}

void Coordinator::OnRingBroken(int64_t generation, const std::string& why) {
  std::vector<std::shared_ptr<AttendJob>> jobs;
  {
    absl::MutexLock lock(&running_mu_);
    for (const auto& [job, g] : running_) {
      if (g == generation) jobs.push_back(job);
    }
  }
  for (const auto& job : jobs) {
    job->cancellation.Cancel(absl::UnavailableError(
        absl::StrCat(why, " during the request; the ring is being re-formed, retry")));
  }
}

std::shared_ptr<Coordinator::StreamWatch> Coordinator::WatchStream(
    grpc::CallbackServerContext* ctx) {
  auto w = std::make_shared<StreamWatch>();
  {
    absl::MutexLock lock(&w->mu);
    w->ctx = ctx;
    w->last = absl::Now();
  }
  absl::MutexLock lock(&watches_mu_);
  watches_.push_back(w);
  return w;
}

void Coordinator::UnwatchStream(const std::shared_ptr<StreamWatch>& watch) {
  {
    absl::MutexLock lock(&watch->mu);
    watch->ctx = nullptr;
  }
  absl::MutexLock lock(&watches_mu_);
  std::erase(watches_, watch);
}

void Coordinator::CancelIdleStreams() {
  std::vector<std::shared_ptr<StreamWatch>> watches;
  {
    absl::MutexLock lock(&watches_mu_);
    watches = watches_;
  }
  const absl::Time now = absl::Now();
  for (const std::shared_ptr<StreamWatch>& w : watches) {
    absl::MutexLock lock(&w->mu);
    if (w->ctx == nullptr || w->server_busy || now - w->last < options_.stream_idle_timeout) {
      continue;
    }
    LogInfo(kComponent, absl::StrFormat("cancelling a stream idle for %.1f s",
                                        absl::ToDoubleSeconds(now - w->last)));
    w->ctx->TryCancel();  // OnDone (which clears ctx under this lock) runs later, elsewhere
    w->ctx = nullptr;
  }
}

void Coordinator::StatusLoop() {
  bool last = false;
  bool first = true;
  while (!stopping_) {
    const bool ready = ring_->WaitUntilReady(absl::ZeroDuration()) && !draining_;
    if (first || ready != last) {
      SetServing(ready);
      last = ready;
      first = false;
    }
    CancelIdleStreams();
    absl::SleepFor(absl::Milliseconds(50));
  }
}

}  // namespace ringattn
