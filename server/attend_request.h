// Validation of Attend requests and the conversions between the public proto API and the ring
// library's types.
//
// ValidateAttendRequest turns an AttendRequest into a ValidatedAttend: the problem's shape and
// options, checked field by field. Bad input is INVALID_ARGUMENT with a message that
// names the field and the value expected ("k.shape[1] (seq) must equal q.shape[1] (7), got 8");
// a request past the service's limits is RESOURCE_EXHAUSTED naming the size and the limit.
// Window sides past the sequence are clamped to it (the same keys).
// Tensor data is never inspected: NaN and infinity are computed, not refused.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention_shape.h"
#include "kernels/dtype.h"
#include "proto/convert.h"
#include "ring/host_ring.h"
#include "ring/layout.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

// What the service accepts at most. Exceeding a limit is RESOURCE_EXHAUSTED.
struct AttendLimits {
  // Bytes of the request's tensors as their shapes and dtypes imply (q, k, v; AttendBackward
  // adds out, dout and lse).
  int64_t max_request_bytes = int64_t{4} << 30;
  // Sequence length (q.shape[1]).
  int64_t max_seqlen = std::numeric_limits<int64_t>::max();
  // Length of request_id; longer ids are INVALID_ARGUMENT (they end up in every log line).
  size_t max_request_id_bytes = 128;
};

// A checked Attend or AttendBackward problem: its shape, options and layout. The tensors stay
// in the request it was validated from.
struct ValidatedAttend {
  std::string request_id;  // as sent; empty when the client left it to the coordinator
  AttentionShape shape;    // seqlen_q == seqlen_k: the sequence; heads % heads_k == 0
  RingAttentionOptions options;
  bool return_lse = false;       // Attend's; false for AttendBackward
  std::optional<Layout> layout;  // nullopt: auto (see ResolvedLayout)

  // The layout to plan with: the requested one, else AutoLayout(options.causal).
  Layout ResolvedLayout() const;
};

// Names of tensors whose bytes are not in the request (a stream's landing arena, which the chunk
// protocol filled to the size the shape implies): their data must be empty.
using LandedTensors = std::set<std::string, std::less<>>;

// Validates a unary request: every field, and that each tensor's data has the size its shape
// and dtype imply (or, for `landed` ones, none).
absl::StatusOr<ValidatedAttend> ValidateAttendRequest(const v1::AttendRequest& request,
                                                      const AttendLimits& limits,
                                                      const LandedTensors& landed = {});

// Validates the header of an AttendStream call: the same checks on shapes, dtypes, options and
// limits, but every tensor's data must be empty (its bytes follow as chunks, as many as the
// result's shape says).
absl::StatusOr<ValidatedAttend> ValidateAttendHeader(const v1::AttendRequest& header,
                                                     const AttendLimits& limits);

// Validates a backward request: q, k, v, options, layout and request_id as
// ValidateAttendRequest does; out and dout must have q's dtype and shape, lse must be fp32
// [batch, heads, seq]; every tensor's data the size its shape implies. max_request_bytes
// applies to all six tensors together.
absl::StatusOr<ValidatedAttend> ValidateAttendBackwardRequest(
    const v1::AttendBackwardRequest& request, const AttendLimits& limits,
    const LandedTensors& landed = {});

// Validates the header of an AttendBackwardStream call before any chunk: the q/k/v part as
// ValidateAttendHeader checks it, and the six tensors (out and dout q-shaped, lse [batch, heads,
// seq] fp32) within max_request_bytes. The rest (out/dout/lse dtypes and shapes, byte counts)
// is checked on the assembled request by ValidateAttendBackwardRequest.
absl::StatusOr<ValidatedAttend> ValidateAttendBackwardHeader(
    const v1::AttendBackwardRequest& header, const AttendLimits& limits);

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
