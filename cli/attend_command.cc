#include "cli/attend_command.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "cli/cli_parse.h"
#include "cli/exit_codes.h"
#include "cli/timing_table.h"
#include "client/head_split.h"
#include "client/npy.h"
#include "client/shared_memory_session.h"
#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"
#include "kernels/attention_shape.h"
#include "kernels/cpu/reference_backward.h"
#include "kernels/params_check.h"
#include "proto/convert.h"
#include "ring/testing/synthetic_inputs.h"

namespace ringattn {
namespace {

// Ids of the synthetic tensors, as `ringattn ring` uses them.
constexpr uint32_t kSyntheticQ = 0, kSyntheticK = 1, kSyntheticV = 2, kSyntheticDout = 3;

// The LSE is fp32 on both sides of the comparison: only accumulation order differs.
constexpr double kLseRelL2Tolerance = 1e-5;
constexpr double kLseMaxAbsTolerance = 1e-3;

// Output values shown in the summary.
constexpr int kShownValues = 6;

// The dtype of a tensor; the error names the field.
absl::StatusOr<DType> FromProtoDType(v1::DType dtype, const char* field) {
  absl::StatusOr<DType> d = DTypeFromProto(dtype);
  if (!d.ok()) return absl::InvalidArgumentError(absl::StrCat(field, ": ", d.status().message()));
  return d;
}

std::string ShapeString(const v1::Tensor& tensor) {
  return absl::StrCat("[", absl::StrJoin(tensor.shape(), ", "), "]");
}

std::string DTypeLabel(v1::DType dtype) {
  absl::StatusOr<DType> d = FromProtoDType(dtype, "dtype");
  return d.ok() ? std::string(DTypeName(*d)) : v1::DType_Name(dtype);
}

std::string MiB(int64_t bytes) {
  return absl::StrFormat("%.1f MiB", static_cast<double>(bytes) / (1 << 20));
}

// Elements of `data` (of type `from`) as type `to`.
std::string ConvertElements(const std::string& data, DType from, DType to) {
  if (from == to) return data;
  const int64_t n = static_cast<int64_t>(data.size()) / DTypeSize(from);
  std::string converted(static_cast<size_t>(n * DTypeSize(to)), '\0');
  for (int64_t i = 0; i < n; ++i) {
    StoreFromFloat(converted.data(), i, to, LoadAsFloat(data.data(), i, from));
  }
  return converted;
}

std::vector<float> StandardAlibiSlopes(int heads) {
  std::vector<float> slopes(heads);
  for (int i = 0; i < heads; ++i) slopes[i] = std::pow(2.0f, -8.0f * (i + 1) / heads);
  return slopes;
}

// Problems with the options themselves (exit code 2).
absl::Status ValidateOptions(const AttendCommandOptions& o) {
  if (o.target.empty()) return absl::InvalidArgumentError("--target must be host:port");
  if (!o.dtype.empty()) RA_RETURN_IF_ERROR(ParseDTypeName(o.dtype).status());
  RA_RETURN_IF_ERROR(ParseLayoutName(o.layout).status());
  const int files = !o.q_npy.empty() + !o.k_npy.empty() + !o.v_npy.empty();
  if (files != 0 && files != 3) {
    return absl::InvalidArgumentError("--q_npy, --k_npy and --v_npy go together: give all three");
  }
  if (files == 0 &&
      (o.batch < 1 || o.seqlen < 1 || o.heads < 1 || o.heads_k < 0 || o.head_dim < 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--batch, --seqlen, --heads and --head_dim must be >= 1 and --heads_k >= 0, got ", o.batch,
        ", ", o.seqlen, ", ", o.heads, ", ", o.head_dim, " and ", o.heads_k));
  }
  if (o.shm && o.streaming) {
    return absl::InvalidArgumentError(
        "--shm and --stream exclude each other: shared-memory references go in unary calls");
  }
  if (o.chunk_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--chunk_bytes must be > 0, got ", o.chunk_bytes));
  }
  if (!(o.timeout_seconds > 0) || !(o.connect_timeout_seconds > 0)) {
    return absl::InvalidArgumentError("--timeout and the connect timeout must be > 0 seconds");
  }
  return absl::OkStatus();
}

// Reads one input tensor from a .npy file into `tensor`, converting it to `dtype` when set.
absl::Status ReadInput(const std::string& path, const char* name, std::optional<DType> dtype,
                       v1::Tensor* tensor) {
  RA_ASSIGN_OR_RETURN(NpyArray array, ReadNpy(path));
  if (array.shape.size() != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", name, " must be 4-D [batch, seq, heads, head_dim], got ",
                     array.shape.size(), " dimensions"));
  }
  const DType to = dtype.value_or(array.dtype);
  tensor->set_dtype(DTypeToProto(to));
  for (const int64_t d : array.shape) tensor->add_shape(d);
  if (to == array.dtype) {
    tensor->set_data(std::move(array.data));
  } else {
    tensor->set_data(ConvertElements(array.data, array.dtype, to));
  }
  return absl::OkStatus();
}

// The request the options describe; the options are already validated.
absl::StatusOr<v1::AttendRequest> BuildRequest(const AttendCommandOptions& o) {
  std::optional<DType> dtype;
  if (!o.dtype.empty()) dtype = *ParseDTypeName(o.dtype);
  v1::AttendRequest request;
  int heads;
  if (o.q_npy.empty()) {
    heads = o.heads;
    request = MakeSyntheticRequest(o.batch, o.seqlen, o.heads, o.heads_k > 0 ? o.heads_k : o.heads,
                                   o.head_dim, dtype.value_or(DType::kBF16), o.seed);
  } else {
    RA_RETURN_IF_ERROR(ReadInput(o.q_npy, "q", dtype, request.mutable_q()));
    RA_RETURN_IF_ERROR(ReadInput(o.k_npy, "k", dtype, request.mutable_k()));
    RA_RETURN_IF_ERROR(ReadInput(o.v_npy, "v", dtype, request.mutable_v()));
    if (request.k().dtype() != request.q().dtype() || request.v().dtype() != request.q().dtype()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "q, k and v files must have one dtype, got ", DTypeLabel(request.q().dtype()), ", ",
          DTypeLabel(request.k().dtype()), " and ", DTypeLabel(request.v().dtype()),
          " (or convert them with --dtype)"));
    }
    heads = static_cast<int>(request.q().shape(2));
  }
  request.set_request_id(o.request_id);
  request.set_layout(*ParseLayoutName(o.layout));
  request.set_return_lse(o.return_lse || o.backward);  // the backward needs the forward's LSE
  v1::AttentionOptions* options = request.mutable_options();
  options->set_causal(o.causal);
  if (o.softmax_scale > 0) options->set_softmax_scale(o.softmax_scale);
  if (o.window_left != kUnboundedWindow) options->set_window_left(o.window_left);
  if (o.window_right != kUnboundedWindow) options->set_window_right(o.window_right);
  if (o.alibi) {
    for (const float s : StandardAlibiSlopes(heads)) options->add_alibi_slopes(s);
  }
  options->set_softcap(o.softcap);
  options->set_dropout_p(o.dropout_p);
  options->set_dropout_seed(o.dropout_seed);
  for (const int64_t b : o.cu_seqlens) options->add_cu_seqlens(b);
  return request;
}

// A problem's shape as a request's tensors give them, checked.
absl::StatusOr<AttentionShape> ProblemOf(const v1::Tensor& q, const v1::Tensor& k,
                                         const v1::Tensor& v) {
  const std::pair<const char*, const v1::Tensor*> tensors[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : tensors) {
    if (t->shape_size() != 4) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be 4-D [batch, seq, heads, head_dim], got ", ShapeString(*t)));
    }
    for (const int64_t d : t->shape()) {
      if (d < 0 || d > std::numeric_limits<int>::max()) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, ".shape ", ShapeString(*t), " has a dimension out of range"));
      }
    }
  }
  RA_ASSIGN_OR_RETURN(const DType dtype, FromProtoDType(q.dtype(), "q.dtype"));
  if (k.dtype() != q.dtype() || v.dtype() != q.dtype()) {
    return absl::InvalidArgumentError(
        absl::StrCat("k and v must have q's dtype ", DTypeLabel(q.dtype()), ", got ",
                     DTypeLabel(k.dtype()), " and ", DTypeLabel(v.dtype())));
  }
  if (k.shape(0) != q.shape(0) || k.shape(1) != q.shape(1) || k.shape(3) != q.shape(3)) {
    return absl::InvalidArgumentError(absl::StrCat("k ", ShapeString(k), " must match q ",
                                                   ShapeString(q), " in batch, seq and head_dim"));
  }
  if (v.shape(0) != k.shape(0) || v.shape(1) != k.shape(1) || v.shape(2) != k.shape(2) ||
      v.shape(3) != k.shape(3)) {
    return absl::InvalidArgumentError(
        absl::StrCat("v ", ShapeString(v), " must have k's shape ", ShapeString(k)));
  }
  for (const auto& [name, t] : tensors) {
    if (static_cast<int64_t>(t->data().size()) != ExpectedTensorBytes(*t)) {
      return absl::InvalidArgumentError(absl::StrCat(name, " has ", t->data().size(),
                                                     " bytes of data; its shape ", ShapeString(*t),
                                                     " needs ", ExpectedTensorBytes(*t)));
    }
  }
  return AttentionShape::Self(dtype, static_cast<int>(q.shape(0)), q.shape(1),
                              static_cast<int>(q.shape(2)), static_cast<int>(k.shape(2)),
                              static_cast<int>(q.shape(3)));
}

absl::StatusOr<AttentionShape> ProblemOf(const v1::AttendRequest& request) {
  return ProblemOf(request.q(), request.k(), request.v());
}

// Prints the shape, dtype, first values and NaN/Inf counts of one response tensor.
void PrintTensorSummary(const char* name, const v1::Tensor& tensor, std::ostream& out) {
  absl::StatusOr<DType> dtype = FromProtoDType(tensor.dtype(), name);
  if (!dtype.ok()) {
    out << name << ": " << dtype.status().message() << "\n";
    return;
  }
  const int64_t n = static_cast<int64_t>(tensor.data().size()) / DTypeSize(*dtype);
  int64_t nans = 0, infs = 0;
  std::vector<std::string> shown;
  for (int64_t i = 0; i < n; ++i) {
    const float x = LoadAsFloat(tensor.data().data(), i, *dtype);
    nans += std::isnan(x);
    infs += std::isinf(x);
    if (i < kShownValues) shown.push_back(absl::StrFormat("%.5g", x));
  }
  out << absl::StrFormat("%s %s %s: %s%s (NaN: %d, Inf: %d)\n", name, ShapeString(tensor),
                         std::string(DTypeName(*dtype)), absl::StrJoin(shown, " "),
                         n > kShownValues ? " ..." : "", nans, infs);
}

// Writes the response's output to `path` as .npy (bf16 as fp32).
absl::Status WriteOutput(const v1::Tensor& tensor, const std::string& path) {
  RA_ASSIGN_OR_RETURN(const DType dtype, FromProtoDType(tensor.dtype(), "out.dtype"));
  NpyArray array;
  array.dtype = dtype == DType::kBF16 ? DType::kF32 : dtype;
  array.shape.assign(tensor.shape().begin(), tensor.shape().end());
  array.data = ConvertElements(tensor.data(), dtype, array.dtype);
  return WriteNpy(path, array);
}

// Runs the check against the fp64 reference; returns whether it passed.
bool RunCheck(const v1::AttendRequest& request, const v1::AttendResponse& response,
              std::ostream& out) {
  const double flops = RequestFlops(request);
  if (flops > 1e11) {
    out << absl::StrFormat("computing the fp64 reference (%.3g GFLOP on one core)...\n",
                           flops * 1e-9);
    out.flush();
  }
  absl::StatusOr<ReferenceErrors> errors = CompareWithReference(request, response);
  if (!errors.ok()) {
    out << ErrorLine(errors.status());
    return false;
  }
  const DType dtype = *FromProtoDType(request.q().dtype(), "q.dtype");
  const double tolerance = OutputTolerance(dtype);
  bool ok = errors->out.Within(tolerance, std::numeric_limits<double>::infinity());
  out << "vs fp64 reference: out " << errors->out.ToString() << "\n";
  if (errors->lse.has_value()) {
    out << "vs fp64 reference: lse " << errors->lse->ToString() << "\n";
    ok &= errors->lse->Within(kLseRelL2Tolerance, kLseMaxAbsTolerance);
  }
  out << (ok ? "check: PASS" : "check: FAIL (tolerance breached)")
      << absl::StrFormat(" (out rel_l2 tolerance %.0e for %s)\n", tolerance,
                         std::string(DTypeName(dtype)));
  return ok;
}

}  // namespace

v1::AttendRequest MakeSyntheticRequest(int batch, int64_t seqlen, int heads, int heads_k,
                                       int head_dim, DType dtype, uint64_t seed) {
  v1::AttendRequest request;
  const std::pair<v1::Tensor*, std::pair<uint32_t, int>> tensors[] = {
      {request.mutable_q(), {kSyntheticQ, heads}},
      {request.mutable_k(), {kSyntheticK, heads_k}},
      {request.mutable_v(), {kSyntheticV, heads_k}}};
  for (const auto& [tensor, id_heads] : tensors) {
    const auto [id, h] = id_heads;
    tensor->set_dtype(DTypeToProto(dtype));
    for (const int64_t d : {int64_t{batch}, seqlen, int64_t{h}, int64_t{head_dim}}) {
      tensor->add_shape(d);
    }
    std::string* data = tensor->mutable_data();
    data->resize(static_cast<size_t>(batch) * seqlen * h * head_dim * DTypeSize(dtype));
    FillSynthetic(seed, id, batch, seqlen, h, head_dim, dtype, data->data());
  }
  return request;
}

namespace {

// The rel_l2 bounds of --check against fp64: the output, and the gradients (a longer chain of
// roundings).
struct Tolerances {
  double out;
  double gradients;
};

Tolerances TolerancesOf(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return {1e-5, 1e-4};
    case DType::kF16:
      return {2e-3, 5e-3};
    case DType::kBF16:
      return {1e-2, 2e-2};
  }
  return {0, 0};
}

}  // namespace

double OutputTolerance(DType dtype) { return TolerancesOf(dtype).out; }

namespace {

// The forward parameters of contiguous q, k, v and `options` as the fp64 reference reads them;
// p.o points at a dummy byte (the reference returns its output). Pointers into the tensors and
// options, which must outlive the parameters.
absl::StatusOr<AttentionParams> ReferenceParams(const v1::Tensor& q, const v1::Tensor& k,
                                                const v1::Tensor& v,
                                                const v1::AttentionOptions& options) {
  RA_ASSIGN_OR_RETURN(const AttentionShape problem, ProblemOf(q, k, v));
  if (!(options.dropout_p() >= 0.0f && options.dropout_p() < 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("options.dropout_p must be in [0, 1), got ", options.dropout_p()));
  }
  if (options.alibi_slopes_size() != 0 && options.alibi_slopes_size() != problem.heads) {
    return absl::InvalidArgumentError(
        absl::StrCat("options.alibi_slopes has ", options.alibi_slopes_size(),
                     " slopes; expected one per query head (", problem.heads, ")"));
  }
  AttentionParams p;
  SetShape(problem, &p);
  p.q = q.data().data();
  p.k = k.data().data();
  p.v = v.data().data();
  static std::byte unused_output;  // the reference returns its output; p.o must be non-null
  p.o = &unused_output;
  SetContiguousStrides(&p);
  p.softmax_scale = options.has_softmax_scale()
                        ? options.softmax_scale()
                        : 1.0f / std::sqrt(static_cast<float>(problem.head_dim));
  p.softcap = options.softcap();
  p.alibi_slopes = options.alibi_slopes_size() > 0 ? options.alibi_slopes().data() : nullptr;
  p.causal = options.causal();
  p.window_left = options.has_window_left() ? options.window_left() : kUnboundedWindow;
  p.window_right = options.has_window_right() ? options.window_right() : kUnboundedWindow;
  p.dropout_p = options.dropout_p();
  p.dropout_seed = options.dropout_seed();
  // ValidateParams (in the reference) checks them.
  SetSequenceBounds(&p, options.cu_seqlens().data(), static_cast<size_t>(options.cu_seqlens_size()));
  return p;
}

}  // namespace

absl::StatusOr<ReferenceResult> ReferenceForRequest(const v1::AttendRequest& request) {
  RA_ASSIGN_OR_RETURN(const AttentionParams p,
                      ReferenceParams(request.q(), request.k(), request.v(), request.options()));
  return ReferenceForward(p);
}

v1::AttendBackwardRequest MakeBackwardRequest(const v1::AttendRequest& forward,
                                              const v1::AttendResponse& response, uint64_t seed) {
  v1::AttendBackwardRequest r;
  r.set_request_id(forward.request_id());
  *r.mutable_q() = forward.q();
  *r.mutable_k() = forward.k();
  *r.mutable_v() = forward.v();
  *r.mutable_out() = response.out();
  *r.mutable_lse() = response.lse();
  *r.mutable_options() = forward.options();
  r.set_layout(forward.layout());
  // dout: q's shape and dtype, synthetic values of id kSyntheticDout.
  const v1::Tensor& q = forward.q();
  v1::Tensor* dout = r.mutable_dout();
  dout->set_dtype(q.dtype());
  *dout->mutable_shape() = q.shape();
  dout->mutable_data()->resize(q.data().size());
  if (q.shape_size() == 4) {
    FillSynthetic(seed, kSyntheticDout, static_cast<int>(q.shape(0)), q.shape(1),
                  static_cast<int>(q.shape(2)), static_cast<int>(q.shape(3)),
                  *FromProtoDType(q.dtype(), "q.dtype"), dout->mutable_data()->data());
  }
  return r;
}

double GradientTolerance(DType dtype) { return TolerancesOf(dtype).gradients; }

absl::StatusOr<GradientErrors> CompareGradientsWithReference(
    const v1::AttendBackwardRequest& request, const v1::AttendBackwardResponse& response) {
  RA_ASSIGN_OR_RETURN(const AttentionShape problem,
                      ProblemOf(request.q(), request.k(), request.v()));
  const std::pair<const char*, std::pair<const v1::Tensor*, const v1::Tensor*>> pairs[] = {
      {"dq", {&response.dq(), &request.q()}},
      {"dk", {&response.dk(), &request.k()}},
      {"dv", {&response.dv(), &request.v()}},
      {"out", {&request.out(), &request.q()}},
      {"dout", {&request.dout(), &request.q()}}};
  for (const auto& [name, tensors] : pairs) {
    const auto [got, like] = tensors;
    if (got->dtype() != like->dtype() || ShapeString(*got) != ShapeString(*like) ||
        got->data().size() != like->data().size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " is ", ShapeString(*got), " ", DTypeLabel(got->dtype()), " with ",
                       got->data().size(), " bytes; expected ", ShapeString(*like), " ",
                       DTypeLabel(like->dtype())));
    }
  }
  const int64_t lse_count = problem.lse_elems();
  if (static_cast<int64_t>(request.lse().data().size()) != lse_count * 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("lse has ", request.lse().data().size(), " bytes; expected ", lse_count * 4));
  }
  AttentionBackwardParams b;
  RA_ASSIGN_OR_RETURN(b.fwd,
                      ReferenceParams(request.q(), request.k(), request.v(), request.options()));
  b.out = request.out().data().data();
  b.dout = request.dout().data().data();
  b.out_dtype = problem.dtype;
  b.lse = reinterpret_cast<const float*>(request.lse().data().data());
  std::vector<float> unused(1);  // not written by the reference; its validation wants pointers
  b.dq = b.dk = b.dv = unused.data();
  SetContiguousBackwardStrides(&b);
  RA_ASSIGN_OR_RETURN(const ReferenceBackwardResult ref, ReferenceBackward(b));
  GradientErrors e;
  e.dq = CompareTensor(response.dq().data().data(), problem.dtype, ref.dq.data(),
                       static_cast<int64_t>(ref.dq.size()));
  e.dk = CompareTensor(response.dk().data().data(), problem.dtype, ref.dk.data(),
                       static_cast<int64_t>(ref.dk.size()));
  e.dv = CompareTensor(response.dv().data().data(), problem.dtype, ref.dv.data(),
                       static_cast<int64_t>(ref.dv.size()));
  return e;
}

absl::StatusOr<ReferenceErrors> CompareWithReference(const v1::AttendRequest& request,
                                                     const v1::AttendResponse& response) {
  RA_ASSIGN_OR_RETURN(const AttentionShape problem, ProblemOf(request));
  const v1::Tensor& q = request.q();
  const v1::Tensor& out = response.out();
  if (out.dtype() != q.dtype() || ShapeString(out) != ShapeString(q) ||
      static_cast<int64_t>(out.data().size()) != ExpectedTensorBytes(q)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "response out is ", ShapeString(out), " ", DTypeLabel(out.dtype()), " with ",
        out.data().size(), " bytes; expected q's shape ", ShapeString(q), " and dtype ",
        DTypeLabel(q.dtype()), " with ", ExpectedTensorBytes(q), " bytes"));
  }
  const v1::Tensor& lse = response.lse();
  const int64_t lse_count = problem.lse_elems();
  const bool has_lse = lse.shape_size() > 0;
  if (has_lse) {
    const std::string expected_shape =
        absl::StrCat("[", problem.batch, ", ", problem.heads, ", ", problem.seqlen_q, "]");
    if (lse.dtype() != v1::DTYPE_FP32 || ShapeString(lse) != expected_shape ||
        static_cast<int64_t>(lse.data().size()) != lse_count * 4) {
      return absl::InvalidArgumentError(
          absl::StrCat("response lse is ", ShapeString(lse), " ", DTypeLabel(lse.dtype()), " with ",
                       lse.data().size(), " bytes; expected ", expected_shape, " fp32"));
    }
  }
  RA_ASSIGN_OR_RETURN(const ReferenceResult ref, ReferenceForRequest(request));
  ReferenceErrors errors;
  errors.out = CompareTensor(out.data().data(), problem.dtype, ref.o.data(),
                             static_cast<int64_t>(ref.o.size()));
  if (has_lse) {
    errors.lse = CompareTensor(lse.data().data(), DType::kF32, ref.lse.data(), lse_count);
  }
  return errors;
}

absl::StatusOr<ErrorStats> CheckAgainstReference(const v1::AttendRequest& request,
                                                 const v1::AttendResponse& response) {
  RA_ASSIGN_OR_RETURN(const ReferenceErrors errors, CompareWithReference(request, response));
  return errors.out;
}

namespace {

// One call of the client under a progress bar named `bar_label`: prints "<what> in S s (client
// round trip)", or the call's error.
template <typename Response>
absl::StatusOr<Response> TimedCall(
    const char* bar_label, const char* what, std::ostream& out,
    const std::function<absl::StatusOr<Response>(const ProgressFn&)>& call) {
  const absl::Time start = absl::Now();
  absl::StatusOr<Response> response;
  {
    ProgressBar bar(bar_label);
    response = call([&bar](int64_t done, int64_t total) { bar.Update(done, total); });
  }
  const double round_trip = absl::ToDoubleSeconds(absl::Now() - start);
  if (!response.ok()) {
    out << ErrorLine(response.status());
  } else {
    out << absl::StrFormat("%s in %.3f s (client round trip)\n", what, round_trip);
  }
  return response;
}

// --shm: a session whose region fits `request`, registered with the service; prints it, or the
// error (then returned).
template <typename Request>
absl::StatusOr<std::unique_ptr<SharedMemorySession>> OpenSharedMemory(AttentionClient& client,
                                                                      const Request& request,
                                                                      const AttendCommandOptions& o,
                                                                      std::ostream& out) {
  absl::StatusOr<std::unique_ptr<SharedMemorySession>> session =
      SharedMemorySession::OpenFor(client, request, absl::Seconds(o.connect_timeout_seconds),
                                   o.cuda_shm ? SharedMemorySession::Kind::kCuda
                                              : SharedMemorySession::Kind::kSystem);
  if (!session.ok()) {
    out << ErrorLine(session.status());
    return session.status();
  }
  out << absl::StrFormat("shared memory: region %s (%s, %s) registered\n", (*session)->name(),
                         (*session)->where(), MiB((*session)->size()));
  return session;
}

// --backward: AttendBackward with the forward's out and lse and a synthetic dout; prints the
// gradients' summaries and timing table, and with --check their errors against the fp64
// reference backward. Returns the process exit code.
int RunBackward(const AttendCommandOptions& o, const v1::AttendRequest& request,
                const v1::AttendResponse& response, AttentionClient& client,
                int64_t max_unary_bytes, std::ostream& out) {
  const v1::AttendBackwardRequest backward = MakeBackwardRequest(request, response, o.seed);
  const absl::Duration timeout = absl::Seconds(o.timeout_seconds);
  std::unique_ptr<SharedMemorySession> shm;
  if (o.shm) {
    absl::StatusOr<std::unique_ptr<SharedMemorySession>> opened =
        OpenSharedMemory(client, backward, o, out);
    if (!opened.ok()) return ExitCodeOfCall(opened.status());
    shm = *std::move(opened);
  }
  SharedMemoryCopyTimes copies;
  const absl::StatusOr<v1::AttendBackwardResponse> grads = TimedCall<v1::AttendBackwardResponse>(
      "backward", "gradients", out, [&](const ProgressFn& progress) {
        if (shm) return shm->AttendBackward(backward, timeout, &copies);
        // AttendBackwardStream with --stream or past the server's unary limit.
        if (!o.streaming) {
          return client.AttendBackwardAuto(backward, timeout, max_unary_bytes, o.chunk_bytes,
                                           progress);
        }
        const int64_t chunk =
            max_unary_bytes > 0 ? std::min(o.chunk_bytes, max_unary_bytes) : o.chunk_bytes;
        return client.AttendBackwardStreaming(backward, timeout, chunk, progress);
      });
  if (!grads.ok()) return ExitCodeOfCall(grads.status());
  PrintTensorSummary("dq", grads->dq(), out);
  PrintTensorSummary("dk", grads->dk(), out);
  PrintTensorSummary("dv", grads->dv(), out);
  // FlashAttention's count: the backward is 2.5 forwards.
  out << FormatTimings(grads->request_id(), grads->plan(), grads->timings(),
                       2.5 * RequestFlops(request), shm ? &copies : nullptr);
  if (!o.grads_npy_prefix.empty()) {
    for (const auto& [name, tensor] : {std::pair{"dq", &grads->dq()}, std::pair{"dk", &grads->dk()},
                                       std::pair{"dv", &grads->dv()}}) {
      const std::string path = absl::StrCat(o.grads_npy_prefix, name, ".npy");
      if (absl::Status s = WriteOutput(*tensor, path); !s.ok()) {
        out << ErrorLine(s);
        return kExitFailure;
      }
      out << "wrote " << path << "\n";
    }
  }
  if (!o.check) return kExitOk;
  absl::StatusOr<GradientErrors> e = CompareGradientsWithReference(backward, *grads);
  if (!e.ok()) {
    out << ErrorLine(e.status());
    return kExitCheckFailed;
  }
  const DType dtype = *FromProtoDType(request.q().dtype(), "q.dtype");
  const double tolerance = GradientTolerance(dtype);
  bool ok = true;
  for (const auto& [name, stats] :
       {std::pair{"dq", &e->dq}, std::pair{"dk", &e->dk}, std::pair{"dv", &e->dv}}) {
    const bool pass =
        stats->nan_count == 0 && stats->inf_mismatch == 0 && stats->rel_l2 <= tolerance;
    ok &= pass;
    out << absl::StrFormat("check %s vs fp64: %s\n", name, stats->ToString());
  }
  out << (ok ? "check gradients: PASS" : "check gradients: FAIL (tolerance breached)")
      << absl::StrFormat(" (rel_l2 tolerance %.0e for %s)\n", tolerance,
                         std::string(DTypeName(dtype)));
  return ok ? kExitOk : kExitCheckFailed;
}

}  // namespace

int RunAttendCommand(const AttendCommandOptions& o, std::ostream& out) {
  if (absl::Status s = ValidateOptions(o); !s.ok()) {
    out << ErrorLine(s);
    return kExitUsage;
  }
  absl::StatusOr<v1::AttendRequest> request = BuildRequest(o);
  if (!request.ok()) {
    out << ErrorLine(request.status());
    return kExitFailure;
  }
  absl::StatusOr<ConnectedClient> connected =
      ConnectAndGetInfo(o.target, absl::Seconds(o.connect_timeout_seconds), o.credentials,
                        o.connections);
  if (!connected.ok()) {
    out << ErrorLine(connected.status());
    return ExitCodeOfCall(connected.status());
  }
  AttentionClient& client = *connected->client;
  const v1::InfoResponse& info = connected->info;
  out << absl::StrFormat(
      "server %s: version %s, world %d (%s), transport %s, max unary %s\n", o.target,
      info.version(), info.world_size(), info.ready() ? "ready" : "not ready",
      info.transport().empty() ? "-" : info.transport(),
      info.max_unary_bytes() > 0 ? MiB(info.max_unary_bytes()) : std::string("not set"));

  // Shared-memory requests are small whatever their tensors: always unary.
  const bool streaming =
      !o.shm && (o.streaming || NeedsStreaming(*request, info.max_unary_bytes()));
  int64_t chunk_bytes = o.chunk_bytes;
  if (info.max_unary_bytes() > 0) chunk_bytes = std::min(chunk_bytes, info.max_unary_bytes());
  // Past kSplitAboveBytes with several connections (and not forced to stream): parts by heads.
  const int parts = o.shm || o.streaming || static_cast<int64_t>(request->ByteSizeLong()) <=
                                                kSplitAboveBytes
                        ? 1
                        : HeadParts(AttendRpc(), *request, o.connections);
  std::string via = "Attend (unary)";
  if (o.shm) {
    via = "Attend (unary, system shared memory)";
  } else if (streaming) {
    via = absl::StrCat("AttendStream (chunks of ", chunk_bytes, " bytes)");
  }
  if (parts > 1) absl::StrAppend(&via, ", ", parts, " parts by K/V heads, one per connection");
  const int64_t request_bytes = static_cast<int64_t>(
      request->q().data().size() + request->k().data().size() + request->v().data().size());
  out << absl::StrFormat("request: q %s k/v %s %s, %s, causal=%d, layout %s, via %s\n",
                         ShapeString(request->q()), ShapeString(request->k()),
                         DTypeLabel(request->q().dtype()), MiB(request_bytes), o.causal, o.layout,
                         via);
  out.flush();

  std::unique_ptr<SharedMemorySession> shm;
  if (o.shm) {
    absl::StatusOr<std::unique_ptr<SharedMemorySession>> opened =
        OpenSharedMemory(client, *request, o, out);
    if (!opened.ok()) return ExitCodeOfCall(opened.status());
    shm = *std::move(opened);
  }
  SharedMemoryCopyTimes copies;
  const absl::Duration timeout = absl::Seconds(o.timeout_seconds);
  const absl::StatusOr<v1::AttendResponse> response =
      TimedCall<v1::AttendResponse>("attend", "response", out, [&](const ProgressFn& progress) {
        if (shm) return shm->Attend(*request, timeout, &copies);
        if (parts > 1) {
          return client.AttendAuto(*request, timeout, info.max_unary_bytes(), chunk_bytes);
        }
        return streaming ? client.AttendStreaming(*request, timeout, chunk_bytes, progress)
                         : client.Attend(*request, timeout);
      });
  if (!response.ok()) return ExitCodeOfCall(response.status());
  PrintTensorSummary("out", response->out(), out);
  if (response->lse().shape_size() > 0) PrintTensorSummary("lse", response->lse(), out);
  out << FormatTimings(*response, RequestFlops(*request), shm ? &copies : nullptr);

  if (!o.out_npy.empty()) {
    if (absl::Status s = WriteOutput(response->out(), o.out_npy); !s.ok()) {
      out << ErrorLine(s);
      return kExitFailure;
    }
    out << "wrote " << o.out_npy << "\n";
  }
  if (o.check && !RunCheck(*request, *response, out)) return kExitCheckFailed;
  if (o.backward) {
    return RunBackward(o, *request, *response, client, info.max_unary_bytes(), out);
  }
  return kExitOk;
}

}  // namespace ringattn
