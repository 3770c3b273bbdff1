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

// Builds the AttendResponse from the messages of an AttendStream answer: the header, then the
// chunks of out and lse, each tensor's chunks contiguous and in order.
class ResponseAssembler {
 public:
  absl::Status Add(v1::AttendStreamResponse* message) {
    switch (message->part_case()) {
      case v1::AttendStreamResponse::kHeader:
        return AddHeader(message->mutable_header());
      case v1::AttendStreamResponse::kChunk:
        return AddChunk(message->chunk());
      default:
        return absl::InternalError("AttendStream answered with an empty message");
    }
  }

  bool has_header() const { return has_header_; }
  int64_t expected_bytes() const { return expected_[0] + expected_[1]; }
  int64_t received_bytes() const {
    return static_cast<int64_t>(response_.out().data().size() + response_.lse().data().size());
  }

  // The assembled response; INTERNAL when the stream ended before it was complete.
  absl::StatusOr<v1::AttendResponse> Finish() {
    if (!has_header_) return absl::InternalError("AttendStream ended without a response header");
    for (int i = 0; i < 2; ++i) {
      const int64_t got = static_cast<int64_t>(Tensor(i)->data().size());
      if (got != expected_[i]) {
        return absl::InternalError(
            absl::StrCat("AttendStream response incomplete: ", kNames[i], " has ", got, " of the ",
                         expected_[i], " bytes its shape ", ShapeString(*Tensor(i)), " needs"));
      }
    }
    // A server that moves the data out of an AttendResponse leaves an empty lse message
    // behind; drop it so that a streamed response equals the unary one.
    if (response_.has_lse() && response_.lse().shape_size() == 0 &&
        response_.lse().data().empty()) {
      response_.clear_lse();
    }
    return std::move(response_);
  }

 private:
  static constexpr const char* kNames[2] = {"out", "lse"};

  v1::Tensor* Tensor(int i) { return i == 0 ? response_.mutable_out() : response_.mutable_lse(); }

  absl::Status AddHeader(v1::AttendResponse* header) {
    if (has_header_) return absl::InternalError("AttendStream answered with a second header");
    response_ = std::move(*header);
    has_header_ = true;
    for (int i = 0; i < 2; ++i) {
      v1::Tensor* t = Tensor(i);
      expected_[i] = ExpectedTensorBytes(*t);
      if (expected_[i] < 0) {
        return absl::InternalError(absl::StrCat("AttendStream response header: ", kNames[i],
                                                " has an invalid dtype or shape ",
                                                ShapeString(*t)));
      }
      if (!t->data().empty()) {
        return absl::InternalError(absl::StrCat("AttendStream response header carries ",
                                                t->data().size(), " bytes of ", kNames[i],
                                                " data; tensor bytes must come as chunks"));
      }
      t->mutable_data()->reserve(static_cast<size_t>(expected_[i]));
    }
    return absl::OkStatus();
  }

  absl::Status AddChunk(const v1::TensorChunk& chunk) {
    if (!has_header_) {
      return absl::InternalError("AttendStream answered with a chunk before the header");
    }
    int i;
    if (chunk.tensor() == v1::TensorChunk::WHICH_OUT) {
      i = 0;
    } else if (chunk.tensor() == v1::TensorChunk::WHICH_LSE) {
      i = 1;
    } else {
      return absl::InternalError(absl::StrCat("AttendStream response chunk for tensor ",
                                              v1::TensorChunk::Which_Name(chunk.tensor()),
                                              "; expected WHICH_OUT or WHICH_LSE"));
    }
    std::string* data = Tensor(i)->mutable_data();
    if (chunk.offset() != static_cast<int64_t>(data->size())) {
      return absl::InternalError(
          absl::StrCat("AttendStream response: ", kNames[i], " chunk at offset ", chunk.offset(),
                       ", expected ", data->size(), " (chunks must be contiguous and in order)"));
    }
    if (static_cast<int64_t>(data->size() + chunk.data().size()) > expected_[i]) {
      return absl::InternalError(
          absl::StrCat("AttendStream response: ", kNames[i], " chunks exceed the ", expected_[i],
                       " bytes of its shape ", ShapeString(*Tensor(i)), " (chunk at offset ",
                       chunk.offset(), " of ", chunk.data().size(), " bytes)"));
    }
    data->append(chunk.data());
    return absl::OkStatus();
  }

  bool has_header_ = false;
  v1::AttendResponse response_;
  int64_t expected_[2] = {0, 0};  // bytes of out and lse
};

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
  if (chunk_bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("chunk_bytes must be > 0, got ", chunk_bytes));
  }
  grpc::ClientContext context;
  SetTimeout(timeout, &context);
  std::unique_ptr<grpc::ClientReaderWriter<v1::AttendStreamRequest, v1::AttendStreamResponse>>
      stream = stub_->AttendStream(&context);

  const std::pair<v1::TensorChunk::Which, const std::string*> inputs[] = {
      {v1::TensorChunk::WHICH_Q, &request.q().data()},
      {v1::TensorChunk::WHICH_K, &request.k().data()},
      {v1::TensorChunk::WHICH_V, &request.v().data()}};
  int64_t sent_total = 0;
  for (const auto& input : inputs) sent_total += static_cast<int64_t>(input.second->size());
  int64_t total = sent_total + EstimatedResponseBytes(request);
  int64_t done = 0;

  // Send: the header, then q, k and v in chunks. A failed write means the server has ended the
  // call (its status comes from Finish).
  bool writing;
  {
    v1::AttendStreamRequest message;
    *message.mutable_header() = StreamHeader(request);
    writing = stream->Write(message);
  }
  for (const auto& [which, data] : inputs) {
    const int64_t size = static_cast<int64_t>(data->size());
    for (int64_t offset = 0; writing && offset < size; offset += chunk_bytes) {
      const int64_t n = std::min(chunk_bytes, size - offset);
      v1::AttendStreamRequest message;
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

  // Receive: the response header, then the chunks of out and lse.
  ResponseAssembler assembler;
  absl::Status protocol = absl::OkStatus();
  v1::AttendStreamResponse message;
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
