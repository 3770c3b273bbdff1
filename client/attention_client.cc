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
#include <initializer_list>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "proto/convert.h"

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

std::string ShapeString(const v1::Tensor& tensor) {
  return absl::StrCat("[", absl::StrJoin(tensor.shape(), ", "), "] ",
                      v1::DType_Name(tensor.dtype()));
}

// Checks that out and lse hold the bytes their shapes imply.
// Every tensor's data has the size its dtype and shape imply; INTERNAL naming it if not.
absl::Status CheckTensorSizes(
    std::initializer_list<std::pair<const char*, const v1::Tensor*>> tensors) {
  for (const auto& [name, tensor] : tensors) {
    const int64_t expected = ExpectedTensorBytes(*tensor);
    if (expected < 0) {
      return absl::InternalError(
          absl::StrCat("response ", name, " has an invalid dtype or shape ", ShapeString(*tensor)));
    }
    if (static_cast<int64_t>(tensor->data().size()) != expected) {
      return absl::InternalError(absl::StrCat("response ", name, " has ", tensor->data().size(),
                                              " bytes; its shape ", ShapeString(*tensor), " needs ",
                                              expected));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckResponseTensors(const v1::AttendResponse& response) {
  return CheckTensorSizes({{"out", &response.out()}, {"lse", &response.lse()}});
}

// The request without tensor data: what AttendStream's header carries. Every field of
// AttendRequest but the tensors' data is copied; a field added to the message must be added here.
v1::AttendRequest StreamHeader(const v1::AttendRequest& request) {
  v1::AttendRequest header;
  header.set_request_id(request.request_id());
  if (request.has_options()) *header.mutable_options() = request.options();
  header.set_layout(request.layout());
  header.set_return_lse(request.return_lse());
  const std::pair<const v1::Tensor*, v1::Tensor*> tensors[] = {{&request.q(), header.mutable_q()},
                                                               {&request.k(), header.mutable_k()},
                                                               {&request.v(), header.mutable_v()}};
  for (const auto& [from, to] : tensors) {
    to->set_dtype(from->dtype());
    *to->mutable_shape() = from->shape();
  }
  return header;
}

// Response bytes to expect before the response header says: out as large as q, and the fp32
// lse [batch, heads, seq] when asked for.
int64_t EstimatedResponseBytes(const v1::AttendRequest& request) {
  int64_t bytes = static_cast<int64_t>(request.q().data().size());
  if (request.return_lse() && request.q().shape_size() == 4) {
    bytes += 4 * request.q().shape(0) * request.q().shape(1) * request.q().shape(2);
  }
  return bytes;
}

// The two streaming calls, as StreamAssembler and RunStreamingCall see them: message types,
// the tensors the response carries in chunks, and the call's name for errors.
struct ForwardStream {
  using Request = v1::AttendRequest;
  using Response = v1::AttendResponse;
  using StreamRequest = v1::AttendStreamRequest;
  using StreamResponse = v1::AttendStreamResponse;
  static constexpr const char* kCall = "AttendStream";
  static constexpr int kOutputs = 2;
  static constexpr v1::TensorChunk::Which kWhich[kOutputs] = {v1::TensorChunk::WHICH_OUT,
                                                              v1::TensorChunk::WHICH_LSE};
  static constexpr const char* kNames[kOutputs] = {"out", "lse"};
  static v1::Tensor* Output(Response* r, int i) {
    return i == 0 ? r->mutable_out() : r->mutable_lse();
  }
  // A server that moves the data out of an AttendResponse leaves an empty lse message behind;
  // dropped so that a streamed response equals the unary one.
  static void Tidy(Response* r) {
    if (r->has_lse() && r->lse().shape_size() == 0 && r->lse().data().empty()) r->clear_lse();
  }
};

struct BackwardStream {
  using Request = v1::AttendBackwardRequest;
  using Response = v1::AttendBackwardResponse;
  using StreamRequest = v1::AttendBackwardStreamRequest;
  using StreamResponse = v1::AttendBackwardStreamResponse;
  static constexpr const char* kCall = "AttendBackwardStream";
  static constexpr int kOutputs = 3;
  static constexpr v1::TensorChunk::Which kWhich[kOutputs] = {
      v1::TensorChunk::WHICH_DQ, v1::TensorChunk::WHICH_DK, v1::TensorChunk::WHICH_DV};
  static constexpr const char* kNames[kOutputs] = {"dq", "dk", "dv"};
  static v1::Tensor* Output(Response* r, int i) {
    return i == 0 ? r->mutable_dq() : i == 1 ? r->mutable_dk() : r->mutable_dv();
  }
  static void Tidy(Response*) {}
};

// Builds the response from the messages of a streamed answer: the header, then the chunks of
// each output tensor, each tensor's chunks contiguous and in order.
template <typename S>
class StreamAssembler {
 public:
  absl::Status Add(typename S::StreamResponse* message) {
    if (message->has_header()) return AddHeader(message->mutable_header());
    if (message->has_chunk()) return AddChunk(message->chunk());
    return absl::InternalError(absl::StrCat(S::kCall, " answered with an empty message"));
  }

  bool has_header() const { return has_header_; }
  int64_t expected_bytes() const {
    int64_t sum = 0;
    for (int64_t e : expected_) sum += e;
    return sum;
  }
  int64_t received_bytes() const { return received_; }

  // The assembled response; INTERNAL when the stream ended before it was complete.
  absl::StatusOr<typename S::Response> Finish() {
    if (!has_header_) {
      return absl::InternalError(absl::StrCat(S::kCall, " ended without a response header"));
    }
    for (int i = 0; i < S::kOutputs; ++i) {
      const v1::Tensor* t = S::Output(&response_, i);
      const int64_t got = static_cast<int64_t>(t->data().size());
      if (got != expected_[i]) {
        return absl::InternalError(absl::StrCat(S::kCall, " response incomplete: ", S::kNames[i],
                                                " has ", got, " of the ", expected_[i],
                                                " bytes its shape ", ShapeString(*t), " needs"));
      }
    }
    S::Tidy(&response_);
    return std::move(response_);
  }

 private:
  absl::Status AddHeader(typename S::Response* header) {
    if (has_header_) {
      return absl::InternalError(absl::StrCat(S::kCall, " answered with a second header"));
    }
    response_ = std::move(*header);
    has_header_ = true;
    for (int i = 0; i < S::kOutputs; ++i) {
      v1::Tensor* t = S::Output(&response_, i);
      expected_[i] = ExpectedTensorBytes(*t);
      if (expected_[i] < 0) {
        return absl::InternalError(absl::StrCat(S::kCall, " response header: ", S::kNames[i],
                                                " has an invalid dtype or shape ",
                                                ShapeString(*t)));
      }
      if (!t->data().empty()) {
        return absl::InternalError(absl::StrCat(S::kCall, " response header carries ",
                                                t->data().size(), " bytes of ", S::kNames[i],
                                                " data; tensor bytes must come as chunks"));
      }
      t->mutable_data()->reserve(static_cast<size_t>(expected_[i]));
    }
    return absl::OkStatus();
  }

  absl::Status AddChunk(const v1::TensorChunk& chunk) {
    if (!has_header_) {
      return absl::InternalError(
          absl::StrCat(S::kCall, " answered with a chunk before the header"));
    }
    int i = 0;
    while (i < S::kOutputs && S::kWhich[i] != chunk.tensor()) ++i;
    if (i == S::kOutputs) {
      std::string expected;
      for (int j = 0; j < S::kOutputs; ++j) {
        absl::StrAppend(&expected, j == 0 ? "" : " or ", v1::TensorChunk::Which_Name(S::kWhich[j]));
      }
      return absl::InternalError(absl::StrCat(S::kCall, " response chunk for tensor ",
                                              v1::TensorChunk::Which_Name(chunk.tensor()),
                                              "; expected ", expected));
    }
    v1::Tensor* t = S::Output(&response_, i);
    std::string* data = t->mutable_data();
    if (chunk.offset() != static_cast<int64_t>(data->size())) {
      return absl::InternalError(
          absl::StrCat(S::kCall, " response: ", S::kNames[i], " chunk at offset ", chunk.offset(),
                       ", expected ", data->size(), " (chunks must be contiguous and in order)"));
    }
    if (static_cast<int64_t>(data->size() + chunk.data().size()) > expected_[i]) {
      return absl::InternalError(
          absl::StrCat(S::kCall, " response: ", S::kNames[i], " chunks exceed the ", expected_[i],
                       " bytes of its shape ", ShapeString(*t), " (chunk at offset ",
                       chunk.offset(), " of ", chunk.data().size(), " bytes)"));
    }
    data->append(chunk.data());
    received_ += static_cast<int64_t>(chunk.data().size());
    return absl::OkStatus();
  }

  bool has_header_ = false;
  typename S::Response response_;
  int64_t expected_[S::kOutputs] = {};
  int64_t received_ = 0;
};

// One streamed call: the header, then each input's bytes in chunks of at most chunk_bytes; then
// the answer assembled. `open` starts the call on a context. `estimated_response_bytes` sizes
// the progress total until the response header tells.
template <typename S, typename Open>
absl::StatusOr<typename S::Response> RunStreamingCall(
    const Open& open, const typename S::Request& header,
    absl::Span<const std::pair<v1::TensorChunk::Which, const std::string*>> inputs,
    int64_t estimated_response_bytes, absl::Duration timeout, int64_t chunk_bytes,
    const ProgressFn& progress) {
  if (chunk_bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("chunk_bytes must be > 0, got ", chunk_bytes));
  }
  grpc::ClientContext context;
  SetTimeout(timeout, &context);
  auto stream = open(&context);
  int64_t sent_total = 0;
  for (const auto& input : inputs) sent_total += static_cast<int64_t>(input.second->size());
  int64_t total = sent_total + estimated_response_bytes;
  int64_t done = 0;

  // Send: the header, then the inputs in chunks. A failed write means the server has ended the
  // call (its status comes from Finish).
  bool writing;
  {
    typename S::StreamRequest message;
    *message.mutable_header() = header;
    writing = stream->Write(message);
  }
  for (const auto& [which, data] : inputs) {
    const int64_t size = static_cast<int64_t>(data->size());
    for (int64_t offset = 0; writing && offset < size; offset += chunk_bytes) {
      const int64_t n = std::min(chunk_bytes, size - offset);
      typename S::StreamRequest message;
      v1::TensorChunk* chunk = message.mutable_chunk();
      chunk->set_tensor(which);
      chunk->set_offset(offset);
      chunk->set_data(data->data() + offset, static_cast<size_t>(n));
      writing = stream->Write(message);
      if (writing) {
        done += n;
        if (progress) progress(done, total);
      }
    }
  }
  if (writing) stream->WritesDone();

  // Receive: the response header, then the outputs' chunks.
  StreamAssembler<S> assembler;
  absl::Status protocol = absl::OkStatus();
  typename S::StreamResponse message;
  while (stream->Read(&message)) {
    protocol = assembler.Add(&message);
    if (!protocol.ok()) {
      context.TryCancel();
      while (stream->Read(&message)) {
      }
      break;
    }
    if (assembler.has_header()) total = sent_total + assembler.expected_bytes();
    if (progress && assembler.received_bytes() > 0) {
      progress(sent_total + assembler.received_bytes(), total);
    }
  }
  const grpc::Status status = stream->Finish();
  if (!protocol.ok()) return protocol;
  if (!status.ok()) return FromGrpcStatus(status);
  return assembler.Finish();
}

// The backward request without tensor data: AttendBackwardStream's header. Every field but the
// tensors' data is copied; a field added to the message must be added here.
v1::AttendBackwardRequest BackwardStreamHeader(const v1::AttendBackwardRequest& request) {
  v1::AttendBackwardRequest header = request;
  for (v1::Tensor* t : {header.mutable_q(), header.mutable_k(), header.mutable_v(),
                        header.mutable_out(), header.mutable_dout(), header.mutable_lse()}) {
    t->clear_data();
  }
  if (!request.has_out()) header.clear_out();
  if (!request.has_dout()) header.clear_dout();
  if (!request.has_lse()) header.clear_lse();
  if (!request.has_q()) header.clear_q();
  if (!request.has_k()) header.clear_k();
  if (!request.has_v()) header.clear_v();
  return header;
}

}  // namespace

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
  const int64_t bytes = static_cast<int64_t>(request.ByteSizeLong());
  if (bytes >= kProtobufMessageLimit) return true;
  return max_unary_bytes > 0 && bytes > max_unary_bytes;
}

absl::StatusOr<std::unique_ptr<AttentionClient>> AttentionClient::Connect(
    const std::string& target, absl::Duration wait_ready) {
  if (target.empty()) return absl::InvalidArgumentError("target must be host:port, got ''");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(INT_MAX);
  args.SetMaxSendMessageSize(INT_MAX);
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  if (wait_ready > absl::ZeroDuration() && !channel->WaitForConnected(DeadlineAfter(wait_ready))) {
    return absl::UnavailableError(
        absl::StrCat("cannot connect to ", target, " within ", absl::FormatDuration(wait_ready)));
  }
  return std::make_unique<AttentionClient>(std::move(channel));
}

AttentionClient::AttentionClient(std::shared_ptr<grpc::Channel> channel)
    : channel_(std::move(channel)), stub_(v1::AttentionService::NewStub(channel_)) {}

absl::StatusOr<v1::AttendResponse> AttentionClient::Attend(const v1::AttendRequest& request,
                                                           absl::Duration timeout) {
  grpc::ClientContext context;
  SetTimeout(timeout, &context);
  v1::AttendResponse response;
  const grpc::Status status = stub_->Attend(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  if (absl::Status s = CheckResponseTensors(response); !s.ok()) return s;
  return response;
}

absl::StatusOr<v1::AttendBackwardResponse> AttentionClient::AttendBackward(
    const v1::AttendBackwardRequest& request, absl::Duration timeout) {
  grpc::ClientContext context;
  SetTimeout(timeout, &context);
  v1::AttendBackwardResponse response;
  const grpc::Status status = stub_->AttendBackward(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  if (absl::Status s = CheckTensorSizes(
          {{"dq", &response.dq()}, {"dk", &response.dk()}, {"dv", &response.dv()}});
      !s.ok()) {
    return s;
  }
  return response;
}

absl::StatusOr<v1::AttendResponse> AttentionClient::AttendStreaming(
    const v1::AttendRequest& request, absl::Duration timeout, int64_t chunk_bytes,
    const ProgressFn& progress) {
  const std::pair<v1::TensorChunk::Which, const std::string*> inputs[] = {
      {v1::TensorChunk::WHICH_Q, &request.q().data()},
      {v1::TensorChunk::WHICH_K, &request.k().data()},
      {v1::TensorChunk::WHICH_V, &request.v().data()}};
  return RunStreamingCall<ForwardStream>(
      [this](grpc::ClientContext* context) { return stub_->AttendStream(context); },
      StreamHeader(request), inputs, EstimatedResponseBytes(request), timeout, chunk_bytes,
      progress);
}

absl::StatusOr<v1::AttendBackwardResponse> AttentionClient::AttendBackwardStreaming(
    const v1::AttendBackwardRequest& request, absl::Duration timeout, int64_t chunk_bytes,
    const ProgressFn& progress) {
  const std::pair<v1::TensorChunk::Which, const std::string*> inputs[] = {
      {v1::TensorChunk::WHICH_Q, &request.q().data()},
      {v1::TensorChunk::WHICH_K, &request.k().data()},
      {v1::TensorChunk::WHICH_V, &request.v().data()},
      {v1::TensorChunk::WHICH_OUT, &request.out().data()},
      {v1::TensorChunk::WHICH_DOUT, &request.dout().data()},
      {v1::TensorChunk::WHICH_LSE, &request.lse().data()}};
  // dq like q, dk and dv like k and v.
  const int64_t estimated =
      static_cast<int64_t>(request.q().data().size() + 2 * request.k().data().size());
  return RunStreamingCall<BackwardStream>(
      [this](grpc::ClientContext* context) { return stub_->AttendBackwardStream(context); },
      BackwardStreamHeader(request), inputs, estimated, timeout, chunk_bytes, progress);
}

absl::StatusOr<v1::AttendBackwardResponse> AttentionClient::AttendBackwardAuto(
    const v1::AttendBackwardRequest& request, absl::Duration timeout, int64_t max_unary_bytes,
    int64_t chunk_bytes, const ProgressFn& progress) {
  const int64_t bytes = static_cast<int64_t>(request.ByteSizeLong());
  const bool streaming =
      bytes >= kProtobufMessageLimit || (max_unary_bytes > 0 && bytes > max_unary_bytes);
  if (!streaming) return AttendBackward(request, timeout);
  if (max_unary_bytes > 0) chunk_bytes = std::min(chunk_bytes, max_unary_bytes);
  return AttendBackwardStreaming(request, timeout, chunk_bytes, progress);
}

absl::StatusOr<v1::AttendResponse> AttentionClient::AttendAuto(const v1::AttendRequest& request,
                                                               absl::Duration timeout,
                                                               int64_t max_unary_bytes,
                                                               int64_t chunk_bytes,
                                                               const ProgressFn& progress) {
  if (!NeedsStreaming(request, max_unary_bytes)) return Attend(request, timeout);
  if (max_unary_bytes > 0) chunk_bytes = std::min(chunk_bytes, max_unary_bytes);
  return AttendStreaming(request, timeout, chunk_bytes, progress);
}

absl::StatusOr<v1::InfoResponse> AttentionClient::GetInfo(absl::Duration timeout) {
  grpc::ClientContext context;
  SetTimeout(timeout, &context);
  v1::InfoResponse response;
  const grpc::Status status = stub_->GetInfo(&context, v1::InfoRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

}  // namespace ringattn
