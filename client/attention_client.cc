#include "client/attention_client.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>
#include <grpcpp/support/status.h>
#include <grpcpp/support/sync_stream.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <string_view>
#include <utility>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "client/head_split.h"
#include "proto/chunk_codec.h"
#include "proto/compute_rpcs.h"
#include "proto/convert.h"
#include "proto/transport_security.h"

namespace ringattn {
namespace {

// Protocol buffers refuse to parse or serialise a message of 2 GiB or more.
constexpr int64_t kProtobufMessageLimit = INT_MAX;

std::chrono::system_clock::time_point DeadlineAfter(absl::Duration timeout) {
  if (timeout == absl::InfiniteDuration()) return std::chrono::system_clock::time_point::max();
  return absl::ToChronoTime(absl::Now() + timeout);
}

void SetTimeout(absl::Duration timeout, grpc::ClientContext* context) {
  if (timeout != absl::InfiniteDuration()) context->set_deadline(DeadlineAfter(timeout));
}

int ElementSize(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FP32:
      return 4;
    case v1::DTYPE_FP16:
    case v1::DTYPE_BF16:
      return 2;
    default:
      return 0;
  }
}

// Every output of `rpc` in `response` has the bytes its dtype and shape imply, or none when the
// request placed it in shared memory (a key of `output_shm`); INTERNAL naming it if not.
absl::Status CheckOutputSizes(
    const ComputeRpc& rpc, const google::protobuf::Message& response,
    const google::protobuf::Map<std::string, v1::SharedMemoryRef>& output_shm) {
  for (const ComputeTensor& out : rpc.outputs) {
    const v1::Tensor& tensor = TensorField(response, out.name);
    const int64_t expected = ExpectedTensorBytes(tensor);
    if (expected < 0) {
      return absl::InternalError(absl::StrCat(
          "response ", out.name, " has an invalid dtype or shape ", DescribeTensor(tensor)));
    }
    if (output_shm.contains(out.name)) {
      if (!tensor.data().empty()) {
        return absl::InternalError(absl::StrCat("response ", out.name, " carries ",
                                                tensor.data().size(),
                                                " bytes; the request placed it in shared memory"));
      }
    } else if (static_cast<int64_t>(tensor.data().size()) != expected) {
      return absl::InternalError(absl::StrCat("response ", out.name, " has ", tensor.data().size(),
                                              " bytes; its shape ", DescribeTensor(tensor),
                                              " needs ", expected));
    }
  }
  return absl::OkStatus();
}

// Response bytes to expect before the response header says: each wanted output's size as the
// request's shapes imply.
int64_t EstimatedResponseBytes(const ComputeRpc& rpc, const google::protobuf::Message& request) {
  int64_t bytes = 0;
  for (const ComputeTensor& out : rpc.outputs) {
    if (Wants(request, out)) bytes += std::max<int64_t>(0, ExpectedOutputBytes(out, request));
  }
  return bytes;
}

template <typename Request, typename Response>
using StubMethod = grpc::Status (v1::AttentionService::Stub::*)(grpc::ClientContext*,
                                                                const Request&, Response*);

// One unary call of the stub's `method`: its response, or the service's status.
template <typename Request, typename Response>
absl::StatusOr<Response> RunPlainCall(v1::AttentionService::Stub& stub,
                                      StubMethod<Request, Response> method, const Request& request,
                                      absl::Duration timeout) {
  grpc::ClientContext context;
  SetTimeout(timeout, &context);
  Response response;
  const grpc::Status status = (stub.*method)(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

// A unary compute call of `request` whose outputs are checked against their shapes.
template <typename Request, typename Response>
absl::StatusOr<Response> RunUnaryCall(const ComputeRpc& rpc, v1::AttentionService::Stub& stub,
                                      StubMethod<Request, Response> method, const Request& request,
                                      absl::Duration timeout) {
  RA_ASSIGN_OR_RETURN(Response response, RunPlainCall(stub, method, request, timeout));
  RA_RETURN_IF_ERROR(CheckOutputSizes(rpc, response, request.output_shm()));
  return response;
}

// Stamps the client's side of a finished call on its response's timings: the whole call since
// `call0`, and that minus the server's total (serialising, the wire both ways, parsing).
template <typename Response>
absl::StatusOr<Response> WithClientTimes(absl::Time call0, absl::StatusOr<Response> response) {
  if (response.ok()) {
    v1::Timings* t = response->mutable_timings();
    t->set_client_seconds(absl::ToDoubleSeconds(absl::Now() - call0));
    t->set_client_wire_seconds(std::max(0.0, t->client_seconds() - t->total_seconds()));
  }
  return response;
}

// One streamed call of `rpc`: the request's header, then its inputs in chunks of at most
// chunk_bytes; then the answer's header and its outputs' chunks, assembled. `open` starts the
// call on a context.
// `inputs` are the chunks' sources (empty: the request's tensors); an output named in `sinks`
// lands there (it must have the sink's bytes) instead of in the answer's tensor.
template <typename StreamRequest, typename StreamResponse, typename Request, typename Open>
absl::StatusOr<typename StreamAssembler<StreamResponse>::Header> RunStreamingCall(
    const ComputeRpc& rpc, const char* call_name, const Open& open, const Request& request,
    absl::Duration timeout, int64_t chunk_bytes, const ProgressFn& progress,
    std::vector<ChunkCursor::Source> inputs = {},
    const std::map<std::string, StridedRows>& sinks = {}) {
  if (chunk_bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("chunk_bytes must be > 0, got ", chunk_bytes));
  }
  grpc::ClientContext context;
  SetTimeout(timeout, &context);
  auto stream = open(&context);
  if (inputs.empty()) {
    for (const ComputeTensor& in : rpc.inputs) {
      inputs.push_back({in.which, TensorField(request, in.name).data()});
    }
  }
  ChunkCursor cursor(std::move(inputs), chunk_bytes);
  const int64_t sent_total = cursor.total_bytes();
  int64_t total = sent_total + EstimatedResponseBytes(rpc, request);
  int64_t done = 0;

  // Send: the header, then the inputs in chunks. A failed write means the server has ended the
  // call (its status comes from Finish).
  bool writing;
  {
    StreamRequest message;
    *message.mutable_header() = HeaderOf(request);
    writing = stream->Write(message);
  }
  StreamRequest message;
  while (writing && cursor.Next(message.mutable_chunk())) {
    writing = stream->Write(message);
    if (writing) {
      done += static_cast<int64_t>(message.chunk().data().size());
      if (progress) progress(done, total);
    }
  }
  if (writing) stream->WritesDone();

  // Receive: the response header, then the outputs' chunks.
  StreamAssembler<StreamResponse> assembler(absl::StrCat(call_name, " response"),
                                            absl::StatusCode::kInternal);
  const auto expect_outputs = [&](google::protobuf::Message* header) -> absl::Status {
    for (const ComputeTensor& out : rpc.outputs) {
      v1::Tensor* t = MutableTensorField(header, out.name);
      const int64_t expected = ExpectedTensorBytes(*t);
      if (expected < 0) {
        return assembler.chunks().Error(absl::StrCat(
            "header: ", out.name, " has an invalid dtype or shape ", DescribeTensor(*t)));
      }
      if (auto sink = sinks.find(out.name); sink != sinks.end()) {
        if (expected != sink->second.bytes()) {
          return assembler.chunks().Error(absl::StrCat("header: ", out.name, " has ", expected,
                                                       " bytes, the request implies ",
                                                       sink->second.bytes()));
        }
        RA_RETURN_IF_ERROR(assembler.chunks().ExpectInto(out.which, out.name, *t, sink->second));
        continue;
      }
      // The bytes this request implies are taken at once (no regrowth as chunks arrive).
      if (expected == ExpectedOutputBytes(out, request)) {
        t->mutable_data()->reserve(static_cast<size_t>(expected));
      }
      RA_RETURN_IF_ERROR(assembler.chunks().Expect(out.which, out.name, t, expected));
    }
    total = sent_total + assembler.chunks().expected_bytes();
    return absl::OkStatus();
  };
  absl::Status protocol = absl::OkStatus();
  StreamResponse in;
  while (stream->Read(&in)) {
    protocol = assembler.Add(&in, expect_outputs);
    if (!protocol.ok()) {
      context.TryCancel();
      while (stream->Read(&in)) {
      }
      break;
    }
    if (progress && assembler.chunks().received_bytes() > 0) {
      progress(sent_total + assembler.chunks().received_bytes(), total);
    }
  }
  const grpc::Status status = stream->Finish();
  if (!protocol.ok()) return protocol;
  if (!status.ok()) return FromGrpcStatus(status);
  RA_RETURN_IF_ERROR(assembler.Finish());
  // An output message left without shape and data (a server that moved the data out of an
  // absent tensor) is dropped, so that a streamed response equals the unary one.
  auto* response = assembler.header();
  for (const ComputeTensor& out : rpc.outputs) {
    const v1::Tensor& t = TensorField(*response, out.name);
    if (HasTensorField(*response, out.name) && t.shape_size() == 0 && t.data().empty()) {
      response->GetReflection()->ClearField(response,
                                            response->GetDescriptor()->FindFieldByName(out.name));
    }
  }
  return std::move(*response);
}

bool BetterStreamed(const google::protobuf::Message& request, int64_t max_unary_bytes) {
  const int64_t bytes = static_cast<int64_t>(request.ByteSizeLong());
  if (bytes >= kProtobufMessageLimit || bytes > kStreamAboveBytes) return true;
  return max_unary_bytes > 0 && bytes > max_unary_bytes;
}

}  // namespace

std::string DescribeTensor(const v1::Tensor& tensor) {
  return absl::StrCat("[", absl::StrJoin(tensor.shape(), ", "), "] ",
                      v1::DType_Name(tensor.dtype()));
}

int64_t ExpectedOutputBytes(const ComputeTensor& out, const google::protobuf::Message& request) {
  const v1::Tensor& q = TensorField(request, "q");
  switch (out.kind) {
    case TensorKind::kQ:
      return ExpectedTensorBytes(q);
    case TensorKind::kKv:
      return ExpectedTensorBytes(TensorField(request, "k"));
    case TensorKind::kLse: {
      if (q.shape_size() != 4) return -1;
      v1::Tensor lse;  // [batch, heads, seq] fp32
      lse.set_dtype(v1::DTYPE_FP32);
      for (const int i : {0, 2, 1}) lse.add_shape(q.shape(i));
      return ExpectedTensorBytes(lse);
    }
  }
  return -1;
}

int64_t ExpectedTensorBytes(const v1::Tensor& tensor) {
  if (tensor.shape_size() == 0) return 0;
  const int element = ElementSize(tensor.dtype());
  if (element == 0) return -1;
  int64_t bytes = element;
  for (const int64_t d : tensor.shape()) {
    if (d < 0) return -1;
    if (d != 0 && bytes > std::numeric_limits<int64_t>::max() / d) return -1;
    bytes *= d;
  }
  return bytes;
}

bool NeedsStreaming(const v1::AttendRequest& request, int64_t max_unary_bytes) {
  return BetterStreamed(request, max_unary_bytes);
}

absl::StatusOr<std::string> LoadBearerToken(const std::string& file) {
  if (file.empty()) {
    const char* env = std::getenv(kTokenEnvironmentVariable);
    return std::string(env != nullptr ? env : "");
  }
  std::ifstream in(file);
  std::string line;
  if (!in || !std::getline(in, line)) {
    return absl::InvalidArgumentError(absl::StrCat("--token_file: cannot read ", file));
  }
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
  if (line.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--token_file: ", file, " has no token"));
  }
  return line;
}

absl::StatusOr<std::unique_ptr<AttentionClient>> AttentionClient::Connect(
    const std::string& target, absl::Duration wait_ready, const ClientCredentials& credentials,
    int connections) {
  if (target.empty()) return absl::InvalidArgumentError("target must be host:port, got ''");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(INT_MAX);
  args.SetMaxSendMessageSize(INT_MAX);
  std::shared_ptr<grpc::ChannelCredentials> channel_credentials =
      grpc::InsecureChannelCredentials();
  if (credentials.tls || !credentials.tls_ca.empty()) {
    RA_ASSIGN_OR_RETURN(
        const TlsPem pem,
        ReadTlsFiles({credentials.tls_cert, credentials.tls_key, credentials.tls_ca}, "--tls"));
    channel_credentials = TlsChannelCredentials(pem);
    if (!credentials.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(credentials.tls_server_name);
    }
  } else if (!credentials.tls_cert.empty() || !credentials.tls_key.empty()) {
    return absl::InvalidArgumentError(
        "--tls_cert and --tls_key (a client certificate) need TLS: give --tls_ca or --tls");
  }
  std::vector<std::pair<std::string, std::string>> metadata;
  if (!credentials.token.empty()) {
    metadata.emplace_back("authorization", absl::StrCat("Bearer ", credentials.token));
  }
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int i = 0; i < std::max(1, connections); ++i) {
    grpc::ChannelArguments own = args;
    own.SetInt("ringattn.connection", i);  // a connection of its own, not a shared subchannel
    channels.push_back(ChannelWithMetadata(target, channel_credentials, own, metadata));
    if (i == 0 && wait_ready > absl::ZeroDuration() &&
        !channels[0]->WaitForConnected(DeadlineAfter(wait_ready))) {
      return absl::UnavailableError(absl::StrCat("cannot connect to ", target, " within ",
                                                 absl::FormatDuration(wait_ready)));
    }
  }
  return std::make_unique<AttentionClient>(std::move(channels));
}

AttentionClient::AttentionClient(std::shared_ptr<grpc::Channel> channel)
    : AttentionClient(std::vector<std::shared_ptr<grpc::Channel>>{std::move(channel)}) {}

AttentionClient::AttentionClient(std::vector<std::shared_ptr<grpc::Channel>> channels)
    : channels_(std::move(channels)) {
  for (const auto& c : channels_) stubs_.push_back(v1::AttentionService::NewStub(c));
  stub_ = stubs_[0].get();
}

absl::StatusOr<v1::AttendResponse> AttentionClient::Attend(const v1::AttendRequest& request,
                                                           absl::Duration timeout) {
  const absl::Time call0 = absl::Now();
  return WithClientTimes(
      call0,
      RunUnaryCall(AttendRpc(), *stub_, &v1::AttentionService::Stub::Attend, request, timeout));
}

absl::StatusOr<v1::AttendBackwardResponse> AttentionClient::AttendBackward(
    const v1::AttendBackwardRequest& request, absl::Duration timeout) {
  const absl::Time call0 = absl::Now();
  return WithClientTimes(
      call0, RunUnaryCall(AttendBackwardRpc(), *stub_, &v1::AttentionService::Stub::AttendBackward,
                          request, timeout));
}

absl::StatusOr<v1::AttendResponse> AttentionClient::AttendStreaming(
    const v1::AttendRequest& request, absl::Duration timeout, int64_t chunk_bytes,
    const ProgressFn& progress) {
  const absl::Time call0 = absl::Now();
  return WithClientTimes(
      call0, RunStreamingCall<v1::AttendStreamRequest, v1::AttendStreamResponse>(
                 AttendRpc(), "AttendStream",
                 [this](grpc::ClientContext* context) { return stub_->AttendStream(context); },
                 request, timeout, chunk_bytes, progress));
}

absl::StatusOr<v1::AttendBackwardResponse> AttentionClient::AttendBackwardStreaming(
    const v1::AttendBackwardRequest& request, absl::Duration timeout, int64_t chunk_bytes,
    const ProgressFn& progress) {
  const absl::Time call0 = absl::Now();
  return WithClientTimes(
      call0,
      RunStreamingCall<v1::AttendBackwardStreamRequest, v1::AttendBackwardStreamResponse>(
          AttendBackwardRpc(), "AttendBackwardStream",
          [this](grpc::ClientContext* context) { return stub_->AttendBackwardStream(context); },
          request, timeout, chunk_bytes, progress));
}

absl::StatusOr<v1::AttendResponse> AttentionClient::AttendAuto(const v1::AttendRequest& request,
                                                               absl::Duration timeout,
                                                               int64_t max_unary_bytes,
                                                               int64_t chunk_bytes,
                                                               const ProgressFn& progress) {
  return Auto<v1::AttendStreamRequest, v1::AttendStreamResponse>(
      AttendRpc(), "AttendStream", &v1::AttentionService::Stub::Attend,
      &v1::AttentionService::Stub::AttendStream, request, timeout, max_unary_bytes, chunk_bytes,
      progress);
}

absl::StatusOr<v1::AttendBackwardResponse> AttentionClient::AttendBackwardAuto(
    const v1::AttendBackwardRequest& request, absl::Duration timeout, int64_t max_unary_bytes,
    int64_t chunk_bytes, const ProgressFn& progress) {
  return Auto<v1::AttendBackwardStreamRequest, v1::AttendBackwardStreamResponse>(
      AttendBackwardRpc(), "AttendBackwardStream", &v1::AttentionService::Stub::AttendBackward,
      &v1::AttentionService::Stub::AttendBackwardStream, request, timeout, max_unary_bytes,
      chunk_bytes, progress);
}

template <typename StreamRequest, typename StreamResponse, typename Request, typename Response,
          typename Stream>
absl::StatusOr<Response> AttentionClient::Auto(
    const ComputeRpc& rpc, const char* stream_name,
    grpc::Status (v1::AttentionService::Stub::*unary)(grpc::ClientContext*, const Request&,
                                                      Response*),
    std::unique_ptr<Stream> (v1::AttentionService::Stub::*open)(grpc::ClientContext*),
    const Request& request, absl::Duration timeout, int64_t max_unary_bytes, int64_t chunk_bytes,
    const ProgressFn& progress) {
  if (max_unary_bytes > 0) chunk_bytes = std::min(chunk_bytes, max_unary_bytes);
  const absl::Time call0 = absl::Now();
  // One part's call on connection `i`.
  auto one = [&](size_t i, const Request& part, const ProgressFn& report) {
    v1::AttentionService::Stub& stub = *stubs_[i];
    if (!BetterStreamed(part, max_unary_bytes)) {
      return RunUnaryCall(rpc, stub, unary, part, timeout);
    }
    return RunStreamingCall<StreamRequest, StreamResponse>(
        rpc, stream_name, [&stub, open](grpc::ClientContext* c) { return (stub.*open)(c); }, part,
        timeout, chunk_bytes, report);
  };
  const int parts = static_cast<int64_t>(request.ByteSizeLong()) > split_above_bytes_
                        ? HeadParts(rpc, request, static_cast<int>(stubs_.size()))
                        : 1;
  if (parts == 1) return WithClientTimes(call0, one(0, request, progress));
  // The parts' chunks are cut from the request's tensors and land in the whole answer's
  // (strided views: no copy of either beside the messages').
  RA_ASSIGN_OR_RETURN(std::vector<std::unique_ptr<google::protobuf::Message>> headers,
                      SplitHeaders(rpc, request, parts));
  std::vector<std::string> outs(rpc.outputs.size());
  for (size_t i = 0; i < rpc.outputs.size(); ++i) {
    if (Wants(request, rpc.outputs[i])) {
      outs[i].resize(static_cast<size_t>(ExpectedOutputBytes(rpc.outputs[i], request)));
    }
  }
  std::vector<absl::StatusOr<Response>> answers(parts, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int p = 0; p < parts; ++p) {
    threads.emplace_back([&, p] {
      std::vector<ChunkCursor::Source> inputs;
      for (const ComputeTensor& in : rpc.inputs) {
        char* base = const_cast<char*>(TensorField(request, in.name).data().data());
        inputs.push_back({in.which, {}, HeadRows(in, request, base, p, parts)});
      }
      std::map<std::string, StridedRows> sinks;
      for (size_t i = 0; i < rpc.outputs.size(); ++i) {
        if (outs[i].empty()) continue;
        sinks.emplace(rpc.outputs[i].name,
                      HeadRows(rpc.outputs[i], request, outs[i].data(), p, parts));
      }
      v1::AttentionService::Stub& stub = *stubs_[static_cast<size_t>(p)];
      answers[p] = RunStreamingCall<StreamRequest, StreamResponse>(
          rpc, stream_name, [&stub, open](grpc::ClientContext* c) { return (stub.*open)(c); },
          static_cast<const Request&>(*headers[p]), timeout, chunk_bytes, nullptr,
          std::move(inputs), sinks);
    });
  }
  for (std::thread& t : threads) t.join();
  std::vector<const google::protobuf::Message*> done;
  for (const absl::StatusOr<Response>& a : answers) {
    if (!a.ok()) return a.status();
    done.push_back(&*a);
  }
  Response whole;
  RA_RETURN_IF_ERROR(JoinHeaders(rpc, done, &whole));
  for (size_t i = 0; i < rpc.outputs.size(); ++i) {
    if (!outs[i].empty() && HasTensorField(whole, rpc.outputs[i].name)) {
      *MutableTensorField(&whole, rpc.outputs[i].name)->mutable_data() = std::move(outs[i]);
    }
  }
  return WithClientTimes(call0, absl::StatusOr<Response>(std::move(whole)));
}

absl::StatusOr<v1::InfoResponse> AttentionClient::GetInfo(absl::Duration timeout) {
  return RunPlainCall(*stub_, &v1::AttentionService::Stub::GetInfo, v1::InfoRequest(), timeout);
}

absl::Status AttentionClient::RegisterSystemSharedMemory(const std::string& name,
                                                         const std::string& key, int64_t offset,
                                                         int64_t byte_size,
                                                         absl::Duration timeout) {
  v1::RegisterSystemSharedMemoryRequest request;
  request.set_name(name);
  request.set_key(key);
  request.set_offset(offset);
  request.set_byte_size(byte_size);
  return RunPlainCall(*stub_, &v1::AttentionService::Stub::RegisterSystemSharedMemory, request,
                      timeout)
      .status();
}

absl::Status AttentionClient::UnregisterSystemSharedMemory(const std::string& name,
                                                           absl::Duration timeout) {
  v1::UnregisterSystemSharedMemoryRequest request;
  request.set_name(name);
  return RunPlainCall(*stub_, &v1::AttentionService::Stub::UnregisterSystemSharedMemory, request,
                      timeout)
      .status();
}

absl::StatusOr<std::vector<v1::SystemSharedMemoryRegion>> AttentionClient::SystemSharedMemoryStatus(
    const std::string& name, absl::Duration timeout) {
  v1::SystemSharedMemoryStatusRequest request;
  request.set_name(name);
  RA_ASSIGN_OR_RETURN(const v1::SystemSharedMemoryStatusResponse response,
                      RunPlainCall(*stub_, &v1::AttentionService::Stub::SystemSharedMemoryStatus,
                                   request, timeout));
  return std::vector<v1::SystemSharedMemoryRegion>(response.regions().begin(),
                                                   response.regions().end());
}

absl::Status AttentionClient::RegisterCudaSharedMemory(const std::string& name,
                                                       const std::string& raw_handle,
                                                       int device_id, int64_t byte_size,
                                                       absl::Duration timeout) {
  v1::RegisterCudaSharedMemoryRequest request;
  request.set_name(name);
  request.set_raw_handle(raw_handle);
  request.set_device_id(device_id);
  request.set_byte_size(byte_size);
  return RunPlainCall(*stub_, &v1::AttentionService::Stub::RegisterCudaSharedMemory, request,
                      timeout)
      .status();
}

absl::Status AttentionClient::UnregisterCudaSharedMemory(const std::string& name,
                                                         absl::Duration timeout) {
  v1::UnregisterCudaSharedMemoryRequest request;
  request.set_name(name);
  return RunPlainCall(*stub_, &v1::AttentionService::Stub::UnregisterCudaSharedMemory, request,
                      timeout)
      .status();
}

absl::StatusOr<std::vector<v1::CudaSharedMemoryRegion>> AttentionClient::CudaSharedMemoryStatus(
    const std::string& name, absl::Duration timeout) {
  v1::CudaSharedMemoryStatusRequest request;
  request.set_name(name);
  RA_ASSIGN_OR_RETURN(const v1::CudaSharedMemoryStatusResponse response,
                      RunPlainCall(*stub_, &v1::AttentionService::Stub::CudaSharedMemoryStatus,
                                   request, timeout));
  return std::vector<v1::CudaSharedMemoryRegion>(response.regions().begin(),
                                                 response.regions().end());
}

absl::StatusOr<ConnectedClient> ConnectAndGetInfo(const std::string& target, absl::Duration timeout,
                                                  const ClientCredentials& credentials,
                                                  int connections) {
  ConnectedClient c;
  RA_ASSIGN_OR_RETURN(c.client,
                      AttentionClient::Connect(target, timeout, credentials, connections));
  RA_ASSIGN_OR_RETURN(c.info, c.client->GetInfo(timeout));
  return c;
}

}  // namespace ringattn
