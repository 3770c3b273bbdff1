// The cudnn backend: the expressibility rules (PlanCudnnCall), the forward (graph from the cache,
// execute, epilogue) and the backend itself (its backward is cudnn_backward.cc's). See
// cudnn_backend.h for the rules and their derivation.
#include "kernels/cudnn/cudnn_backend.h"

#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "kernels/backend_registry.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/cuda/fp32_inputs.h"
#include "kernels/cuda/non_finite_guard.h"
#include "kernels/cudnn/cudnn_backward.h"
#include "kernels/cudnn/cudnn_context.h"
#include "kernels/cudnn/merge_kernel.h"
#include "kernels/cudnn/sdpa_graph_cache.h"
#include "kernels/params_check.h"
#include "kernels/score_mod.h"

namespace ringattn {
namespace {

constexpr std::string_view kCudnnName = "cudnn";
constexpr int64_t kMaxSeqlen = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxExactFloatIndex = int64_t{1} << 24;

// Wide enough for any sum or product of two int64 positions.
using Wide = __int128;

Wide FloorDiv(Wide a, Wide b) {  // b > 0
  Wide q = a / b;
  if (a % b != 0 && a < 0) --q;
  return q;
}
Wide CeilDiv(Wide a, Wide b) {  // b > 0
  Wide q = a / b;
  if (a % b != 0 && a > 0) ++q;
  return q;
}
Wide Max(Wide a, Wide b) { return a > b ? a : b; }
Wide Min(Wide a, Wide b) { return a < b ? a : b; }

// R4 for one tensor: the pointer 16-byte aligned, the stride of each dimension of size > 1 a
// multiple of 8 elements (16 bytes in fp16/bf16). Returns the offending field or nullptr.
const char* MisalignedField(const char* ptr_name, const void* ptr, const char* const names[3],
                            const int64_t strides[3], const int64_t sizes[3]) {
  if (!Aligned16(ptr)) return ptr_name;
  for (int i = 0; i < 3; ++i) {
    if (sizes[i] > 1 && strides[i] % 8 != 0) return names[i];
  }
  return nullptr;
}

absl::Status CheckAlignment(const AttentionParams& p, const CudnnMaskPlan& plan) {
  const int64_t q_sizes[3] = {p.batch, p.heads, plan.q_count};
  const int64_t kv_sizes[3] = {p.batch, p.heads_k, plan.k_count};
  const char* const q_names[3] = {"q_batch_stride", "q_head_stride", "q_row_stride"};
  const char* const k_names[3] = {"k_batch_stride", "k_head_stride", "k_row_stride"};
  const char* const v_names[3] = {"v_batch_stride", "v_head_stride", "v_row_stride"};
  const int64_t q_strides[3] = {p.q_batch_stride, p.q_head_stride, p.q_row_stride};
  const int64_t k_strides[3] = {p.k_batch_stride, p.k_head_stride, p.k_row_stride};
  const int64_t v_strides[3] = {p.v_batch_stride, p.v_head_stride, p.v_row_stride};
  // The pointers cuDNN gets: the first live row of each tensor.
  const char* bad = MisalignedField("q", Advance(p.q, plan.q_begin * p.q_row_stride, p.dtype),
                                    q_names, q_strides, q_sizes);
  int64_t value = 0;
  if (bad == nullptr) {
    bad = MisalignedField("k", Advance(p.k, plan.k_begin * p.k_row_stride, p.dtype), k_names,
                          k_strides, kv_sizes);
  }
  if (bad == nullptr) {
    bad = MisalignedField("v", Advance(p.v, plan.k_begin * p.v_row_stride, p.dtype), v_names,
                          v_strides, kv_sizes);
  }
  if (bad == nullptr) return absl::OkStatus();
  const std::string_view name(bad);
  for (int i = 0; i < 3; ++i) {
    if (name == q_names[i]) value = q_strides[i];
    if (name == k_names[i]) value = k_strides[i];
    if (name == v_names[i]) value = v_strides[i];
  }
  const std::string got =
      name.size() == 1 ? std::string(" (pointer not 16-byte aligned)") : absl::StrCat(" = ", value);
  return absl::InvalidArgumentError(absl::StrCat(
      "the cudnn backend needs q, k and v 16-byte aligned with batch/head/row strides in "
      "multiples of 8 elements (cuDNN's vector loads); got ",
      std::string(name), got, "; use the cuda_reference backend"));
}

}  // namespace

// ---- The rules ------------------------------------------------------------------------------

bool CudnnMaskPlan::Allows(int64_t i, int64_t j) const {
  if (empty) return false;
  if (i < q_begin || i >= q_begin + q_count || j < k_begin || j >= k_begin + k_count) return false;
  const int64_t ii = i - q_begin, jj = j - k_begin;
  if (has_right_bound && jj > ii + right_bound) return false;
  if (has_left_bound && jj <= ii - left_bound) return false;
  return true;
}

std::string CudnnMaskPlan::ToString() const {
  if (empty) return "{empty}";
  std::string s = absl::StrCat("{q rows [", q_begin, ", +", q_count, ") k rows [", k_begin, ", +",
                               k_count, ")");
  if (has_right_bound) absl::StrAppend(&s, " right_bound=", right_bound);
  if (has_left_bound) absl::StrAppend(&s, " left_bound=", left_bound);
  if (padding_mask) absl::StrAppend(&s, " padding_mask");
  if (!has_right_bound && !has_left_bound) absl::StrAppend(&s, " unmasked");
  return s + "}";
}

absl::StatusOr<CudnnMaskPlan> PlanCudnnCall(const AttentionParams& p) {
  // R1-R3, R5: options cuDNN has no exact form for.
  if (p.dtype != DType::kBF16 && p.dtype != DType::kF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("the cudnn backend supports dtype bf16 and fp16, got dtype ",
                     std::string(DTypeName(p.dtype)), "; use the cuda_reference backend"));
  }
  if (p.partial_o != nullptr) {
    return absl::InvalidArgumentError(
        "the cudnn backend does not support partial_o (a partial result to merge with before "
        "writing); use merge_into_output");
  }
  if (p.alibi_slopes != nullptr) {
    return absl::InvalidArgumentError(
        "the cudnn backend does not support alibi_slopes; use the cuda backend");
  }
  if (p.q_pos_split != kNoPosSplit || p.k_pos_split != kNoPosSplit) {
    return absl::InvalidArgumentError(
        "the cudnn backend takes one run of positions per call (q_pos_split and k_pos_split "
        "unset); the ring splits a two-run shard into segment calls for it");
  }
  if (p.seq_bounds != nullptr) {
    return absl::InvalidArgumentError(
        "the cudnn backend does not take seq_bounds (packed variable-length sequences); the cuda "
        "and cpu backends have them");
  }
  if (p.dropout_p > 0.0f) {
    return absl::InvalidArgumentError(
        "the cudnn backend does not take dropout_p > 0 (its dropout mask is not ours: a ring "
        "needs one mask over global positions); the cpu backends have it");
  }
  if (p.softcap > 0.0f) {
    return absl::InvalidArgumentError(
        "the cudnn backend does not support softcap; use the cuda backend");
  }
  if (p.seqlen_q > kMaxSeqlen || p.seqlen_k > kMaxSeqlen) {
    return absl::InvalidArgumentError(
        absl::StrCat("the cudnn backend supports seqlen_q and seqlen_k below 2^31, got ",
                     p.seqlen_q, " and ", p.seqlen_k));
  }

  CudnnMaskPlan plan;
  const int64_t sq = p.seqlen_q, sk = p.seqlen_k;
  if (sq == 0 || sk == 0) {
    plan.empty = true;
    return plan;
  }
  const bool masked = p.causal || p.window_left >= 0 || p.window_right >= 0;
  bool unmasked = !masked;
  if (masked) {
    const BlockMask block =
        ClassifyBlock(p, QueryPos(p, 0), QueryPos(p, sq - 1), KeyPos(p, 0), KeyPos(p, sk - 1));
    if (!block.any) {
      plan.empty = true;
      return plan;
    }
    unmasked = block.all;
    if (!unmasked && p.q_pos_stride != p.k_pos_stride) {  // R6
      return absl::InvalidArgumentError(absl::StrCat(
          "the cudnn backend cannot express this causal/window mask: q_pos_stride (",
          p.q_pos_stride, ") != k_pos_stride (", p.k_pos_stride,
          ") and the mask allows some but not all query/key pairs of the call (not a diagonal "
          "band); use the cuda backend"));
    }
  }
  if (unmasked) {
    plan.q_begin = 0;
    plan.q_count = sq;
    plan.k_begin = 0;
    plan.k_count = sk;
    return plan;
  }

  // The band a <= j - i <= b (see cudnn_backend.h), each side possibly open.
  const Wide s = p.q_pos_stride;
  const Wide e = static_cast<Wide>(p.k_pos_offset) - p.q_pos_offset;
  bool has_hi = p.window_right >= 0, has_lo = p.window_left >= 0;
  Wide hi = p.window_right;
  if (p.causal) {
    hi = has_hi ? Min(hi, 0) : 0;
    has_hi = true;
  }
  const Wide lo = -static_cast<Wide>(p.window_left);
  const Wide a = has_lo ? CeilDiv(lo - e, s) : 0;
  const Wide b = has_hi ? FloorDiv(hi - e, s) : 0;
  if (has_lo && has_hi && a > b) {
    plan.empty = true;
    return plan;
  }
  // Live rows: some key j in [0, sk) with a <= j - i <= b.
  const Wide i0 = has_hi ? Max(0, -b) : 0;
  const Wide i1 = has_lo ? Min(sq - 1, sk - 1 - a) : sq - 1;
  if (i0 > i1) {
    plan.empty = true;
    return plan;
  }
  // Keys seen by some live row.
  const Wide j0 = has_lo ? Max(0, i0 + a) : 0;
  const Wide j1 = has_hi ? Min(sk - 1, i1 + b) : sk - 1;
  plan.q_begin = static_cast<int64_t>(i0);
  plan.q_count = static_cast<int64_t>(i1 - i0 + 1);
  plan.k_begin = static_cast<int64_t>(j0);
  plan.k_count = static_cast<int64_t>(j1 - j0 + 1);
  // The band relative to the live block: a' <= 0 <= b' (j0 >= i0 + a; j0 <= i0 + b).
  const Wide a_live = a + i0 - j0;
  const Wide b_live = b + i0 - j0;
  if (has_hi && b_live < plan.k_count - 1) {
    plan.has_right_bound = true;
    plan.right_bound = static_cast<int64_t>(b_live);
  }
  if (has_lo && a_live > -(plan.q_count - 1)) {
    plan.has_left_bound = true;
    plan.left_bound = static_cast<int64_t>(1 - a_live);
    if (!plan.has_right_bound) {  // older cuDNN needs the pair; this bound masks nothing
      plan.has_right_bound = true;
      plan.right_bound = plan.k_count - 1;
    }
    plan.padding_mask = plan.q_count > plan.k_count;
    if (plan.q_count > kMaxExactFloatIndex ||
        plan.k_count + plan.left_bound > kMaxExactFloatIndex) {
      return absl::InvalidArgumentError(absl::StrCat(  // R7
          "the cudnn backend supports a window_left only on calls whose live block has fewer "
          "than 2^24 rows and keys (cuDNN compares the left bound in fp32); got ",
          plan.q_count, " rows and ", plan.k_count, " keys; use the cuda backend"));
    }
  }
  // With neither bound, every pair of the live block is allowed (the trim did the masking).
  return plan;
}

absl::Status CudnnSupports(const AttentionParams& p) {
  RA_RETURN_IF_ERROR(ValidateParams(p));
  RA_ASSIGN_OR_RETURN(const CudnnMaskPlan plan, PlanCudnnCall(p));
  if (!plan.empty) RA_RETURN_IF_ERROR(CheckAlignment(p, plan));
  return absl::OkStatus();
}

// ---- The backend ----------------------------------------------------------------------------

namespace {

// Forward on `stream` with `c` (see cudnn_backend.h: the plan, cuDNN on the live block, the
// epilogue). `originals`, when given, is the call with its fp32 inputs, of which `p` holds the
// 16-bit copies (fp32_inputs.h): the guard's careful kernel computes from them.
absl::Status CudnnForward(CudnnDeviceContext& c, const AttentionParams& p, cudaStream_t stream,
                          const AttentionParams* originals = nullptr) {
  RA_RETURN_IF_ERROR(ValidateParams(p));
  RA_ASSIGN_OR_RETURN(const CudnnMaskPlan plan, PlanCudnnCall(p));
  if (!plan.empty) RA_RETURN_IF_ERROR(CheckAlignment(p, plan));
  if (p.seqlen_q == 0) return absl::OkStatus();
  if (plan.empty && p.merge_into_output) return absl::OkStatus();  // nothing to merge

  std::lock_guard<std::mutex> lock(c.mutex());
  RA_RETURN_IF_ERROR(c.WaitForPrevious(stream));

  CudnnEpilogueParams e;
  e.batch = p.batch;
  e.heads = p.heads;
  e.head_dim = p.head_dim;
  e.seqlen_q = p.seqlen_q;
  e.o = p.o;
  e.o_dtype = p.o_dtype;
  e.o_batch_stride = p.o_batch_stride;
  e.o_row_stride = p.o_row_stride;
  e.o_head_stride = p.o_head_stride;
  e.lse = p.lse;
  e.lse_batch_stride = p.lse_batch_stride;
  e.lse_head_stride = p.lse_head_stride;
  e.merge = p.merge_into_output;

  if (plan.empty) {  // no pair allowed: zero rows, or nothing to merge; no input is read
    RA_RETURN_IF_ERROR(LaunchCudnnEpilogue(e, stream));
    return c.RecordDone(stream);
  }
  // cuDNN and the epilogue, which writes nothing when the non-finite guard's word is set.
  auto fast = [&](const uint32_t* careful) -> absl::Status {
    RA_RETURN_IF_ERROR(c.EnsureHandle());
    const int64_t b = p.batch, h = p.heads, d = p.head_dim, sq = plan.q_count;
    // cuDNN writes o in place when nothing needs converting or merging and o suits its stores.
    const int64_t o_sizes[3] = {b, h, sq};
    const int64_t o_strides[3] = {p.o_batch_stride, p.o_head_stride, p.o_row_stride};
    void* const o_live = Advance(p.o, plan.q_begin * p.o_row_stride, p.o_dtype);
    bool in_place = !p.merge_into_output && p.o_dtype == p.dtype && Aligned16(o_live);
    for (int i = 0; i < 3; ++i) in_place = in_place && (o_sizes[i] <= 1 || o_strides[i] % 8 == 0);

    SdpaGraphKey key = PlannedGraphKey(p, plan);
    // Scratch O: packed [b, s, h, d] (rows of the epilogue's warps contiguous).
    const int64_t scratch_stride[3] = {sq * h * d, d, h * d};
    for (int i = 0; i < 3; ++i) key.o_stride[i] = in_place ? o_strides[i] : scratch_stride[i];
    // A graph not built yet: our kernel computes the whole call (behind the same guard word)
    // while the graph is built in the background.
    if (c.MayBuildInBackground(key) && CheckFlashForwardSupport(p).ok() &&
        c.RequestBackgroundBuild(key)) {
      return FlashForward(p, stream, careful);
    }
    RA_ASSIGN_OR_RETURN(const SdpaGraph* graph, c.graphs().GetOrBuild(c.handle(), key));

    // Workspace: [cuDNN's][stats][scratch O][seq_len_q, seq_len_kv].
    const int64_t cudnn_bytes = Align256(SdpaWorkspaceBytes(*graph));
    const int64_t stats_bytes = Align256(b * h * sq * static_cast<int64_t>(sizeof(float)));
    const int64_t scratch_bytes = in_place ? 0 : Align256(b * sq * h * d * DTypeSize(p.dtype));
    const int64_t seqlen_bytes = plan.padding_mask ? Align256(2 * b * sizeof(int32_t)) : 0;
    RA_RETURN_IF_ERROR(
        c.EnsureWorkspace(cudnn_bytes + stats_bytes + scratch_bytes + seqlen_bytes, stream));
    char* const base = c.workspace();
    float* const stats = reinterpret_cast<float*>(base + cudnn_bytes);
    void* const scratch = base + cudnn_bytes + stats_bytes;
    int32_t* const seqlens =
        reinterpret_cast<int32_t*>(base + cudnn_bytes + stats_bytes + scratch_bytes);

    SdpaTensors t;
    t.q = Advance(p.q, plan.q_begin * p.q_row_stride, p.dtype);
    t.k = Advance(p.k, plan.k_begin * p.k_row_stride, p.dtype);
    t.v = Advance(p.v, plan.k_begin * p.v_row_stride, p.dtype);
    t.o = in_place ? o_live : scratch;
    t.stats = stats;
    if (plan.padding_mask) {
      t.seq_len_q = seqlens;
      t.seq_len_kv = seqlens + b;
      RA_RETURN_IF_ERROR(LaunchFillInt32(t.seq_len_q, b, static_cast<int32_t>(sq), stream));
      RA_RETURN_IF_ERROR(
          LaunchFillInt32(t.seq_len_kv, b, static_cast<int32_t>(plan.k_count), stream));
    }
    RA_RETURN_IF_ERROR(c.BindHandle(stream));
    RA_RETURN_IF_ERROR(ExecuteSdpa(*graph, c.handle(), t, base));

    e.live_begin = plan.q_begin;
    e.live_count = sq;
    e.stats = stats;
    e.o_new = t.o;
    e.o_new_dtype = p.dtype;
    e.o_new_batch_stride = key.o_stride[0];
    e.o_new_head_stride = key.o_stride[1];
    e.o_new_row_stride = key.o_stride[2];
    e.o_written_in_place = in_place;

    e.skip_if_set = careful;
    return LaunchCudnnEpilogue(e, stream);
  };
  // Behind the non-finite guard (non_finite_guard.h), which scans the live block only: a call
  // whose live inputs hold NaN, infinities or huge values is computed by the simple kernel.
  RA_RETURN_IF_ERROR(GuardedForward(originals != nullptr ? *originals : p,
                                    RowSpan{plan.q_begin, plan.q_count},
                                    RowSpan{plan.k_begin, plan.k_count}, stream, fast,
                                    originals != nullptr ? &p : nullptr));
  return c.RecordDone(stream);
}

class CudnnBackendImpl final : public CudnnBackend {
 public:
  explicit CudnnBackendImpl(const CudnnBackendOptions& options)
      : context_(options.dynamic_shapes) {
    context_.set_background_builds(options.background_builds);
  }

  std::string_view name() const override { return kCudnnName; }
  BackendCapabilities capabilities() const override {
    return {.backward = true,
            .fp32_inputs = true,
            .fp32_forward_operands = DType::kF16,  // fp32_inputs.h
            .fp32_backward_operands = DType::kBF16,
            .non_finite_rule = true};
  }

  int64_t graph_builds() const override {
    std::lock_guard<std::mutex> lock(context_.mutex());
    return context_.graphs().builds();
  }
  CudnnGraphStats graph_stats() const override {
    std::lock_guard<std::mutex> lock(context_.mutex());
    const SdpaGraphCacheStats& s = context_.graphs().stats();
    return {.builds = s.builds,
            .dynamic_builds = s.dynamic_builds,
            .static_fallbacks = s.static_fallbacks,
            .kernel_classes = s.kernel_classes,
            .own_kernel_calls = context_.own_kernel_calls()};
  }
  bool dynamic_shapes() const override {
    std::lock_guard<std::mutex> lock(context_.mutex());
    return context_.graphs().dynamic_shapes();
  }
  int64_t workspace_bytes() const override {
    std::lock_guard<std::mutex> lock(context_.mutex());
    return context_.workspace_bytes();
  }

  absl::Status Prewarm(const CudnnPrewarmSpec& spec) override {
    std::lock_guard<std::mutex> lock(context_.mutex());
    if (!context_.graphs().dynamic_shapes()) return absl::OkStatus();
    RA_RETURN_IF_ERROR(context_.EnsureHandle());
    absl::Status first_error;
    for (const SdpaGraphKey& key : PrewarmKeys(spec)) {
      absl::StatusOr<const SdpaGraph*> graph = context_.graphs().GetOrBuild(context_.handle(), key);
      if (!graph.ok() && first_error.ok()) first_error = graph.status();
    }
    return first_error;
  }
  void set_background_builds(bool on) override {
    std::lock_guard<std::mutex> lock(context_.mutex());
    context_.set_background_builds(on);
  }
  absl::Status WaitForGraphs() override { return context_.WaitForBackgroundBuilds(); }

 protected:
  // fp32 inputs run on 16-bit copies (fp32_inputs.h), as on the cuda backend.
  absl::Status DoForward(const AttentionParams& p, const ExecutionContext& ctx) override {
    const cudaStream_t stream = StreamOf(ctx);
    if (p.dtype != DType::kF32) return CudnnForward(context_, p, stream);
    RA_RETURN_IF_ERROR(ValidateParams(p));
    RA_RETURN_IF_ERROR(CudnnSupports(HalfCopyShape(p, DType::kF16)));  // before any rounding
    return WithHalfInputs(p, stream, [&](const AttentionParams& half) {
      return CudnnForward(context_, half, stream, &p);
    });
  }
  absl::Status DoBackward(const AttentionBackwardParams& p, const ExecutionContext& ctx) override {
    const cudaStream_t stream = StreamOf(ctx);
    if (p.fwd.dtype != DType::kF32) return CudnnBackward(context_, p, stream);
    RA_RETURN_IF_ERROR(ValidateBackwardParams(p));
    if (p.out_dtype != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cudnn: out_dtype (", std::string(DTypeName(p.out_dtype)),
          ") must be the input dtype (fp32)"));
    }
    RA_RETURN_IF_ERROR(CudnnBackwardSupports(HalfCopyShape(p)));  // before any rounding
    return WithHalfInputs(p, stream, [&](const AttentionBackwardParams& half) {
      return CudnnBackward(context_, half, stream);
    });
  }
  absl::Status DoComputeDelta(const AttentionBackwardParams& p, float* delta,
                              const ExecutionContext& ctx) override {
    return CudnnComputeDelta(context_, p, delta, StreamOf(ctx));
  }

 private:
  CudnnDeviceContext context_;
};

// The registered backend's options: the environment's, or the defaults (logged) where it is
// invalid.
CudnnBackendOptions RegisteredOptions() {
  absl::StatusOr<CudnnBackendOptions> options = CudnnBackendOptionsFromEnv();
  if (options.ok()) return *options;
  LogWarning("cudnn", "ignoring an invalid environment variable; using the default",
             {{"error", options.status().message()}});
  return CudnnBackendOptions();
}

}  // namespace

absl::StatusOr<CudnnBackendOptions> CudnnBackendOptionsFromEnv() {
  CudnnBackendOptions options;
  const char* env = std::getenv(kCudnnDynamicEnv);
  const std::string_view value = env == nullptr ? "" : env;
  if (value == "1" || value == "true" || value == "on") {
    options.dynamic_shapes = true;
  } else if (!(value.empty() || value == "0" || value == "false" || value == "off")) {
    return absl::InvalidArgumentError(absl::StrCat(kCudnnDynamicEnv, "='", std::string(value),
                                                   "': expected 0, 1, false, true, off or on"));
  }
  return options;
}

std::unique_ptr<CudnnBackend> MakeCudnnBackend(const CudnnBackendOptions& options) {
  return std::make_unique<CudnnBackendImpl>(options);
}

// Kept in every program that links ra_kernels_cudnn (kernels/cudnn/CMakeLists.txt: --undefined).
extern "C" const bool ringattn_register_cudnn_backends = RegisterBackends({
    {kCudnnName,
     [] { return std::unique_ptr<AttentionBackend>(MakeCudnnBackend(RegisteredOptions())); }},
});

}  // namespace ringattn
