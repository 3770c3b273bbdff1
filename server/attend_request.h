// Validation of Attend requests and the conversions between the public proto API and the ring
// library's types.
//
// ValidateAttendRequest turns an AttendRequest into a ValidatedAttend: the problem's sizes,
// dtype and options, checked field by field. Bad input is INVALID_ARGUMENT with a message that
// names the field and the value expected ("k.shape[1] (seq) must equal q.shape[1] (7), got 8");
// a request past the service's limits is RESOURCE_EXHAUSTED naming the size and the limit.
// Tensor data is never inspected: NaN and infinity are computed, not refused.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "proto/convert.h"
#include "ring/host_ring.h"
#include "ring/layout.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

// What the service accepts at most. Exceeding a limit is RESOURCE_EXHAUSTED.
struct AttendLimits {
  // Bytes of q + k + v as their shapes and dtype imply.
  int64_t max_request_bytes = int64_t{4} << 30;
  // Sequence length (q.shape[1]).
  int64_t max_seqlen = std::numeric_limits<int64_t>::max();
  // Length of request_id; longer ids are INVALID_ARGUMENT (they end up in every log line).
  size_t max_request_id_bytes = 128;
};

// Byte sizes of the tensors of one request, as the validated shapes and dtype imply.
struct AttendTensorBytes {
  int64_t q = 0;    // [batch, seq, heads, head_dim] of dtype
  int64_t k = 0;    // [batch, seq, heads_k, head_dim] of dtype
  int64_t v = 0;    // [batch, seq, heads_k, head_dim] of dtype
  int64_t out = 0;  // [batch, seq, heads, head_dim] of dtype
  int64_t lse = 0;  // [batch, heads, seq] fp32 (counted whether or not return_lse is set)
  int64_t request() const { return q + k + v; }
};

// A checked Attend problem. The tensor pointers point into the request it was validated from
// (no copy), so that request must outlive this struct; after ValidateAttendHeader they are
// null and the streaming path points them at the buffers it assembles.
struct ValidatedAttend {
  std::string request_id;  // as sent; empty when the client left it to the coordinator
  DType dtype = DType::kF32;
  int batch = 0;
  int64_t seqlen = 0;
  int heads = 0;    // query heads
  int heads_k = 0;  // key/value heads; heads % heads_k == 0
  int head_dim = 0;
  RingAttentionOptions options;
  bool return_lse = false;
  std::optional<Layout> layout;  // nullopt: auto (see ResolvedLayout)
  AttendTensorBytes bytes;
  const std::string* q_bytes = nullptr;  // [batch, seq, heads, head_dim], bytes.q long
  const std::string* k_bytes = nullptr;  // [batch, seq, heads_k, head_dim], bytes.k long
  const std::string* v_bytes = nullptr;  // [batch, seq, heads_k, head_dim], bytes.v long

  // The layout to plan with: the requested one, else AutoLayout(options.causal).
  Layout ResolvedLayout() const;
  // Bytes of one sequence row of q/out (heads * head_dim elements) and of k/v (heads_k *
  // head_dim elements): the row_bytes of ExtractShardBytes / InsertShardBytes.
  size_t q_row_bytes() const;
  size_t kv_row_bytes() const;
};

// Validates a unary request: every field, and that each tensor's data has the size its shape
// and dtype imply.
absl::StatusOr<ValidatedAttend> ValidateAttendRequest(const v1::AttendRequest& request,
                                                      const AttendLimits& limits);

// Validates the header of an AttendStream call: the same checks on shapes, dtypes, options and
// limits, but every tensor's data must be empty (its bytes follow as chunks). The result's
// `bytes` tells how many bytes of q, k and v to expect; its data pointers are null.
absl::StatusOr<ValidatedAttend> ValidateAttendHeader(const v1::AttendRequest& header,
                                                     const AttendLimits& limits);

// A checked AttendBackward problem: the q/k/v part as ValidateAttendRequest checks it (its
// return_lse is false), plus the forward's results and the incoming gradient. Pointers into the
// request, as in ValidatedAttend.
struct ValidatedAttendBackward {
  ValidatedAttend attend;
  const std::string* out_bytes = nullptr;   // [batch, seq, heads, head_dim], attend.bytes.out
  const std::string* dout_bytes = nullptr;  // [batch, seq, heads, head_dim], attend.bytes.out
  const std::string* lse_bytes = nullptr;   // [batch, heads, seq] fp32, attend.bytes.lse
};

// Validates a backward request: q, k, v, options, layout and request_id as
// ValidateAttendRequest does; out and dout must have q's dtype and shape, lse must be fp32
// [batch, heads, seq]; every tensor's data the size its shape implies. max_request_bytes
// applies to all six tensors together.
absl::StatusOr<ValidatedAttendBackward> ValidateAttendBackwardRequest(
    const v1::AttendBackwardRequest& request, const AttendLimits& limits);

// ---- Shards of request bytes (the coordinator's scatter and gather) --------------------------

// Rank's rows of `whole`, a tensor viewed as [outer, plan.seqlen, row_bytes], returned as a
// shard tensor [outer, rows of rank, row_bytes]. For q/k/v/out [batch, seq, heads, head_dim]:
// outer = batch, row_bytes = heads * head_dim * element size; for lse [batch, heads, seq]:
// outer = batch * heads, row_bytes = 4. `whole` must hold outer * seqlen * row_bytes bytes.
std::string ExtractShardBytes(const ShardPlan& plan, int rank, const std::string& whole,
                              int64_t outer, size_t row_bytes);

// The inverse: writes rank's shard [outer, rows of rank, row_bytes] into its rows of `whole`
// [outer, plan.seqlen, row_bytes], which must already have that size. A shard or whole of the
// wrong size (a worker answering with the wrong number of bytes) is INTERNAL, and nothing is
// written.
absl::Status InsertShardBytes(const ShardPlan& plan, int rank, const std::string& shard,
                              int64_t outer, size_t row_bytes, std::string* whole);

}  // namespace ringattn
