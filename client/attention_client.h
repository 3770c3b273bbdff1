// Client of ringattn.v1.AttentionService.
//
// Attend sends the whole request as one message; AttendStreaming sends it as the chunk protocol
// of AttendStream (header, then the bytes of q, k and v in chunks, then WritesDone) and
// reassembles the chunked out and lse of the answer; AttendAuto picks one of the two by the
// request's size; AttendBackward, AttendBackwardStreaming and AttendBackwardAuto do the same for
// the gradients (AttendBackwardStream's chunks: q, k, v, out, dout, lse in; dq, dk, dv out).
// Unary calls may carry system shared-memory references (Tensor.shm, output_shm; see
// client/shared_memory_session.h): an output named in the request's output_shm comes back
// without data, the service having written it into the region.
// Every call returns the service's status with its code and message as they came; a response
// that breaks the chunk protocol or whose tensors do not match their shapes is INTERNAL, naming
// the tensor and the offending offset or size.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/compute_rpcs.h"
#include "ringattn/v1/attention.grpc.pb.h"

namespace ringattn {

// Called as tensor bytes move: `done_bytes` of `total_bytes`, where the total counts the request
// bytes sent and the response bytes received.
using ProgressFn = std::function<void(int64_t done_bytes, int64_t total_bytes)>;

// Default size of the TensorChunk payloads the client sends (the coordinator's default for the
// chunks it answers with).
inline constexpr int64_t kDefaultChunkBytes = int64_t{4} << 20;

// Bytes a tensor's data must have as its dtype and shape imply. 0 for a tensor without a shape
// (an absent tensor); -1 when the dtype is unspecified, a dimension is negative or the size
// overflows.
int64_t ExpectedTensorBytes(const v1::Tensor& tensor);

// "[1, 37, 5, 64] DTYPE_FP32": a tensor's shape and dtype, for messages.
std::string DescribeTensor(const v1::Tensor& tensor);

// Bytes of the output `out` of a compute request (proto/compute_rpcs.h) as the request's shapes
// imply: the shape and dtype of q (kQ) or k (kKv), or the fp32 [batch, heads, seq] of q (kLse).
// -1 when that input's dtype or shape does not give it (kLse: q not 4-D).
int64_t ExpectedOutputBytes(const ComputeTensor& out, const google::protobuf::Message& request);

// Requests larger than this go through the stream even within the unary limit: gRPC moves one
// large message about three times slower than the same bytes in chunks, and the service lands
// streamed chunks where its workers read them (bench/grpc_wire_bench, docs/performance.md).
inline constexpr int64_t kStreamAboveBytes = int64_t{32} << 20;

// Requests larger than this are cut by K/V heads over a client's connections, when it has
// several (AttentionClient::Connect).
inline constexpr int64_t kSplitAboveBytes = int64_t{64} << 20;

// Whether `request` goes through AttendStream: its serialised size exceeds kStreamAboveBytes,
// `max_unary_bytes` (the server's InfoResponse.max_unary_bytes; <= 0 when unknown) or the
// 2 GiB protobuf limit on one message.
bool NeedsStreaming(const v1::AttendRequest& request, int64_t max_unary_bytes);

// How a client authenticates the service and itself (docs/security.md). All empty: plaintext
// without a token, as before.
struct ClientCredentials {
  // TLS: on when `tls` or `tls_ca` is set. The server's certificate is verified against the CA
  // certificates of the PEM file `tls_ca` (empty: the system's roots) and the name
  // `tls_server_name` (empty: the target's host).
  bool tls = false;
  std::string tls_ca;
  std::string tls_server_name;
  // mTLS: this client's certificate chain and key (PEM files), both or neither.
  std::string tls_cert;
  std::string tls_key;
  // Sent on every call as the metadata `authorization: Bearer <token>`; empty: none.
  std::string token;
};

// The environment variable a bearer token may come from.
inline constexpr char kTokenEnvironmentVariable[] = "RINGATTN_TOKEN";

// The bearer token: the first line of `file` when given (INVALID_ARGUMENT naming it when it
// cannot be read or its line is empty), else RINGATTN_TOKEN, else empty (no token).
absl::StatusOr<std::string> LoadBearerToken(const std::string& file);

// Thread-safe: calls may run concurrently over the one channel.
class AttentionClient {
 public:
  // Opens a channel to `target` (host:port) with unlimited message sizes, secured as
  // `credentials` say (INVALID_ARGUMENT naming a TLS file that cannot be read), and waits up to
  // `wait_ready` for it to connect: UNAVAILABLE naming the target if it does not (a TLS
  // handshake that fails looks the same). A zero `wait_ready` skips the wait (the channel
  // connects on the first call).
  // `connections` (>= 1) channels of their own to the target: AttendAuto and AttendBackwardAuto
  // cut a request past kSplitAboveBytes into that many parts by K/V heads
  // (client/head_split.h) and send them at once, one per connection.
  static absl::StatusOr<std::unique_ptr<AttentionClient>> Connect(
      const std::string& target, absl::Duration wait_ready,
      const ClientCredentials& credentials = {}, int connections = 1);

  // Over existing channels (one connection each; the first for every call but the parts).
  explicit AttentionClient(std::shared_ptr<grpc::Channel> channel);
  explicit AttentionClient(std::vector<std::shared_ptr<grpc::Channel>> channels);

  AttentionClient(const AttentionClient&) = delete;
  AttentionClient& operator=(const AttentionClient&) = delete;

  // Each call gives up after `timeout` (DEADLINE_EXCEEDED); absl::InfiniteDuration() waits for
  // ever.
  absl::StatusOr<v1::AttendResponse> Attend(const v1::AttendRequest& request,
                                            absl::Duration timeout);

  // The request through AttendStream in chunks of at most `chunk_bytes` (> 0; need not be a
  // multiple of the element size). `progress` may be empty.
  absl::StatusOr<v1::AttendResponse> AttendStreaming(const v1::AttendRequest& request,
                                                     absl::Duration timeout, int64_t chunk_bytes,
                                                     const ProgressFn& progress = nullptr);

  // AttendStreaming when NeedsStreaming(request, max_unary_bytes), else Attend. Past
  // kSplitAboveBytes with several connections: parts by K/V heads, one per connection, each
  // unary or streamed by its own size, joined into one answer (its timings the slowest
  // part's; `progress` is not called then). The chunks are
  // kept within `max_unary_bytes` too, as that is what the server accepts in one message.
  absl::StatusOr<v1::AttendResponse> AttendAuto(const v1::AttendRequest& request,
                                                absl::Duration timeout, int64_t max_unary_bytes,
                                                int64_t chunk_bytes = kDefaultChunkBytes,
                                                const ProgressFn& progress = nullptr);

  // The gradients dq, dk and dv of the attention the request describes (the forward's inputs,
  // its out and lse, and dout), in one unary call: a request past the server's unary limit
  // (InfoResponse.max_unary_bytes) is refused by gRPC with RESOURCE_EXHAUSTED, as is one past
  // 2 GiB (AttendBackwardStreaming takes those). A ring whose kernel has no backward
  // (cuda_reference) answers UNIMPLEMENTED. A response whose tensors do not match their shapes
  // is INTERNAL.
  absl::StatusOr<v1::AttendBackwardResponse> AttendBackward(
      const v1::AttendBackwardRequest& request, absl::Duration timeout);

  // The same through AttendBackwardStream: q, k, v, out, dout and lse in chunks of at most
  // `chunk_bytes`, dq, dk and dv back in chunks (as AttendStreaming).
  absl::StatusOr<v1::AttendBackwardResponse> AttendBackwardStreaming(
      const v1::AttendBackwardRequest& request, absl::Duration timeout, int64_t chunk_bytes,
      const ProgressFn& progress = nullptr);

  // AttendBackwardStreaming when the request is past kStreamAboveBytes, `max_unary_bytes` or
  // protobuf's limit, else AttendBackward; chunks kept within max_unary_bytes.
  absl::StatusOr<v1::AttendBackwardResponse> AttendBackwardAuto(
      const v1::AttendBackwardRequest& request, absl::Duration timeout, int64_t max_unary_bytes,
      int64_t chunk_bytes = kDefaultChunkBytes, const ProgressFn& progress = nullptr);

  absl::StatusOr<v1::InfoResponse> GetInfo(absl::Duration timeout);

  // The size past which AttendAuto and AttendBackwardAuto cut requests (kSplitAboveBytes), for
  // tests and tuning.
  void set_split_above_bytes(int64_t bytes) { split_above_bytes_ = bytes; }

  // System shared memory (same-host callers; the service refuses others): registers bytes
  // [offset, offset + byte_size) of the shm_open object `key` under `name`, unique among this
  // caller's regions, for requests to refer to; unregisters one (an empty name: all of this
  // caller's); lists this caller's regions (an empty name: all of them).
  absl::Status RegisterSystemSharedMemory(const std::string& name, const std::string& key,
                                          int64_t offset, int64_t byte_size,
                                          absl::Duration timeout);
  absl::Status UnregisterSystemSharedMemory(const std::string& name, absl::Duration timeout);
  absl::StatusOr<std::vector<v1::SystemSharedMemoryRegion>> SystemSharedMemoryStatus(
      const std::string& name, absl::Duration timeout);
  // CUDA shared memory (same-host callers, GPU workers): registers the first `byte_size` bytes
  // of the GPU allocation whose cudaIpcMemHandle_t is `raw_handle` (on the caller's GPU
  // `device_id`) under `name`, in the same name space as the system regions; unregisters one
  // (an empty name: all of this caller's CUDA regions); lists them.
  absl::Status RegisterCudaSharedMemory(const std::string& name, const std::string& raw_handle,
                                        int device_id, int64_t byte_size,
                                        absl::Duration timeout);
  absl::Status UnregisterCudaSharedMemory(const std::string& name, absl::Duration timeout);
  absl::StatusOr<std::vector<v1::CudaSharedMemoryRegion>> CudaSharedMemoryStatus(
      const std::string& name, absl::Duration timeout);

 private:
  // AttendAuto and AttendBackwardAuto: `request` split over the connections or whole, each
  // part unary or streamed.
  template <typename StreamRequest, typename StreamResponse, typename Request, typename Response,
            typename Stream>
  absl::StatusOr<Response> Auto(
      const ComputeRpc& rpc, const char* stream_name,
      grpc::Status (v1::AttentionService::Stub::*unary)(grpc::ClientContext*, const Request&,
                                                        Response*),
      std::unique_ptr<Stream> (v1::AttentionService::Stub::*open)(grpc::ClientContext*),
      const Request& request, absl::Duration timeout, int64_t max_unary_bytes,
      int64_t chunk_bytes, const ProgressFn& progress);

  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<v1::AttentionService::Stub>> stubs_;
  v1::AttentionService::Stub* stub_;  // stubs_[0]
  int64_t split_above_bytes_ = kSplitAboveBytes;
};

// A client connected to a server, and the server's GetInfo.
struct ConnectedClient {
  std::unique_ptr<AttentionClient> client;
  v1::InfoResponse info;
};

// AttentionClient::Connect (with `connections`), then GetInfo, each within `timeout`; the first
// failure's status.
absl::StatusOr<ConnectedClient> ConnectAndGetInfo(const std::string& target, absl::Duration timeout,
                                                  const ClientCredentials& credentials = {},
                                                  int connections = 1);

}  // namespace ringattn
