#include "server/attend_request.h"

#include <algorithm>
#include <array>
#include <cassert>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <string>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

constexpr int kDims = 4;
// Names of the axes of q/out and of k/v, for messages.
constexpr std::array<const char*, kDims> kQAxes = {"batch", "seq", "heads", "head_dim"};
constexpr std::array<const char*, kDims> kKvAxes = {"batch", "seq", "heads_k", "head_dim"};
constexpr int64_t kIntMax = std::numeric_limits<int>::max();

template <typename... Args>
absl::Status Invalid(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(args...));
}

template <typename... Args>
absl::Status Exhausted(const Args&... args) {
  return absl::ResourceExhaustedError(absl::StrCat(args...));
}

std::string ShapeString(const v1::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.shape(), ","), "]");
}

// "DTYPE_BF16", or the number for a value outside the enum.
std::string ProtoDTypeName(v1::DType dtype) {
  const std::string& name = v1::DType_Name(dtype);
  return name.empty() ? absl::StrCat(static_cast<int>(dtype)) : name;
}

// "bf16" for a served dtype, else as ProtoDTypeName.
std::string ServedDTypeName(v1::DType dtype) {
  absl::StatusOr<DType> d = DTypeFromProto(dtype);
  return d.ok() ? std::string(DTypeName(*d)) : ProtoDTypeName(dtype);
}

// "64, 128 or 256" from kSupportedHeadDims.
std::string SupportedHeadDims() {
  std::string out;
  constexpr size_t n = std::size(kSupportedHeadDims);
  for (size_t i = 0; i < n; ++i) {
    if (i > 0) absl::StrAppend(&out, i + 1 == n ? " or " : ", ");
    absl::StrAppend(&out, kSupportedHeadDims[i]);
  }
  return out;
}

bool IsSupportedHeadDim(int64_t d) {
  for (int s : kSupportedHeadDims) {
    if (s == d) return true;
  }
  return false;
}

// Product of non-negative factors, or nullopt when it does not fit in int64.
std::optional<int64_t> CheckedProduct(std::initializer_list<int64_t> factors) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (__builtin_mul_overflow(p, f, &p)) return std::nullopt;
  }
  return p;
}

// The checks every tensor gets on its own: present, a served dtype, four positive dims.
absl::Status CheckTensorHeader(bool present, const v1::Tensor& t, const char* name,
                               const std::array<const char*, kDims>& axes) {
  if (!present) {
    return Invalid(name, " is missing; expected a tensor [", absl::StrJoin(axes, ", "), "]");
  }
  if (!DTypeFromProto(t.dtype()).ok()) {
    return Invalid(name, ".dtype must be fp32, fp16 or bf16, got ", ProtoDTypeName(t.dtype()));
  }
  if (t.shape_size() != kDims) {
    return Invalid(name, ".shape must have 4 dims [", absl::StrJoin(axes, ", "), "], got ",
                   t.shape_size());
  }
  for (int i = 0; i < kDims; ++i) {
    if (t.shape(i) <= 0) {
      return Invalid(name, ".shape[", i, "] (", axes[i], ") must be > 0, got ", t.shape(i));
    }
  }
  return absl::OkStatus();
}

// k and v against q: same dtype, batch, seq and head_dim.
absl::Status CheckKvAgainstQ(const v1::Tensor& kv, const char* name, const v1::Tensor& q) {
  if (kv.dtype() != q.dtype()) {
    return Invalid(name, ".dtype must match q.dtype (", ServedDTypeName(q.dtype()), "), got ",
                   ServedDTypeName(kv.dtype()));
  }
  for (int i : {0, 1, 3}) {
    if (kv.shape(i) != q.shape(i)) {
      return Invalid(name, ".shape[", i, "] (", kKvAxes[i], ") must equal q.shape[", i, "] (",
                     q.shape(i), "), got ", kv.shape(i));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckRequestId(const std::string& id, const AttendLimits& limits) {
  if (id.size() > limits.max_request_id_bytes) {
    return Invalid("request_id has ", id.size(), " bytes; expected at most ",
                   limits.max_request_id_bytes);
  }
  for (size_t i = 0; i < id.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(id[i]);
    if (c < 0x20 || c > 0x7e) {
      return Invalid("request_id must be printable ASCII (0x20-0x7e); byte ", i, " is ",
                     absl::StrFormat("0x%02x", c));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckWindowSide(bool present, int64_t value, const char* name) {
  if (present && value < -1) {
    return Invalid("options.", name, " must be >= -1 (-1 or absent is unbounded), got ", value);
  }
  return absl::OkStatus();
}

absl::Status CheckCuSeqlens(const v1::AttentionOptions& o, int64_t seqlen) {
  if (o.cu_seqlens_size() == 0) return absl::OkStatus();
  return CheckSequenceBounds(o.cu_seqlens().data(), static_cast<size_t>(o.cu_seqlens_size()),
                             "options.cu_seqlens", "q.shape[1] (seq)", seqlen);
}

absl::Status CheckOptions(const v1::AttentionOptions& o, int heads, int64_t seqlen) {
  RA_RETURN_IF_ERROR(CheckCuSeqlens(o, seqlen));
  if (!(o.dropout_p() >= 0.0f && o.dropout_p() < 1.0f)) {
    return Invalid("options.dropout_p must be in [0, 1), got ", o.dropout_p());
  }
  // Absent: 1/sqrt(head_dim).
  if (o.has_softmax_scale()) {
    RA_RETURN_IF_ERROR(CheckSoftmaxScale(o.softmax_scale(), "options.softmax_scale"));
  }
  RA_RETURN_IF_ERROR(CheckWindowSide(o.has_window_left(), o.window_left(), "window_left"));
  RA_RETURN_IF_ERROR(CheckWindowSide(o.has_window_right(), o.window_right(), "window_right"));
  if (o.alibi_slopes_size() != 0 && o.alibi_slopes_size() != heads) {
    return Invalid("options.alibi_slopes must have ", heads, " entries (one per head), got ",
                   o.alibi_slopes_size(), "; leave it empty to disable ALiBi");
  }
  for (int i = 0; i < o.alibi_slopes_size(); ++i) {
    if (!std::isfinite(o.alibi_slopes(i))) {
      return Invalid("options.alibi_slopes[", i, "] must be finite, got ", o.alibi_slopes(i));
    }
  }
  if (!std::isfinite(o.softcap()) || o.softcap() < 0.0f) {
    return Invalid("options.softcap must be finite and >= 0 (0 disables), got ", o.softcap());
  }
  return absl::OkStatus();
}

// Byte size of a tensor of `t`'s (validated) shape, or RESOURCE_EXHAUSTED when it overflows.
absl::StatusOr<int64_t> TensorBytes(const v1::Tensor& t, const char* name, DType dtype,
                                    const AttendLimits& limits) {
  std::optional<int64_t> bytes =
      CheckedProduct({t.shape(0), t.shape(1), t.shape(2), t.shape(3), DTypeSize(dtype)});
  if (!bytes.has_value()) {
    return Exhausted(name, ".shape ", ShapeString(t), " of ", std::string(DTypeName(dtype)),
                     " needs more than 2^63 bytes; the limit is ", limits.max_request_bytes,
                     " (max_request_bytes)");
  }
  return *bytes;
}

// Everything but the tensors' data.
absl::StatusOr<ValidatedAttend> ValidateHeaderFields(const v1::AttendRequest& r,
                                                     const AttendLimits& limits) {
  RA_RETURN_IF_ERROR(CheckRequestId(r.request_id(), limits));
  RA_RETURN_IF_ERROR(CheckTensorHeader(r.has_q(), r.q(), "q", kQAxes));
  const v1::Tensor& q = r.q();
  if (!IsSupportedHeadDim(q.shape(3))) {
    return Invalid("q.shape[3]: head_dim ", q.shape(3), " not supported; expected ",
                   SupportedHeadDims());
  }
  for (int i : {0, 2}) {
    if (q.shape(i) > kIntMax) {
      return Invalid("q.shape[", i, "] (", kQAxes[i], ") must be <= ", kIntMax, ", got ",
                     q.shape(i));
    }
  }
  RA_RETURN_IF_ERROR(CheckTensorHeader(r.has_k(), r.k(), "k", kKvAxes));
  RA_RETURN_IF_ERROR(CheckKvAgainstQ(r.k(), "k", q));
  RA_RETURN_IF_ERROR(CheckTensorHeader(r.has_v(), r.v(), "v", kKvAxes));
  RA_RETURN_IF_ERROR(CheckKvAgainstQ(r.v(), "v", q));
  if (r.v().shape(2) != r.k().shape(2)) {
    return Invalid("v.shape[2] (heads_k) must equal k.shape[2] (", r.k().shape(2), "), got ",
                   r.v().shape(2));
  }
  const int64_t heads = q.shape(2);
  const int64_t heads_k = r.k().shape(2);
  if (heads % heads_k != 0) {
    return Invalid("q.shape[2] (heads) ", heads, " must be a multiple of k.shape[2] (heads_k) ",
                   heads_k);
  }
  absl::StatusOr<std::optional<Layout>> layout = LayoutFromProto(r.layout());
  if (!layout.ok()) return layout.status();
  RA_RETURN_IF_ERROR(CheckOptions(r.options(), static_cast<int>(heads), q.shape(1)));

  // Limits.
  const int64_t seqlen = q.shape(1);
  if (seqlen > limits.max_seqlen) {
    return Exhausted("q.shape[1] (seq) ", seqlen, " exceeds the limit ", limits.max_seqlen,
                     " (max_seqlen)");
  }
  RA_ASSIGN_OR_RETURN(DType dtype, DTypeFromProto(q.dtype()));
  RA_ASSIGN_OR_RETURN(const int64_t q_bytes, TensorBytes(q, "q", dtype, limits));
  RA_ASSIGN_OR_RETURN(const int64_t kv_bytes, TensorBytes(r.k(), "k", dtype, limits));
  // Each is below 2^63 but their sum need not be.
  int64_t total = 0;
  if (__builtin_add_overflow(q_bytes, kv_bytes, &total) ||
      __builtin_add_overflow(total, kv_bytes, &total)) {
    return Exhausted("q, k and v need more than 2^63 bytes; the limit is ",
                     limits.max_request_bytes, " (max_request_bytes)");
  }
  if (total > limits.max_request_bytes) {
    return Exhausted("q, k and v need ", total, " bytes; the limit is ", limits.max_request_bytes,
                     " (max_request_bytes)");
  }

  ValidatedAttend out;
  out.request_id = r.request_id();
  out.shape =
      AttentionShape::Self(dtype, static_cast<int>(q.shape(0)), seqlen, static_cast<int>(heads),
                           static_cast<int>(heads_k), static_cast<int>(q.shape(3)));
  out.options = OptionsFromProto(r.options());
  // A window side past the sequence sees every key a bounded one would: clamped, so that no
  // position arithmetic downstream (q position + window_right) can overflow.
  for (int64_t* side : {&out.options.window_size.first, &out.options.window_size.second}) {
    if (*side > seqlen) *side = seqlen;
  }
  out.return_lse = r.return_lse();
  out.layout = *layout;
  return out;
}

// A tensor's bytes are those its shape needs: in its data, or (shm set, data empty) the size
// of its shared-memory reference, whose region the coordinator resolves later.
absl::Status CheckTensorBytes(const char* name, const v1::Tensor& t, size_t bytes,
                              const std::string& dtype_name, const LandedTensors& landed) {
  if (landed.count(name) > 0 && !t.has_shm()) {
    if (t.data().empty()) return absl::OkStatus();
    return Invalid(name, ".data must be empty: its bytes came as chunks, got ", t.data().size());
  }
  if (t.has_shm()) {
    if (!t.data().empty()) {
      return Invalid(name, ".data must be empty when ", name, ".shm is set, got ", t.data().size(),
                     " bytes");
    }
    if (t.shm().region().empty()) {
      return Invalid(name, ".shm.region must name a region registered with "
                     "RegisterSystemSharedMemory");
    }
    if (t.shm().byte_size() < 0 || static_cast<uint64_t>(t.shm().byte_size()) != bytes) {
      return Invalid(name, ".shm.byte_size is ", t.shm().byte_size(), "; shape ", ShapeString(t),
                     " of ", dtype_name, " needs ", bytes);
    }
    return absl::OkStatus();
  }
  if (t.data().size() != bytes) {
    return Invalid(name, ".data has ", t.data().size(), " bytes; shape ", ShapeString(t), " of ",
                   dtype_name, " needs ", bytes);
  }
  return absl::OkStatus();
}

// Each tensor's data has the bytes its shape needs.
absl::Status CheckDataSizes(
    std::initializer_list<std::tuple<const char*, const v1::Tensor*, size_t>> tensors,
    DType dtype, const LandedTensors& landed) {
  for (const auto& [name, t, bytes] : tensors) {
    RA_RETURN_IF_ERROR(CheckTensorBytes(name, *t, bytes, std::string(DTypeName(dtype)), landed));
  }
  return absl::OkStatus();
}

// Stream headers carry no shared-memory references: the streams exist to move bytes.
absl::Status CheckNoSharedMemory(
    std::initializer_list<std::pair<const char*, const v1::Tensor*>> tensors,
    size_t output_shm_entries, const char* rpc) {
  for (const auto& [name, t] : tensors) {
    if (t->has_shm()) {
      return Invalid(name, ".shm must be unset in an ", rpc, " header: shared-memory tensors go "
                     "through the unary call");
    }
  }
  if (output_shm_entries > 0) {
    return Invalid("output_shm must be empty in an ", rpc, " header: shared-memory outputs go "
                   "through the unary call");
  }
  return absl::OkStatus();
}

}  // namespace

Layout ValidatedAttend::ResolvedLayout() const { return ResolveLayout(layout, options.causal); }

absl::StatusOr<ValidatedAttend> ValidateAttendRequest(const v1::AttendRequest& request,
                                                      const AttendLimits& limits,
                                                      const LandedTensors& landed) {
  RA_ASSIGN_OR_RETURN(ValidatedAttend out, ValidateHeaderFields(request, limits));
  const AttentionShape& s = out.shape;
  RA_RETURN_IF_ERROR(CheckDataSizes({{"q", &request.q(), s.q_bytes()},
                                     {"k", &request.k(), s.kv_bytes()},
                                     {"v", &request.v(), s.kv_bytes()}},
                                    s.dtype, landed));
  return out;
}

absl::StatusOr<ValidatedAttend> ValidateAttendHeader(const v1::AttendRequest& header,
                                                     const AttendLimits& limits) {
  RA_ASSIGN_OR_RETURN(ValidatedAttend out, ValidateHeaderFields(header, limits));
  const std::pair<const char*, const v1::Tensor*> tensors[] = {
      {"q", &header.q()}, {"k", &header.k()}, {"v", &header.v()}};
  for (const auto& [name, t] : tensors) {
    if (!t->data().empty()) {
      return Invalid(name, ".data must be empty in an AttendStream header (the bytes follow as",
                     " chunks), got ", t->data().size(), " bytes");
    }
  }
  RA_RETURN_IF_ERROR(CheckNoSharedMemory({{"q", &header.q()}, {"k", &header.k()}, {"v", &header.v()}},
                                         header.output_shm_size(), "AttendStream"));
  return out;
}

namespace {

// out or dout against q: present, q's dtype and shape (its data is checked with the others).
absl::Status CheckLikeQ(bool present, const v1::Tensor& t, const char* name, const v1::Tensor& q,
                        DType dtype) {
  if (!present) {
    return Invalid(name, " is missing; expected a tensor of q's shape ", ShapeString(q), " and ",
                   "dtype ", std::string(DTypeName(dtype)));
  }
  if (t.dtype() != q.dtype()) {
    return Invalid(name, ".dtype must match q.dtype (", ServedDTypeName(q.dtype()), "), got ",
                   ServedDTypeName(t.dtype()));
  }
  if (t.shape_size() != q.shape_size() ||
      !std::equal(t.shape().begin(), t.shape().end(), q.shape().begin())) {
    return Invalid(name, ".shape must equal q.shape ", ShapeString(q), ", got ", ShapeString(t));
  }
  return absl::OkStatus();
}

absl::Status CheckLse(bool present, const v1::Tensor& t, const AttentionShape& s,
                      const LandedTensors& landed) {
  const std::string want = absl::StrCat("[", s.batch, ",", s.heads, ",", s.seqlen_q, "]");
  if (!present) {
    return Invalid("lse is missing; expected the forward's LSE, fp32 [batch, heads, seq] = ",
                   want, " (Attend with return_lse)");
  }
  if (t.dtype() != v1::DTYPE_FP32) {
    return Invalid("lse.dtype must be fp32, got ", ServedDTypeName(t.dtype()));
  }
  if (t.shape_size() != 3 || t.shape(0) != s.batch || t.shape(1) != s.heads ||
      t.shape(2) != s.seqlen_q) {
    return Invalid("lse.shape must be [batch, heads, seq] = ", want, ", got ", ShapeString(t));
  }
  return CheckTensorBytes("lse", t, s.lse_bytes(), "fp32", landed);
}

// The q/k/v part of a backward request (its other tensors left out) through the forward's
// header checks.
absl::StatusOr<ValidatedAttend> ValidateForwardPart(const v1::AttendBackwardRequest& r,
                                                    const AttendLimits& limits) {
  v1::AttendRequest header;
  header.set_request_id(r.request_id());
  const std::tuple<bool, const v1::Tensor*, v1::Tensor*> parts[] = {
      {r.has_q(), &r.q(), header.mutable_q()},
      {r.has_k(), &r.k(), header.mutable_k()},
      {r.has_v(), &r.v(), header.mutable_v()}};
  for (const auto& [present, from, to] : parts) {
    to->set_dtype(from->dtype());
    *to->mutable_shape() = from->shape();
  }
  if (!r.has_q()) header.clear_q();  // left absent: reported as missing
  if (!r.has_k()) header.clear_k();
  if (!r.has_v()) header.clear_v();
  *header.mutable_options() = r.options();
  header.set_layout(r.layout());
  return ValidateHeaderFields(header, limits);
}

// The six tensors of a backward request within max_request_bytes.
absl::Status CheckBackwardBytes(const AttentionShape& s, const AttendLimits& limits) {
  const int64_t q = static_cast<int64_t>(s.q_bytes());
  const int64_t kv = static_cast<int64_t>(s.kv_bytes());
  int64_t total = 0;
  bool overflow = false;
  for (int64_t b : {q, kv, kv, q, q, static_cast<int64_t>(s.lse_bytes())}) {
    overflow |= __builtin_add_overflow(total, b, &total);
  }
  if (overflow || total > limits.max_request_bytes) {
    return Exhausted("q, k, v, out, dout and lse need ", overflow ? "more than 2^63" : "",
                     overflow ? "" : absl::StrCat(total), " bytes; the limit is ",
                     limits.max_request_bytes, " (max_request_bytes)");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ValidatedAttend> ValidateAttendBackwardRequest(const v1::AttendBackwardRequest& r,
                                                              const AttendLimits& limits,
                                                              const LandedTensors& landed) {
  RA_ASSIGN_OR_RETURN(ValidatedAttend out, ValidateForwardPart(r, limits));
  const AttentionShape& s = out.shape;
  RA_RETURN_IF_ERROR(CheckDataSizes(
      {{"q", &r.q(), s.q_bytes()}, {"k", &r.k(), s.kv_bytes()}, {"v", &r.v(), s.kv_bytes()}},
      s.dtype, landed));
  RA_RETURN_IF_ERROR(CheckLikeQ(r.has_out(), r.out(), "out", r.q(), s.dtype));
  RA_RETURN_IF_ERROR(CheckDataSizes({{"out", &r.out(), s.q_bytes()}}, s.dtype, landed));
  RA_RETURN_IF_ERROR(CheckLikeQ(r.has_dout(), r.dout(), "dout", r.q(), s.dtype));
  RA_RETURN_IF_ERROR(CheckDataSizes({{"dout", &r.dout(), s.q_bytes()}}, s.dtype, landed));
  RA_RETURN_IF_ERROR(CheckLse(r.has_lse(), r.lse(), s, landed));
  RA_RETURN_IF_ERROR(CheckBackwardBytes(s, limits));
  return out;
}

absl::StatusOr<ValidatedAttend> ValidateAttendBackwardHeader(const v1::AttendBackwardRequest& r,
                                                             const AttendLimits& limits) {
  RA_ASSIGN_OR_RETURN(ValidatedAttend out, ValidateForwardPart(r, limits));
  RA_RETURN_IF_ERROR(CheckBackwardBytes(out.shape, limits));
  RA_RETURN_IF_ERROR(CheckNoSharedMemory({{"q", &r.q()},
                                          {"k", &r.k()},
                                          {"v", &r.v()},
                                          {"out", &r.out()},
                                          {"dout", &r.dout()},
                                          {"lse", &r.lse()}},
                                         r.output_shm_size(), "AttendBackwardStream"));
  return out;
}

// ---- Shards --------------------------------------------------------------------------------

std::string ExtractShardBytes(const ShardPlan& plan, int rank, const std::string& whole,
                              int64_t outer, size_t row_bytes) {
  assert(rank >= 0 && rank < plan.world);
  assert(whole.size() == static_cast<size_t>(outer) * plan.seqlen * row_bytes);
  // [outer, rows, row_bytes]
  std::string shard(static_cast<size_t>(outer) * plan.shards[rank].rows * row_bytes, '\0');
  ExtractShard(plan, rank, whole.data(), outer, row_bytes, shard.data());
  return shard;
}

absl::Status InsertShardBytes(const ShardPlan& plan, int rank, const std::string& shard,
                              int64_t outer, size_t row_bytes, std::string* whole) {
  if (rank < 0 || rank >= plan.world) {
    return absl::InternalError(absl::StrCat("rank ", rank, " is outside the plan's ", plan.world,
                                            " ranks"));
  }
  const size_t shard_bytes = static_cast<size_t>(outer) * plan.shards[rank].rows * row_bytes;
  if (shard.size() != shard_bytes) {
    return absl::InternalError(absl::StrCat("shard of rank ", rank, " has ", shard.size(),
                                            " bytes; expected ", shard_bytes, " [", outer, ", ",
                                            plan.shards[rank].rows, " rows, ", row_bytes, "]"));
  }
  const size_t whole_bytes = static_cast<size_t>(outer) * plan.seqlen * row_bytes;
  if (whole->size() != whole_bytes) {
    return absl::InternalError(absl::StrCat("whole tensor has ", whole->size(),
                                            " bytes; expected ", whole_bytes, " [", outer, ", ",
                                            plan.seqlen, " rows, ", row_bytes, "]"));
  }
  InsertShard(plan, rank, shard.data(), outer, row_bytes, whole->data());
  return absl::OkStatus();
}

}  // namespace ringattn
