#include "proto/compute_rpcs.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "proto/convert.h"

namespace ringattn {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using Async = v1::WorkerService::StubInterface::async_interface;

// The worker method `Method` of request type Req and response type Resp as a ShardCall.
template <typename Req, typename Resp,
          void (Async::*Method)(grpc::ClientContext*, const Req*, Resp*,
                                std::function<void(grpc::Status)>)>
void CallWorker(v1::WorkerService::StubInterface* stub, grpc::ClientContext* context,
                const Message& request, Message* response, std::function<void(grpc::Status)> done) {
  (stub->async()->*Method)(context, static_cast<const Req*>(&request), static_cast<Resp*>(response),
                           std::move(done));
}

constexpr ComputeTensor kAttendInputs[] = {
    {"q", v1::TensorChunk::WHICH_Q, TensorKind::kQ},
    {"k", v1::TensorChunk::WHICH_K, TensorKind::kKv},
    {"v", v1::TensorChunk::WHICH_V, TensorKind::kKv},
};
constexpr ComputeTensor kAttendOutputs[] = {
    {"out", v1::TensorChunk::WHICH_OUT, TensorKind::kQ},
    {"lse", v1::TensorChunk::WHICH_LSE, TensorKind::kLse, "return_lse"},
};

constexpr ComputeTensor kBackwardInputs[] = {
    {"q", v1::TensorChunk::WHICH_Q, TensorKind::kQ},
    {"k", v1::TensorChunk::WHICH_K, TensorKind::kKv},
    {"v", v1::TensorChunk::WHICH_V, TensorKind::kKv},
    {"out", v1::TensorChunk::WHICH_OUT, TensorKind::kQ},
    {"dout", v1::TensorChunk::WHICH_DOUT, TensorKind::kQ},
    {"lse", v1::TensorChunk::WHICH_LSE, TensorKind::kLse},
};
constexpr ComputeTensor kBackwardOutputs[] = {
    {"dq", v1::TensorChunk::WHICH_DQ, TensorKind::kQ},
    {"dk", v1::TensorChunk::WHICH_DK, TensorKind::kKv},
    {"dv", v1::TensorChunk::WHICH_DV, TensorKind::kKv},
};

// The field `name` of `m`, which the naming contract says exists.
const FieldDescriptor* Field(const Message& m, std::string_view name) {
  const FieldDescriptor* f = m.GetDescriptor()->FindFieldByName(std::string(name));
  if (f == nullptr) {
    std::fprintf(stderr, "compute_rpcs: %s has no field '%.*s'\n",
                 m.GetDescriptor()->full_name().c_str(), static_cast<int>(name.size()),
                 name.data());
    std::abort();
  }
  return f;
}

}  // namespace

RowView RowsOf(TensorKind kind, const AttentionShape& s) {
  switch (kind) {
    case TensorKind::kQ:
      return {s.batch, static_cast<size_t>(s.q_row_elems()) * s.elem_bytes()};
    case TensorKind::kKv:
      return {s.batch, static_cast<size_t>(s.kv_row_elems()) * s.elem_bytes()};
    case TensorKind::kLse:
      return {int64_t{s.batch} * s.heads, sizeof(float)};
  }
  return {};
}

size_t BytesOf(TensorKind kind, const AttentionShape& s) {
  const RowView v = RowsOf(kind, s);
  return static_cast<size_t>(v.outer) * static_cast<size_t>(s.seqlen_q) * v.row_bytes;
}

std::vector<int64_t> DimsOf(TensorKind kind, const AttentionShape& s) {
  switch (kind) {
    case TensorKind::kQ:
      return {s.batch, s.seqlen_q, s.heads, s.head_dim};
    case TensorKind::kKv:
      return {s.batch, s.seqlen_q, s.heads_k, s.head_dim};
    case TensorKind::kLse:
      return {s.batch, s.heads, s.seqlen_q};
  }
  return {};
}

v1::DType DTypeOf(TensorKind kind, const AttentionShape& s) {
  return kind == TensorKind::kLse ? v1::DTYPE_FP32 : DTypeToProto(s.dtype);
}

std::string DescribeRows(TensorKind kind, const AttentionShape& s) {
  switch (kind) {
    case TensorKind::kQ:
    case TensorKind::kKv:
      return absl::StrCat("[batch=", s.batch, ", rows=", s.seqlen_q,
                          kind == TensorKind::kQ ? ", heads=" : ", heads_k=",
                          kind == TensorKind::kQ ? s.heads : s.heads_k, ", head_dim=", s.head_dim,
                          "] ", std::string(DTypeName(s.dtype)));
    case TensorKind::kLse:
      return absl::StrCat("[batch=", s.batch, ", heads=", s.heads, ", rows=", s.seqlen_q, "] fp32");
  }
  return "";
}

const ComputeRpc& AttendRpc() {
  static const ComputeRpc rpc = {
      "Attend",
      kAttendInputs,
      kAttendOutputs,
      &v1::RunShardRequest::default_instance(),
      &v1::RunShardResponse::default_instance(),
      &CallWorker<v1::RunShardRequest, v1::RunShardResponse, &Async::RunShard>};
  return rpc;
}

const ComputeRpc& AttendBackwardRpc() {
  static const ComputeRpc rpc = {
      "AttendBackward",
      kBackwardInputs,
      kBackwardOutputs,
      &v1::RunShardBackwardRequest::default_instance(),
      &v1::RunShardBackwardResponse::default_instance(),
      &CallWorker<v1::RunShardBackwardRequest, v1::RunShardBackwardResponse,
                  &Async::RunShardBackward>};
  return rpc;
}

absl::Span<const ComputeRpc* const> ComputeRpcs() {
  static const ComputeRpc* const rpcs[] = {&AttendRpc(), &AttendBackwardRpc()};
  return rpcs;
}

const ComputeRpc& FindComputeRpc(std::string_view name) {
  for (const ComputeRpc* rpc : ComputeRpcs()) {
    if (rpc->name == name) return *rpc;
  }
  std::fprintf(stderr, "FindComputeRpc: no compute RPC named '%.*s'\n",
               static_cast<int>(name.size()), name.data());
  std::abort();  // a programming error: callers name tables that exist (proto_test checks them)
}

bool Wants(const Message& request, const ComputeTensor& output) {
  return output.wanted_if == nullptr || BoolField(request, output.wanted_if);
}

std::vector<std::pair<std::string, v1::SharedMemoryRef>> OutputShm(const Message& request) {
  // A map field is, to reflection, a repeated message of {key = 1, value = 2} entries.
  const google::protobuf::FieldDescriptor* map = Field(request, "output_shm");
  const google::protobuf::Reflection* refl = request.GetReflection();
  std::vector<std::pair<std::string, v1::SharedMemoryRef>> out;
  for (int i = 0; i < refl->FieldSize(request, map); ++i) {
    const Message& entry = refl->GetRepeatedMessage(request, map, i);
    const google::protobuf::Reflection* e = entry.GetReflection();
    const google::protobuf::Descriptor* d = entry.GetDescriptor();
    out.emplace_back(e->GetString(entry, d->FindFieldByNumber(1)),
                     static_cast<const v1::SharedMemoryRef&>(
                         e->GetMessage(entry, d->FindFieldByNumber(2))));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  return out;
}

const v1::Tensor& TensorField(const Message& m, std::string_view name) {
  return static_cast<const v1::Tensor&>(m.GetReflection()->GetMessage(m, Field(m, name)));
}

v1::Tensor* MutableTensorField(Message* m, std::string_view name) {
  return static_cast<v1::Tensor*>(m->GetReflection()->MutableMessage(m, Field(*m, name)));
}

bool HasTensorField(const Message& m, std::string_view name) {
  return m.GetReflection()->HasField(m, Field(m, name));
}

const std::string& BytesField(const Message& m, std::string_view name) {
  std::string scratch;  // unused: a generated message returns its bytes field in place
  return m.GetReflection()->GetStringReference(m, Field(m, name), &scratch);
}

void SetBytesField(Message* m, std::string_view name, std::string value) {
  m->GetReflection()->SetString(m, Field(*m, name), std::move(value));
}

char* SizeBytesField(Message* m, std::string_view name, size_t bytes) {
  SetBytesField(m, name, std::string(bytes, '\0'));
  // A generated message keeps its bytes field in place (see BytesField).
  return const_cast<std::string&>(BytesField(*m, name)).data();
}

bool BoolField(const Message& m, std::string_view name) {
  return m.GetReflection()->GetBool(m, Field(m, name));
}

void SetBoolField(Message* m, std::string_view name, bool value) {
  m->GetReflection()->SetBool(m, Field(*m, name), value);
}

v1::ShardHeader* MutableShardHeader(Message* shard_request) {
  return static_cast<v1::ShardHeader*>(shard_request->GetReflection()->MutableMessage(
      shard_request, Field(*shard_request, "header")));
}

const v1::ShardHeader& ShardHeaderOf(const Message& shard_request) {
  return static_cast<const v1::ShardHeader&>(
      shard_request.GetReflection()->GetMessage(shard_request, Field(shard_request, "header")));
}

const v1::WorkerTiming& ShardTiming(const Message& shard_response) {
  return static_cast<const v1::WorkerTiming&>(
      shard_response.GetReflection()->GetMessage(shard_response, Field(shard_response, "timing")));
}

int64_t TensorDataBytes(const Message& message, absl::Span<const ComputeTensor> tensors) {
  int64_t n = 0;
  for (const ComputeTensor& t : tensors) {
    n += static_cast<int64_t>(TensorField(message, t.name).data().size());
  }
  return n;
}

}  // namespace ringattn
