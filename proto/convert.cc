#include "proto/convert.h"

#include <algorithm>
#include <initializer_list>
#include <string>

#include "absl/strings/str_cat.h"

namespace ringattn {

namespace {

grpc::StatusCode ToGrpcCode(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk: return grpc::StatusCode::OK;
    case absl::StatusCode::kCancelled: return grpc::StatusCode::CANCELLED;
    case absl::StatusCode::kUnknown: return grpc::StatusCode::UNKNOWN;
    case absl::StatusCode::kInvalidArgument: return grpc::StatusCode::INVALID_ARGUMENT;
    case absl::StatusCode::kDeadlineExceeded: return grpc::StatusCode::DEADLINE_EXCEEDED;
    case absl::StatusCode::kNotFound: return grpc::StatusCode::NOT_FOUND;
    case absl::StatusCode::kAlreadyExists: return grpc::StatusCode::ALREADY_EXISTS;
    case absl::StatusCode::kPermissionDenied: return grpc::StatusCode::PERMISSION_DENIED;
    case absl::StatusCode::kResourceExhausted: return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case absl::StatusCode::kFailedPrecondition: return grpc::StatusCode::FAILED_PRECONDITION;
    case absl::StatusCode::kAborted: return grpc::StatusCode::ABORTED;
    case absl::StatusCode::kOutOfRange: return grpc::StatusCode::OUT_OF_RANGE;
    case absl::StatusCode::kUnimplemented: return grpc::StatusCode::UNIMPLEMENTED;
    case absl::StatusCode::kInternal: return grpc::StatusCode::INTERNAL;
    case absl::StatusCode::kUnavailable: return grpc::StatusCode::UNAVAILABLE;
    case absl::StatusCode::kDataLoss: return grpc::StatusCode::DATA_LOSS;
    case absl::StatusCode::kUnauthenticated: return grpc::StatusCode::UNAUTHENTICATED;
    default: break;
  }
  return grpc::StatusCode::UNKNOWN;
}

absl::StatusCode FromGrpcCode(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return absl::StatusCode::kOk;
    case grpc::StatusCode::CANCELLED: return absl::StatusCode::kCancelled;
    case grpc::StatusCode::UNKNOWN: return absl::StatusCode::kUnknown;
    case grpc::StatusCode::INVALID_ARGUMENT: return absl::StatusCode::kInvalidArgument;
    case grpc::StatusCode::DEADLINE_EXCEEDED: return absl::StatusCode::kDeadlineExceeded;
    case grpc::StatusCode::NOT_FOUND: return absl::StatusCode::kNotFound;
    case grpc::StatusCode::ALREADY_EXISTS: return absl::StatusCode::kAlreadyExists;
    case grpc::StatusCode::PERMISSION_DENIED: return absl::StatusCode::kPermissionDenied;
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return absl::StatusCode::kResourceExhausted;
    case grpc::StatusCode::FAILED_PRECONDITION: return absl::StatusCode::kFailedPrecondition;
    case grpc::StatusCode::ABORTED: return absl::StatusCode::kAborted;
    case grpc::StatusCode::OUT_OF_RANGE: return absl::StatusCode::kOutOfRange;
    case grpc::StatusCode::UNIMPLEMENTED: return absl::StatusCode::kUnimplemented;
    case grpc::StatusCode::INTERNAL: return absl::StatusCode::kInternal;
    case grpc::StatusCode::UNAVAILABLE: return absl::StatusCode::kUnavailable;
    case grpc::StatusCode::DATA_LOSS: return absl::StatusCode::kDataLoss;
    case grpc::StatusCode::UNAUTHENTICATED: return absl::StatusCode::kUnauthenticated;
    default: break;
  }
  return absl::StatusCode::kUnknown;
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(ToGrpcCode(status.code()), std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(FromGrpcCode(status.error_code()), status.error_message());
}

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FP32: return DType::kF32;
    case v1::DTYPE_FP16: return DType::kF16;
    case v1::DTYPE_BF16: return DType::kBF16;
    default: break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("dtype must be fp32, fp16 or bf16, got ", v1::DType_Name(dtype)));
}

v1::DType DTypeToProto(DType dtype) {
  switch (dtype) {
    case DType::kF32: return v1::DTYPE_FP32;
    case DType::kF16: return v1::DTYPE_FP16;
    case DType::kBF16: return v1::DTYPE_BF16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<std::optional<Layout>> LayoutFromProto(v1::Layout layout) {
  switch (layout) {
    case v1::LAYOUT_AUTO: return std::optional<Layout>();
    case v1::LAYOUT_CONTIGUOUS: return std::optional<Layout>(Layout::kContiguous);
    case v1::LAYOUT_ZIGZAG: return std::optional<Layout>(Layout::kZigzag);
    case v1::LAYOUT_STRIPE: return std::optional<Layout>(Layout::kStripe);
    default: break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("layout must be LAYOUT_AUTO, LAYOUT_CONTIGUOUS, LAYOUT_ZIGZAG or ",
                   "LAYOUT_STRIPE, got ", static_cast<int>(layout)));
}

v1::Layout LayoutToProto(Layout layout) {
  switch (layout) {
    case Layout::kContiguous: return v1::LAYOUT_CONTIGUOUS;
    case Layout::kZigzag: return v1::LAYOUT_ZIGZAG;
    case Layout::kStripe: return v1::LAYOUT_STRIPE;
  }
  return v1::LAYOUT_AUTO;
}

Layout ResolveLayout(std::optional<Layout> requested, bool causal) {
  return requested.value_or(AutoLayout(causal));
}

v1::Shape ShapeToProto(const AttentionShape& s) {
  v1::Shape out;
  out.set_dtype(DTypeToProto(s.dtype));
  out.set_batch(s.batch);
  out.set_seqlen_q(s.seqlen_q);
  out.set_seqlen_k(s.seqlen_k);
  out.set_heads(s.heads);
  out.set_heads_k(s.heads_k);
  out.set_head_dim(s.head_dim);
  return out;
}

absl::StatusOr<AttentionShape> ShapeFromProto(const v1::Shape& p) {
  absl::StatusOr<DType> dtype = DTypeFromProto(p.dtype());
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("shape.", dtype.status().message()));
  }
  struct Bound {
    const char* name;
    int64_t value;
    int64_t min;  // 1: "> 0", 0: ">= 0"
  };
  for (const Bound& b : {Bound{"batch", p.batch(), 1}, Bound{"seqlen_q", p.seqlen_q(), 0},
                         Bound{"seqlen_k", p.seqlen_k(), 0}, Bound{"heads", p.heads(), 1},
                         Bound{"heads_k", p.heads_k(), 1}, Bound{"head_dim", p.head_dim(), 1}}) {
    if (b.value < b.min) {
      return absl::InvalidArgumentError(absl::StrCat("shape.", b.name, " must be ",
                                                     b.min == 1 ? "> 0" : ">= 0", ", got ",
                                                     b.value));
    }
  }
  // The largest tensor's bytes: q or k/v at the longer sequence, or the fp32 lse.
  const int64_t heads = std::max(p.heads(), p.heads_k());
  const int64_t seqlen = std::max(p.seqlen_q(), p.seqlen_k());
  int64_t bytes = std::max(DTypeSize(*dtype), 4);
  for (int64_t d : {int64_t{p.batch()}, seqlen, heads, int64_t{p.head_dim()}}) {
    if (__builtin_mul_overflow(bytes, d, &bytes)) {
      return absl::InvalidArgumentError("shape is too large to address");
    }
  }
  return AttentionShape{*dtype,    p.batch(),   p.seqlen_q(), p.seqlen_k(),
                        p.heads(), p.heads_k(), p.head_dim()};
}

v1::ShardPlan ShardPlanToProto(const ShardPlan& plan) {
  v1::ShardPlan out;
  out.set_layout(LayoutToProto(plan.layout));
  out.set_world_size(plan.world);
  for (const Shard& s : plan.shards) out.add_rows_per_rank(s.rows);
  return out;
}

RingAttentionOptions OptionsFromProto(const v1::AttentionOptions& o) {
  RingAttentionOptions out;
  out.dropout_p = o.dropout_p();
  out.dropout_seed = o.dropout_seed();
  if (o.has_softmax_scale()) out.softmax_scale = o.softmax_scale();
  out.causal = o.causal();
  out.window_size = {o.has_window_left() ? o.window_left() : kUnboundedWindow,
                     o.has_window_right() ? o.window_right() : kUnboundedWindow};
  out.alibi_slopes.assign(o.alibi_slopes().begin(), o.alibi_slopes().end());
  out.softcap = o.softcap();
  out.seq_bounds.assign(o.cu_seqlens().begin(), o.cu_seqlens().end());
  return out;
}

v1::AttentionOptions OptionsToProto(const RingAttentionOptions& o) {
  v1::AttentionOptions out;
  out.set_causal(o.causal);
  if (o.softmax_scale.has_value()) out.set_softmax_scale(*o.softmax_scale);
  if (o.window_size.first != kUnboundedWindow) out.set_window_left(o.window_size.first);
  if (o.window_size.second != kUnboundedWindow) out.set_window_right(o.window_size.second);
  for (float s : o.alibi_slopes) out.add_alibi_slopes(s);
  out.set_softcap(o.softcap);
  out.set_dropout_p(o.dropout_p);
  out.set_dropout_seed(o.dropout_seed);
  for (int64_t b : o.seq_bounds) out.add_cu_seqlens(b);
  return out;
}

}  // namespace ringattn
