#include "proto/convert.h"

#include <algorithm>
#include <initializer_list>
#include <iterator>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace ringattn {

namespace {

// The canonical codes, OK (0) to UNAUTHENTICATED (16), have the same numbers in gRPC and absl;
// anything else is UNKNOWN.
constexpr std::pair<grpc::StatusCode, absl::StatusCode> kSameCodes[] = {
    {grpc::OK, absl::StatusCode::kOk},
    {grpc::CANCELLED, absl::StatusCode::kCancelled},
    {grpc::UNKNOWN, absl::StatusCode::kUnknown},
    {grpc::INVALID_ARGUMENT, absl::StatusCode::kInvalidArgument},
    {grpc::DEADLINE_EXCEEDED, absl::StatusCode::kDeadlineExceeded},
    {grpc::NOT_FOUND, absl::StatusCode::kNotFound},
    {grpc::ALREADY_EXISTS, absl::StatusCode::kAlreadyExists},
    {grpc::PERMISSION_DENIED, absl::StatusCode::kPermissionDenied},
    {grpc::RESOURCE_EXHAUSTED, absl::StatusCode::kResourceExhausted},
    {grpc::FAILED_PRECONDITION, absl::StatusCode::kFailedPrecondition},
    {grpc::ABORTED, absl::StatusCode::kAborted},
    {grpc::OUT_OF_RANGE, absl::StatusCode::kOutOfRange},
    {grpc::UNIMPLEMENTED, absl::StatusCode::kUnimplemented},
    {grpc::INTERNAL, absl::StatusCode::kInternal},
    {grpc::UNAVAILABLE, absl::StatusCode::kUnavailable},
    {grpc::DATA_LOSS, absl::StatusCode::kDataLoss},
    {grpc::UNAUTHENTICATED, absl::StatusCode::kUnauthenticated},
};
constexpr int kNumCanonicalCodes = static_cast<int>(std::size(kSameCodes));

constexpr bool CodesAgree() {
  for (int i = 0; i < kNumCanonicalCodes; ++i) {
    if (static_cast<int>(kSameCodes[i].first) != i || static_cast<int>(kSameCodes[i].second) != i) {
      return false;
    }
  }
  return true;
}
static_assert(CodesAgree(), "gRPC and absl number the canonical codes alike");

int CanonicalOrUnknown(int code) {
  return code >= 0 && code < kNumCanonicalCodes ? code
                                                : static_cast<int>(absl::StatusCode::kUnknown);
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(
      static_cast<grpc::StatusCode>(CanonicalOrUnknown(static_cast<int>(status.code()))),
      std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(
      static_cast<absl::StatusCode>(CanonicalOrUnknown(static_cast<int>(status.error_code()))),
      status.error_message());
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
      return absl::InvalidArgumentError(absl::StrCat(
          "shape.", b.name, " must be ", b.min == 1 ? "> 0" : ">= 0", ", got ", b.value));
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
