// The compute RPCs of the service (Attend, AttendBackward and their streams), each as one table:
// the tensors a request sends and how each is cut into the ranks' shards, the tensors that come
// back, and the worker method that computes one rank's shard. The coordinator scatters, calls
// and gathers by the table (server/request_runner.h), the worker checks its shard's inputs and
// sizes its outputs by it, and both ends of a stream send and receive chunks in its order.
//
// Naming contract, checked by compute_rpcs_test: a table tensor `name` is a v1::Tensor field
// `name` of the public request (inputs) or response (outputs), a bytes field `name` of the
// shard request (inputs) or response (outputs), and TensorChunk::WHICH_<NAME> in a stream. An
// output with `wanted_if` is produced only when that bool field of the public request is set,
// and the coordinator copies the flag into the same-named field of the shard request. Shard
// requests have a `header` (v1::ShardHeader), shard responses a `timing` (v1::WorkerTiming).
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/types/span.h"
#include "google/protobuf/message.h"
#include "kernels/attention_shape.h"
#include "ringattn/v1/attention.pb.h"
#include "ringattn/v1/worker.grpc.pb.h"

namespace ringattn {

// Which of a problem's tensor shapes a compute tensor has: its size, and how its rows (always
// along the sequence) are cut into shards.
enum class TensorKind {
  kQ,    // [batch, seq, heads, head_dim] of the problem's dtype: q, out, dout, dq
  kKv,   // [batch, seq, heads_k, head_dim] of the problem's dtype: k, v, dk, dv
  kLse,  // [batch, heads, seq] fp32: lse
};

// A tensor of `kind` viewed as [outer, seq, row_bytes]: the rows ExtractShard cuts.
struct RowView {
  int64_t outer = 0;
  size_t row_bytes = 0;
};
RowView RowsOf(TensorKind kind, const AttentionShape& shape);
// Bytes of the tensor of `kind` over shape.seqlen_q rows (a shard: the shape WithRows).
size_t BytesOf(TensorKind kind, const AttentionShape& shape);
// Its dims and dtype as the public API writes them.
std::vector<int64_t> DimsOf(TensorKind kind, const AttentionShape& shape);
v1::DType DTypeOf(TensorKind kind, const AttentionShape& shape);
// "[batch=1, rows=7, heads=4, head_dim=64] fp32" for messages.
std::string DescribeRows(TensorKind kind, const AttentionShape& shape);

struct ComputeTensor {
  const char* name;
  v1::TensorChunk::Which which;
  TensorKind kind;
  const char* wanted_if = nullptr;  // outputs: the request's bool field that asks for it
};

// Starts the worker call of one rank's shard on `stub`; `done` gets its status.
using ShardCall = void (*)(v1::WorkerService::StubInterface* stub, grpc::ClientContext* context,
                           const google::protobuf::Message& request,
                           google::protobuf::Message* response,
                           std::function<void(grpc::Status)> done);

struct ComputeRpc {
  std::string_view name;                    // "Attend"
  absl::Span<const ComputeTensor> inputs;   // request -> shards, in the stream's chunk order
  absl::Span<const ComputeTensor> outputs;  // shards -> response, in the stream's chunk order
  const google::protobuf::Message* shard_request;  // the default instance of its type
  const google::protobuf::Message* shard_response;
  ShardCall call;
};

const ComputeRpc& AttendRpc();          // Attend, AttendStream -> RunShard
const ComputeRpc& AttendBackwardRpc();  // AttendBackward, AttendBackwardStream -> RunShardBackward
// Every table; each RPC `name` has its streaming variant `name`Stream.
absl::Span<const ComputeRpc* const> ComputeRpcs();
// The table named `name` ("Attend"): how a new RPC's coordinator and worker code reach its
// table without an accessor of its own here. Aborts for a name no table has.
const ComputeRpc& FindComputeRpc(std::string_view name);

// Whether `request` asks for `output` (see wanted_if).
bool Wants(const google::protobuf::Message& request, const ComputeTensor& output);

// The named fields of the naming contract, by reflection. The field must exist (a table and its
// messages that disagree are a programming error, caught by compute_rpcs_test).
const v1::Tensor& TensorField(const google::protobuf::Message& m, std::string_view name);
v1::Tensor* MutableTensorField(google::protobuf::Message* m, std::string_view name);
bool HasTensorField(const google::protobuf::Message& m, std::string_view name);
const std::string& BytesField(const google::protobuf::Message& m, std::string_view name);
void SetBytesField(google::protobuf::Message* m, std::string_view name, std::string value);
// Sets bytes field `name` to `bytes` zero bytes and returns where they are, to be written in
// place.
char* SizeBytesField(google::protobuf::Message* m, std::string_view name, size_t bytes);
bool BoolField(const google::protobuf::Message& m, std::string_view name);
void SetBoolField(google::protobuf::Message* m, std::string_view name, bool value);
v1::ShardHeader* MutableShardHeader(google::protobuf::Message* shard_request);
const v1::ShardHeader& ShardHeaderOf(const google::protobuf::Message& shard_request);
// A public request's `output_shm` map: output name -> where the client wants its bytes.
std::vector<std::pair<std::string, v1::SharedMemoryRef>> OutputShm(
    const google::protobuf::Message& request);
const v1::WorkerTiming& ShardTiming(const google::protobuf::Message& shard_response);

// Bytes of the data of every table tensor present in `message` (inputs of a request or outputs
// of a response), for the byte counters.
int64_t TensorDataBytes(const google::protobuf::Message& message,
                        absl::Span<const ComputeTensor> tensors);

}  // namespace ringattn
