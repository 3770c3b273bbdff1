// Conversions between the proto API (ringattn.v1) and the ring library's types, and between
// absl::Status (inside ringattn) and grpc::Status (the service edge). Shared by the coordinator
// and the workers so that both read a request the same way.
#pragma once

#include <grpcpp/support/status.h>

#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention_shape.h"
#include "kernels/dtype.h"
#include "ring/host_ring.h"
#include "ring/layout.h"
#include "ringattn/v1/attention.pb.h"
#include "ringattn/v1/worker.pb.h"

namespace ringattn {

// The canonical codes are the same on both sides; messages are kept, payloads dropped.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// DTYPE_UNSPECIFIED or an unknown value is INVALID_ARGUMENT naming "dtype".
absl::StatusOr<DType> DTypeFromProto(v1::DType dtype);
v1::DType DTypeToProto(DType dtype);

// LAYOUT_AUTO is nullopt; an unknown value is INVALID_ARGUMENT naming "layout".
absl::StatusOr<std::optional<Layout>> LayoutFromProto(v1::Layout layout);
v1::Layout LayoutToProto(Layout layout);
// The requested layout, or AutoLayout(causal) for auto.
Layout ResolveLayout(std::optional<Layout> requested, bool causal);

v1::Shape ShapeToProto(const AttentionShape& shape);
// INVALID_ARGUMENT naming the field ("shape.heads must be > 0, got 0") unless the dtype is served,
// batch and the heads are > 0, head_dim > 0, the sequence lengths >= 0 and every tensor's bytes
// (q, k/v, lse) fit in int64.
absl::StatusOr<AttentionShape> ShapeFromProto(const v1::Shape& shape);

// The plan as returned to the client: layout, world size and rows per rank.
v1::ShardPlan ShardPlanToProto(const ShardPlan& plan);

// No checks here (ValidateAttendRequest does them): fields map one to one, an absent window
// side becomes -1 and an absent softmax_scale stays unset.
RingAttentionOptions OptionsFromProto(const v1::AttentionOptions& options);
// The inverse; a window side of -1 and an unset softmax_scale are left absent.
v1::AttentionOptions OptionsToProto(const RingAttentionOptions& options);

}  // namespace ringattn
