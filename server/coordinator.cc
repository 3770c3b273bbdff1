#include "server/coordinator.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <climits>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "proto/chunk_codec.h"
#include "proto/convert.h"
#include "ringattn/v1/attention.grpc.pb.h"
#include "ringattn/v1/worker.grpc.pb.h"
#include "server/request_runner.h"

namespace ringattn {
namespace {

constexpr char kVersion[] = "0.1.0";
constexpr char kServiceName[] = "ringattn.v1.AttentionService";

double SecondsSince(absl::Time t0) { return absl::ToDoubleSeconds(absl::Now() - t0); }

absl::Time DeadlineOf(const grpc::ServerContext& ctx) {
  const auto d = ctx.deadline();
  if (d == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(d);
}

int64_t RequestBytes(const v1::AttendRequest& r) {
  return static_cast<int64_t>(r.q().data().size() + r.k().data().size() + r.v().data().size());
}

int64_t ResponseBytes(const v1::AttendResponse& r) {
  return static_cast<int64_t>(r.out().data().size() + r.lse().data().size());
}

int64_t RequestBytes(const v1::AttendBackwardRequest& r) {
  int64_t n = 0;
  for (const v1::Tensor* t : {&r.q(), &r.k(), &r.v(), &r.out(), &r.dout(), &r.lse()}) {
    n += static_cast<int64_t>(t->data().size());
  }
  return n;
}

int64_t ResponseBytes(const v1::AttendBackwardResponse& r) {
  return static_cast<int64_t>(r.dq().data().size() + r.dk().data().size() + r.dv().data().size());
}

}  // namespace

class Coordinator::Services {
 public:
  explicit Services(Coordinator* c) : attention(c), coordinator(c) {}

  class Attention final : public v1::AttentionService::Service {
   public:
    explicit Attention(Coordinator* c) : c_(c) {}

    grpc::Status Attend(grpc::ServerContext* ctx, const v1::AttendRequest* request,
                        v1::AttendResponse* response) override {
      const absl::Time arrival = absl::Now();
      absl::Status s = c_->Handle(ctx, *request, arrival, 0.0, response);
      // Unary: gRPC serialises and sends the response after this returns, so the timings
      // cannot include it; send_seconds stays 0 (AttendStream measures its chunks).
      if (s.ok()) response->mutable_timings()->set_total_seconds(SecondsSince(arrival));
      c_->metrics_.RecordRequest(ServiceMetrics::Rpc::kAttend, ToGrpcStatus(s).error_code(),
                                 response->timings(), RequestBytes(*request),
                                 s.ok() ? ResponseBytes(*response) : 0);
      return ToGrpcStatus(s);
    }

    grpc::Status AttendStream(grpc::ServerContext* ctx,
                              grpc::ServerReaderWriter<v1::AttendStreamResponse,
                                                       v1::AttendStreamRequest>* stream) override {
      const absl::Time arrival = absl::Now();
      v1::AttendRequest request;
      v1::AttendResponse response;
      absl::Status s = c_->ReceiveStream(stream, &request);
      const double receive_s = SecondsSince(arrival);
      if (s.ok()) s = c_->Handle(ctx, request, arrival, receive_s, &response);
      if (s.ok()) s = c_->SendStream(stream, arrival, &response);
      c_->metrics_.RecordRequest(ServiceMetrics::Rpc::kAttendStream, ToGrpcStatus(s).error_code(),
                                 response.timings(), RequestBytes(request),
                                 s.ok() ? ResponseBytes(response) : 0);
      return ToGrpcStatus(s);
    }

    grpc::Status AttendBackward(grpc::ServerContext* ctx, const v1::AttendBackwardRequest* request,
                                v1::AttendBackwardResponse* response) override {
      const absl::Time arrival = absl::Now();
      absl::Status s = c_->HandleBackward(ctx, *request, arrival, response);
      c_->metrics_.RecordRequest(ServiceMetrics::Rpc::kAttendBackward, ToGrpcStatus(s).error_code(),
                                 response->timings(), RequestBytes(*request),
                                 s.ok() ? ResponseBytes(*response) : 0);
      return ToGrpcStatus(s);
    }

    grpc::Status AttendBackwardStream(
        grpc::ServerContext* ctx,
        grpc::ServerReaderWriter<v1::AttendBackwardStreamResponse, v1::AttendBackwardStreamRequest>*
            stream) override {
      const absl::Time arrival = absl::Now();
      v1::AttendBackwardRequest request;
      v1::AttendBackwardResponse response;
      absl::Status s = c_->ReceiveBackwardStream(stream, &request);
      const double receive_s = SecondsSince(arrival);
      if (s.ok()) s = c_->HandleBackward(ctx, request, arrival, &response);
      if (s.ok()) {
        response.mutable_timings()->set_receive_seconds(receive_s);
        s = c_->SendBackwardStream(stream, arrival, &response);
      }
      c_->metrics_.RecordRequest(ServiceMetrics::Rpc::kAttendBackwardStream,
                                 ToGrpcStatus(s).error_code(), response.timings(),
                                 RequestBytes(request), s.ok() ? ResponseBytes(response) : 0);
      return ToGrpcStatus(s);
    }

    grpc::Status GetInfo(grpc::ServerContext*, const v1::InfoRequest*,
                         v1::InfoResponse* response) override {
      const RingManager::Status st = c_->ring_->GetStatus();
      response->set_version(kVersion);
      response->set_world_size(st.ready ? static_cast<int>(st.members.size()) : 0);
      response->set_ready(st.ready);
      response->set_transport("gloo");
      response->set_max_unary_bytes(c_->options_.max_unary_bytes);
      response->set_max_request_bytes(c_->options_.max_request_bytes);
      std::vector<std::string> backends;
      const auto& listed = st.ready ? st.members : st.workers;
      for (size_t i = 0; i < listed.size(); ++i) {
        v1::WorkerInfo* w = response->add_workers();
        w->set_rank(st.ready ? static_cast<int>(i) : -1);
        w->set_address(listed[i]->address);
        w->set_backend(listed[i]->backend);
        w->set_device(listed[i]->device);
        w->set_ready(st.ready);
        if (std::find(backends.begin(), backends.end(), listed[i]->backend) == backends.end()) {
          backends.push_back(listed[i]->backend);
        }
        if (!listed[i]->transport.empty()) response->set_transport(listed[i]->transport);
      }
      for (const std::string& b : backends) response->add_backends(b);
      return grpc::Status::OK;
    }

   private:
    Coordinator* c_;
  };

  class Internal final : public v1::CoordinatorService::Service {
   public:
    explicit Internal(Coordinator* c) : c_(c) {}

    grpc::Status Register(grpc::ServerContext*, const v1::RegisterRequest* request,
                          v1::RegisterResponse* response) override {
      if (request->address().empty()) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "address must be host:port");
      }
      response->set_worker_id(c_->ring_->Register(*request));
      std::fprintf(stderr, "coordinator: worker %s registered at %s (%s, %s)\n",
                   response->worker_id().c_str(), request->address().c_str(),
                   request->backend().c_str(), request->device().c_str());
      return grpc::Status::OK;
    }

    grpc::Status StoreSet(grpc::ServerContext*, const v1::StoreSetRequest* request,
                          v1::StoreSetResponse*) override {
      c_->store_.Set(request->key(), request->value());
      return grpc::Status::OK;
    }

    grpc::Status StoreGet(grpc::ServerContext* ctx, const v1::StoreGetRequest* request,
                          v1::StoreGetResponse* response) override {
      std::vector<std::string> keys(request->keys().begin(), request->keys().end());
      // Bounded even when the caller set no deadline.
      const absl::Time deadline = std::min(DeadlineOf(*ctx), absl::Now() + absl::Minutes(5));
      absl::StatusOr<std::vector<std::string>> values = c_->store_.Get(keys, deadline);
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
      ring_(std::make_unique<RingManager>(
          [&] {
            RingManager::Options r = options_.ring;
            r.expected_workers = options_.world_size;
            return r;
          }(),
          &store_, &metrics_)),
      queue_(options_.max_queue),
      services_(std::make_unique<Services>(this)) {}

Coordinator::~Coordinator() { Shutdown(); }

absl::Status Coordinator::BuildAndStart() {
  if (options_.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("world_size must be >= 1, got ", options_.world_size));
  }
  if (!options_.metrics_address.empty()) {
    absl::Status s = metrics_.StartExposer(options_.metrics_address);
    if (!s.ok()) return s;
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.listen_address, grpc::InsecureServerCredentials(), &port_);
  builder.RegisterService(&services_->attention);
  builder.RegisterService(&services_->coordinator);
  // Unary messages carry whole tensors; past this limit gRPC itself answers
  // RESOURCE_EXHAUSTED and clients use AttendStream.
  const int64_t unary = std::min<int64_t>(options_.max_unary_bytes + (1 << 20), INT_MAX);
  builder.SetMaxReceiveMessageSize(static_cast<int>(unary));
  builder.SetMaxSendMessageSize(INT_MAX);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options_.listen_address));
  }
  server_->GetHealthCheckService()->SetServingStatus(kServiceName, false);
  server_->GetHealthCheckService()->SetServingStatus("", false);
  ring_->Start();
  dispatcher_ = std::thread([this] { DispatchLoop(); });
  status_thread_ = std::thread([this] { StatusLoop(); });
  return absl::OkStatus();
}

int Coordinator::metrics_port() const { return metrics_.exposer_port(); }

void Coordinator::Shutdown() {
  if (stopping_.exchange(true)) return;
  queue_.Close();
  if (server_ != nullptr) server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  if (dispatcher_.joinable()) dispatcher_.join();
  if (status_thread_.joinable()) status_thread_.join();
  ring_->Stop();
}

void Coordinator::Wait() {
  if (server_ != nullptr) server_->Wait();
}

// Validates, admits and waits for one request; fills `response` on success.
absl::Status Coordinator::Handle(grpc::ServerContext* ctx, const v1::AttendRequest& request,
                                 absl::Time arrival, double receive_seconds,
                                 v1::AttendResponse* response) {
  AttendLimits limits;
  limits.max_request_bytes = options_.max_request_bytes;
  absl::StatusOr<ValidatedAttend> problem = ValidateAttendRequest(request, limits);
  if (!problem.ok()) return problem.status();
  auto job = std::make_shared<AttendJob>();
  job->request = &request;
  job->problem = *std::move(problem);
  job->arrival = arrival;
  if (absl::Status s = AdmitAndWait(ctx, job); !s.ok()) return s;
  *response = std::move(job->response);
  response->set_request_id(job->problem.request_id);
  response->mutable_timings()->set_receive_seconds(receive_seconds);
  response->mutable_timings()->set_total_seconds(SecondsSince(arrival));
  return absl::OkStatus();
}

absl::Status Coordinator::HandleBackward(grpc::ServerContext* ctx,
                                         const v1::AttendBackwardRequest& request,
                                         absl::Time arrival, v1::AttendBackwardResponse* response) {
  AttendLimits limits;
  limits.max_request_bytes = options_.max_request_bytes;
  absl::StatusOr<ValidatedAttendBackward> problem = ValidateAttendBackwardRequest(request, limits);
  if (!problem.ok()) return problem.status();
  auto job = std::make_shared<AttendJob>();
  job->kind = AttendJob::Kind::kBackward;
  job->backward_request = &request;
  job->backward_problem = *std::move(problem);
  job->arrival = arrival;
  if (absl::Status s = AdmitAndWait(ctx, job); !s.ok()) return s;
  *response = std::move(job->backward_response);
  response->set_request_id(job->request_id());
  response->mutable_timings()->set_total_seconds(SecondsSince(arrival));
  return absl::OkStatus();
}

absl::Status Coordinator::AdmitAndWait(grpc::ServerContext* ctx,
                                       const std::shared_ptr<AttendJob>& job) {
  if (job->request_id().empty()) {
    job->request_id() = absl::StrCat("req-", absl::ToUnixMicros(job->arrival));
  }
  job->deadline = DeadlineOf(*ctx);
  if (absl::Status s = queue_.Push(job); !s.ok()) return s;
  metrics_.SetQueueDepth(static_cast<int64_t>(queue_.depth()));

  // Wait for the dispatcher, watching the client and the deadline while queued. Once the
  // dispatcher has the job it watches them itself (through `cancelled` and the deadline).
  while (!job->done.WaitForNotificationWithTimeout(absl::Milliseconds(10))) {
    const bool gone = ctx->IsCancelled();
    if (gone) job->cancelled = true;
    if ((gone || absl::Now() >= job->deadline) && queue_.Remove(job)) {
      return gone ? absl::CancelledError("the client cancelled the request while it was queued")
                  : absl::DeadlineExceededError("deadline exceeded while queued");
    }
  }
  return job->status;
}

void Coordinator::DispatchLoop() {
  while (!stopping_) {
    std::shared_ptr<AttendJob> job = queue_.Pop(absl::Milliseconds(100));
    metrics_.SetQueueDepth(static_cast<int64_t>(queue_.depth()));
    if (job == nullptr) continue;
    job->timings()->set_queue_seconds(SecondsSince(job->arrival));
    RunControl control{job->deadline, &job->cancelled};
    absl::Status s;
    // A ring being re-formed (after a failure) gets a bounded wait before UNAVAILABLE.
    const absl::Time ring_deadline = std::min(job->deadline, absl::Now() + options_.ring_wait);
    absl::StatusOr<RingSnapshot> ring = ring_->CurrentRing();
    while (!ring.ok() && absl::Now() < ring_deadline && !job->cancelled && !stopping_) {
      ring_->WaitUntilReady(absl::Milliseconds(50));
      ring = ring_->CurrentRing();
    }
    if (job->cancelled) {
      s = absl::CancelledError("the client cancelled the request");
    } else if (!ring.ok()) {
      s = absl::Now() >= job->deadline
              ? absl::DeadlineExceededError("deadline exceeded waiting for the ring to form")
              : ring.status();
    } else {
      s = job->kind == AttendJob::Kind::kForward
              ? RunOnRing(*job->request, job->problem, *ring, control, &job->response)
              : RunBackwardOnRing(*job->backward_request, job->backward_problem, *ring, control,
                                  &job->backward_response);
      if (!s.ok()) ring_->ReportFailure(ring->generation, s.ToString());
    }
    job->status = s;
    job->done.Notify();
  }
}

void Coordinator::StatusLoop() {
  bool last = false;
  bool first = true;
  while (!stopping_) {
    const bool ready = ring_->WaitUntilReady(absl::ZeroDuration());
    if (first || ready != last) {
      server_->GetHealthCheckService()->SetServingStatus(kServiceName, ready);
      server_->GetHealthCheckService()->SetServingStatus("", ready);
      last = ready;
      first = false;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
}

absl::Status Coordinator::ReceiveStream(
    grpc::ServerReaderWriter<v1::AttendStreamResponse, v1::AttendStreamRequest>* stream,
    v1::AttendRequest* request) {
  v1::AttendStreamRequest msg;
  if (!stream->Read(&msg) || !msg.has_header()) {
    return absl::InvalidArgumentError("AttendStream must start with a header message");
  }
  *request = std::move(*msg.mutable_header());
  AttendLimits limits;
  limits.max_request_bytes = options_.max_request_bytes;
  absl::StatusOr<ValidatedAttend> header = ValidateAttendHeader(*request, limits);
  if (!header.ok()) return header.status();
  const StreamedTensor tensors[] = {
      {v1::TensorChunk::WHICH_Q, "q", request->mutable_q()->mutable_data(), header->bytes.q},
      {v1::TensorChunk::WHICH_K, "k", request->mutable_k()->mutable_data(), header->bytes.k},
      {v1::TensorChunk::WHICH_V, "v", request->mutable_v()->mutable_data(), header->bytes.v}};
  for (const StreamedTensor& t : tensors) t.data->reserve(t.expected);
  RA_RETURN_IF_ERROR(ReceiveChunks<v1::AttendStreamRequest>(stream, tensors));
  return absl::OkStatus();  // full validation (byte counts included) follows in Handle
}

absl::Status Coordinator::SendStream(
    grpc::ServerReaderWriter<v1::AttendStreamResponse, v1::AttendStreamRequest>* stream,
    absl::Time arrival, v1::AttendResponse* response) {
  const absl::Time send0 = absl::Now();
  const bool has_lse = response->has_lse();
  std::string out = std::move(*response->mutable_out()->mutable_data());
  std::string lse = has_lse ? std::move(*response->mutable_lse()->mutable_data()) : std::string();
  response->mutable_out()->clear_data();
  if (has_lse) response->mutable_lse()->clear_data();
  v1::AttendStreamResponse header;
  *header.mutable_header() = *response;
  if (!stream->Write(header)) return absl::CancelledError("client went away");
  const StreamedTensor parts[] = {{v1::TensorChunk::WHICH_OUT, "out", &out},
                                  {v1::TensorChunk::WHICH_LSE, "lse", &lse}};
  RA_RETURN_IF_ERROR(
      SendChunks<v1::AttendStreamResponse>(stream, parts, options_.stream_chunk_bytes));
  response->mutable_timings()->set_send_seconds(SecondsSince(send0));
  response->mutable_timings()->set_total_seconds(SecondsSince(arrival));
  // Keep the bytes for the metrics' byte count.
  *response->mutable_out()->mutable_data() = std::move(out);
  if (has_lse) *response->mutable_lse()->mutable_data() = std::move(lse);
  return absl::OkStatus();
}

absl::Status Coordinator::ReceiveBackwardStream(
    grpc::ServerReaderWriter<v1::AttendBackwardStreamResponse, v1::AttendBackwardStreamRequest>*
        stream,
    v1::AttendBackwardRequest* request) {
  v1::AttendBackwardStreamRequest msg;
  if (!stream->Read(&msg) || !msg.has_header()) {
    return absl::InvalidArgumentError("AttendBackwardStream must start with a header message");
  }
  *request = std::move(*msg.mutable_header());
  // The q/k/v part of the header through the forward's header checks, for the sizes to expect
  // (out and dout are q-shaped, lse [batch, heads, seq] fp32); the six tensors together within
  // max_request_bytes before any chunk is taken. Everything else (out/dout/lse dtypes and
  // shapes, the byte counts) is checked on the assembled request by HandleBackward.
  v1::AttendRequest forward_header;
  forward_header.set_request_id(request->request_id());
  *forward_header.mutable_q() = request->q();
  *forward_header.mutable_k() = request->k();
  *forward_header.mutable_v() = request->v();
  *forward_header.mutable_options() = request->options();
  forward_header.set_layout(request->layout());
  AttendLimits limits;
  limits.max_request_bytes = options_.max_request_bytes;
  absl::StatusOr<ValidatedAttend> header = ValidateAttendHeader(forward_header, limits);
  if (!header.ok()) return header.status();
  for (const v1::Tensor* t : {&request->out(), &request->dout(), &request->lse()}) {
    if (!t->data().empty()) {
      return absl::InvalidArgumentError(
          "AttendBackwardStream's header carries tensor data; every tensor's bytes come as chunks");
    }
  }
  const AttendTensorBytes& b = header->bytes;
  const int64_t total = b.request() + 2 * b.out + b.lse;
  if (total > options_.max_request_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("q, k, v, out, dout and lse need ", total, " bytes; the limit is ",
                     options_.max_request_bytes, " (max_request_bytes)"));
  }
  const StreamedTensor tensors[] = {
      {v1::TensorChunk::WHICH_Q, "q", request->mutable_q()->mutable_data(), b.q},
      {v1::TensorChunk::WHICH_K, "k", request->mutable_k()->mutable_data(), b.k},
      {v1::TensorChunk::WHICH_V, "v", request->mutable_v()->mutable_data(), b.v},
      {v1::TensorChunk::WHICH_OUT, "out", request->mutable_out()->mutable_data(), b.out},
      {v1::TensorChunk::WHICH_DOUT, "dout", request->mutable_dout()->mutable_data(), b.out},
      {v1::TensorChunk::WHICH_LSE, "lse", request->mutable_lse()->mutable_data(), b.lse}};
  for (const StreamedTensor& t : tensors) t.data->reserve(t.expected);
  return ReceiveChunks<v1::AttendBackwardStreamRequest>(stream, tensors);
}

absl::Status Coordinator::SendBackwardStream(
    grpc::ServerReaderWriter<v1::AttendBackwardStreamResponse, v1::AttendBackwardStreamRequest>*
        stream,
    absl::Time arrival, v1::AttendBackwardResponse* response) {
  const absl::Time send0 = absl::Now();
  std::string dq = std::move(*response->mutable_dq()->mutable_data());
  std::string dk = std::move(*response->mutable_dk()->mutable_data());
  std::string dv = std::move(*response->mutable_dv()->mutable_data());
  for (v1::Tensor* t : {response->mutable_dq(), response->mutable_dk(), response->mutable_dv()}) {
    t->clear_data();
  }
  v1::AttendBackwardStreamResponse header;
  *header.mutable_header() = *response;
  if (!stream->Write(header)) return absl::CancelledError("client went away");
  const StreamedTensor parts[] = {{v1::TensorChunk::WHICH_DQ, "dq", &dq},
                                  {v1::TensorChunk::WHICH_DK, "dk", &dk},
                                  {v1::TensorChunk::WHICH_DV, "dv", &dv}};
  RA_RETURN_IF_ERROR(
      SendChunks<v1::AttendBackwardStreamResponse>(stream, parts, options_.stream_chunk_bytes));
  response->mutable_timings()->set_send_seconds(SecondsSince(send0));
  response->mutable_timings()->set_total_seconds(SecondsSince(arrival));
  // Keep the bytes for the metrics' byte count.
  *response->mutable_dq()->mutable_data() = std::move(dq);
  *response->mutable_dk()->mutable_data() = std::move(dk);
  *response->mutable_dv()->mutable_data() = std::move(dv);
  return absl::OkStatus();
}

}  // namespace ringattn
