// Building and executing cuDNN SDPA graphs, forward and backward, with cudnn-frontend.
#include "kernels/cudnn/sdpa_graph_cache.h"

#include <cudnn_frontend.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/log.h"
#include "base/status_macros.h"

static_assert(CUDNN_FRONTEND_VERSION >= 11100,
              "the cudnn backend needs cudnn-frontend >= 1.11 (diagonal band bounds)");

namespace ringattn {

namespace fe = cudnn_frontend;

struct SdpaGraph {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace_bytes = 0;
  bool backward = false;
  bool padding_mask = false;
};

namespace {

// Tensor uids of the variant pack.
enum : fe::graph::Tensor_attributes::uid_t {
  kUidQ = 1,
  kUidK = 2,
  kUidV = 3,
  kUidO = 4,
  kUidStats = 5,
  kUidSeqLenQ = 6,
  kUidSeqLenKv = 7,
  kUidDO = 8,
  kUidDQ = 9,
  kUidDK = 10,
  kUidDV = 11,
};

const char* CodeName(fe::error_code_t code) {
  switch (code) {
    case fe::error_code_t::OK:
      return "OK";
    case fe::error_code_t::ATTRIBUTE_NOT_SET:
      return "ATTRIBUTE_NOT_SET";
    case fe::error_code_t::SHAPE_DEDUCTION_FAILED:
      return "SHAPE_DEDUCTION_FAILED";
    case fe::error_code_t::INVALID_TENSOR_NAME:
      return "INVALID_TENSOR_NAME";
    case fe::error_code_t::INVALID_VARIANT_PACK:
      return "INVALID_VARIANT_PACK";
    case fe::error_code_t::GRAPH_NOT_SUPPORTED:
      return "GRAPH_NOT_SUPPORTED";
    case fe::error_code_t::GRAPH_EXECUTION_PLAN_CREATION_FAILED:
      return "GRAPH_EXECUTION_PLAN_CREATION_FAILED";
    case fe::error_code_t::GRAPH_EXECUTION_FAILED:
      return "GRAPH_EXECUTION_FAILED";
    case fe::error_code_t::HEURISTIC_QUERY_FAILED:
      return "HEURISTIC_QUERY_FAILED";
    case fe::error_code_t::UNSUPPORTED_GRAPH_FORMAT:
      return "UNSUPPORTED_GRAPH_FORMAT";
    case fe::error_code_t::CUDA_API_FAILED:
      return "CUDA_API_FAILED";
    case fe::error_code_t::CUDNN_BACKEND_API_FAILED:
      return "CUDNN_BACKEND_API_FAILED";
    case fe::error_code_t::INVALID_CUDA_DEVICE:
      return "INVALID_CUDA_DEVICE";
    case fe::error_code_t::HANDLE_ERROR:
      return "HANDLE_ERROR";
    case fe::error_code_t::INVALID_VALUE:
      return "INVALID_VALUE";
    case fe::error_code_t::NVRTC_COMPILATION_FAILED:
      return "NVRTC_COMPILATION_FAILED";
  }
  return "UNKNOWN";
}

// A failed build step as a status. cuDNN refusing the configuration (no engine, unsupported
// graph) is InvalidArgument: this backend cannot compute it. The rest is Internal.
absl::Status BuildError(const char* step, fe::error_t e, const SdpaGraphKey& key, bool* transient) {
  // A CUDA or handle failure may be transient (out of memory): not remembered by the cache.
  *transient = e.code == fe::error_code_t::CUDA_API_FAILED ||
               e.code == fe::error_code_t::HANDLE_ERROR ||
               e.code == fe::error_code_t::INVALID_CUDA_DEVICE;
  const std::string message =
      absl::StrCat("cuDNN SDPA ", key.backward ? "backward " : "", "graph ", step, " failed (",
                   CodeName(e.code), "): ", e.err_msg, "; graph ", key.ToString());
  switch (e.code) {
    case fe::error_code_t::GRAPH_NOT_SUPPORTED:
    case fe::error_code_t::GRAPH_EXECUTION_PLAN_CREATION_FAILED:
    case fe::error_code_t::HEURISTIC_QUERY_FAILED:
      return absl::InvalidArgumentError(
          absl::StrCat("the cudnn backend cannot run this configuration (cuDNN refused it; use "
                       "the cuda backend): ",
                       message));
    default:
      return absl::InternalError(message);
  }
}

fe::DataType_t IoType(DType t) {
  return t == DType::kF16 ? fe::DataType_t::HALF : fe::DataType_t::BFLOAT16;
}

using TensorPtr = std::shared_ptr<fe::graph::Tensor_attributes>;

// An input of the key's dtype, [b, heads, rows, d] with {batch, head, row} strides `stride`.
TensorPtr Input(fe::graph::Graph& graph, const SdpaGraphKey& key, const char* name,
                fe::graph::Tensor_attributes::uid_t uid, int64_t heads, int64_t rows,
                const int64_t stride[3]) {
  return graph.tensor(fe::graph::Tensor_attributes()
                          .set_name(name)
                          .set_uid(uid)
                          .set_data_type(IoType(key.dtype))
                          .set_dim({key.batch, heads, rows, key.head_dim})
                          .set_stride({stride[0], stride[1], stride[2], 1}));
}

// A [batch] int32 sequence-length input of the padding mask.
TensorPtr SeqLen(fe::graph::Graph& graph, const SdpaGraphKey& key, const char* name,
                 fe::graph::Tensor_attributes::uid_t uid) {
  return graph.tensor(fe::graph::Tensor_attributes()
                          .set_name(name)
                          .set_uid(uid)
                          .set_dim({key.batch, 1, 1, 1})
                          .set_stride({1, 1, 1, 1})
                          .set_data_type(fe::DataType_t::INT32));
}

// The mask of `key` (TOP_LEFT band bounds, padding mask) on either direction's options.
template <typename Options>
void SetMask(fe::graph::Graph& graph, const SdpaGraphKey& key, Options& options) {
  // Only TOP_LEFT alignment: every offset is folded into the bounds (cudnn_backend.h).
  options.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT);
  if (key.has_right_bound) {
    options.set_diagonal_band_right_bound(static_cast<int>(key.right_bound));
  }
  if (key.has_left_bound) options.set_diagonal_band_left_bound(static_cast<int>(key.left_bound));
  if (key.padding_mask) {
    options.set_padding_mask(true)
        .set_seq_len_q(SeqLen(graph, key, "seq_len_q", kUidSeqLenQ))
        .set_seq_len_kv(SeqLen(graph, key, "seq_len_kv", kUidSeqLenKv));
  }
}

float Scale(const SdpaGraphKey& key) {
  float scale;
  std::memcpy(&scale, &key.scale_bits, sizeof(scale));
  return scale;
}

// Q, K, V in; O and the fp32 Stats out.
absl::Status DefineForward(fe::graph::Graph& graph, const SdpaGraphKey& key) {
  const int64_t b = key.batch, h = key.heads, sq = key.seqlen_q, d = key.head_dim;
  auto q = Input(graph, key, "Q", kUidQ, h, sq, key.q_stride);
  auto k = Input(graph, key, "K", kUidK, key.heads_k, key.seqlen_k, key.k_stride);
  auto v = Input(graph, key, "V", kUidV, key.heads_k, key.seqlen_k, key.v_stride);
  fe::graph::SDPA_attributes options;
  options.set_name("ringattn_sdpa").set_generate_stats(true).set_attn_scale(Scale(key));
  SetMask(graph, key, options);
  auto outputs = graph.sdpa(q, k, v, options);
  const TensorPtr& o = outputs[0];
  const TensorPtr& stats = outputs[1];
  if (o == nullptr || stats == nullptr) {
    return absl::InternalError(
        absl::StrCat("cudnn-frontend sdpa() returned no O or Stats; graph ", key.ToString()));
  }
  o->set_output(true)
      .set_uid(kUidO)
      .set_data_type(IoType(key.dtype))
      .set_dim({b, h, sq, d})
      .set_stride({key.o_stride[0], key.o_stride[1], key.o_stride[2], 1});
  stats->set_output(true)
      .set_uid(kUidStats)
      .set_data_type(fe::DataType_t::FLOAT)
      .set_dim({b, h, sq, 1})
      .set_stride({h * sq, sq, 1, 1});
  return absl::OkStatus();
}

// Q, K, V, O, dO and the fp32 Stats in; dQ, dK and dV out, packed [b, s, h(_k), d].
absl::Status DefineBackward(fe::graph::Graph& graph, const SdpaGraphKey& key) {
  const int64_t b = key.batch, h = key.heads, hk = key.heads_k, sq = key.seqlen_q,
                sk = key.seqlen_k, d = key.head_dim;
  auto q = Input(graph, key, "Q", kUidQ, h, sq, key.q_stride);
  auto k = Input(graph, key, "K", kUidK, hk, sk, key.k_stride);
  auto v = Input(graph, key, "V", kUidV, hk, sk, key.v_stride);
  auto o = Input(graph, key, "O", kUidO, h, sq, key.o_stride);
  auto dout = Input(graph, key, "dO", kUidDO, h, sq, key.do_stride);
  auto stats = graph.tensor(fe::graph::Tensor_attributes()
                                .set_name("Stats")
                                .set_uid(kUidStats)
                                .set_data_type(fe::DataType_t::FLOAT)
                                .set_dim({b, h, sq, 1})
                                .set_stride({h * sq, sq, 1, 1}));
  fe::graph::SDPA_backward_attributes options;
  options.set_name("ringattn_sdpa_backward").set_attn_scale(Scale(key));
  SetMask(graph, key, options);
  auto grads = graph.sdpa_backward(q, k, v, o, dout, stats, options);
  if (grads[0] == nullptr || grads[1] == nullptr || grads[2] == nullptr) {
    return absl::InternalError(absl::StrCat(
        "cudnn-frontend sdpa_backward() returned no dQ/dK/dV; graph ", key.ToString()));
  }
  const struct {
    fe::graph::Tensor_attributes::uid_t uid;
    int64_t heads, rows;
  } outs[3] = {{kUidDQ, h, sq}, {kUidDK, hk, sk}, {kUidDV, hk, sk}};
  for (int i = 0; i < 3; ++i) {
    grads[i]
        ->set_output(true)
        .set_uid(outs[i].uid)
        .set_data_type(IoType(key.dtype))
        .set_dim({b, outs[i].heads, outs[i].rows, d})
        .set_stride({outs[i].rows * outs[i].heads * d, d, outs[i].heads * d, 1});
  }
  return absl::OkStatus();
}

// Builds `key`'s graph: static when `kernel_cache` is null, else with dynamic shapes and that
// cache. When this build is the one that binds the cache to its operation graph, *anchor gets
// the graph (kept alive as long as the cache, which refers to it).
absl::StatusOr<std::unique_ptr<SdpaGraph>> Build(
    cudnnHandle_t handle, const SdpaGraphKey& key,
    const std::shared_ptr<fe::KernelCache>& kernel_cache, std::shared_ptr<fe::graph::Graph>* anchor,
    bool* transient) {
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(IoType(key.dtype))
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  if (kernel_cache != nullptr)
    graph->set_dynamic_shape_enabled(true).set_kernel_cache(kernel_cache);
  RA_RETURN_IF_ERROR(key.backward ? DefineBackward(*graph, key) : DefineForward(*graph, key));

  if (fe::error_t e = graph->validate(); e.is_bad())
    return BuildError("validate", e, key, transient);
  const bool binds_cache = kernel_cache != nullptr && !kernel_cache->is_finalized();
  fe::error_t op_graph_error = graph->build_operation_graph(handle);
  if (binds_cache && kernel_cache->is_finalized()) *anchor = graph;
  if (op_graph_error.is_bad()) {
    return BuildError("build_operation_graph", op_graph_error, key, transient);
  }
  if (fe::error_t e = graph->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
      e.is_bad()) {
    return BuildError("create_execution_plans", e, key, transient);
  }
  if (fe::error_t e = graph->check_support(); e.is_bad())
    return BuildError("check_support", e, key, transient);
  if (fe::error_t e = graph->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE); e.is_bad()) {
    return BuildError("build_plans", e, key, transient);
  }
  int64_t workspace = 0;
  if (fe::error_t e = graph->get_workspace_size(workspace); e.is_bad()) {
    return BuildError("get_workspace_size", e, key, transient);
  }
  auto built = std::make_unique<SdpaGraph>();
  built->graph = std::move(graph);
  built->workspace_bytes = workspace;
  built->backward = key.backward;
  built->padding_mask = key.padding_mask;
  return built;
}

// Build, with an exception from the frontend as a (transient: not remembered) Internal error;
// *threw says whether that happened.
absl::StatusOr<std::unique_ptr<SdpaGraph>> GuardedBuild(
    cudnnHandle_t handle, const SdpaGraphKey& key,
    const std::shared_ptr<fe::KernelCache>& kernel_cache, std::shared_ptr<fe::graph::Graph>* anchor,
    bool* transient, bool* threw = nullptr) {
  try {
    return Build(handle, key, kernel_cache, anchor, transient);
  } catch (const std::exception& ex) {
    *transient = true;
    if (threw != nullptr) *threw = true;
    return absl::InternalError(
        absl::StrCat("cuDNN SDPA graph build threw: ", ex.what(), "; graph ", key.ToString()));
  }
}

using VariantPack = std::unordered_map<fe::graph::Tensor_attributes::uid_t, void*>;

absl::Status Execute(const SdpaGraph& graph, cudnnHandle_t handle, VariantPack pack,
                     int32_t* seq_len_q, int32_t* seq_len_kv, void* workspace) {
  if (graph.padding_mask) {
    pack.emplace(kUidSeqLenQ, seq_len_q);
    pack.emplace(kUidSeqLenKv, seq_len_kv);
  }
  const char* const what = graph.backward ? "cuDNN SDPA backward execute" : "cuDNN SDPA execute";
  fe::error_t e;
  try {
    e = graph.graph->execute(handle, pack, workspace);
  } catch (const std::exception& ex) {
    return absl::InternalError(absl::StrCat(what, " threw: ", ex.what()));
  }
  if (e.is_bad()) {
    return absl::InternalError(absl::StrCat(what, " failed (", CodeName(e.code), "): ", e.err_msg));
  }
  return absl::OkStatus();
}

}  // namespace

std::string SdpaGraphKey::ToString() const {
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  auto strides = [](const int64_t* s) {
    return absl::StrCat("{", s[0], ",", s[1], ",", s[2], "}");
  };
  return absl::StrCat("{", backward ? "backward " : "", std::string(DTypeName(dtype)), " b=", batch,
                      " h=", heads, " h_k=", heads_k, " s_q=", seqlen_q, " s_k=", seqlen_k,
                      " d=", head_dim, " q_strides(b,h,s)=", strides(q_stride),
                      " k_strides=", strides(k_stride), " v_strides=", strides(v_stride),
                      " o_strides=", strides(o_stride),
                      backward ? absl::StrCat(" do_strides=", strides(do_stride)) : std::string(),
                      has_right_bound ? absl::StrCat(" right_bound=", right_bound) : std::string(),
                      has_left_bound ? absl::StrCat(" left_bound=", left_bound) : std::string(),
                      padding_mask ? " padding_mask" : "", " scale=", scale, "}");
}

namespace {

// FNV-1a over 64-bit words.
class Fnv {
 public:
  void Mix(uint64_t x) {
    for (int i = 0; i < 8; ++i) {
      h_ ^= (x >> (8 * i)) & 0xffu;
      h_ *= 1099511628211ull;
    }
  }
  size_t value() const { return static_cast<size_t>(h_); }

 private:
  uint64_t h_ = 1469598103934665603ull;
};

}  // namespace

size_t SdpaGraphKeyHash::operator()(const SdpaGraphKey& k) const {
  Fnv f;
  f.Mix(k.backward);
  f.Mix(static_cast<uint64_t>(k.dtype));
  for (int64_t x : {k.batch, k.heads, k.heads_k, k.seqlen_q, k.seqlen_k, k.head_dim}) {
    f.Mix(static_cast<uint64_t>(x));
  }
  for (const int64_t* s : {k.q_stride, k.k_stride, k.v_stride, k.o_stride, k.do_stride}) {
    for (int i = 0; i < 3; ++i) f.Mix(static_cast<uint64_t>(s[i]));
  }
  f.Mix(k.has_right_bound);
  f.Mix(static_cast<uint64_t>(k.right_bound));
  f.Mix(k.has_left_bound);
  f.Mix(static_cast<uint64_t>(k.left_bound));
  f.Mix(k.padding_mask);
  f.Mix(k.scale_bits);
  return f.value();
}

SdpaKernelClass KernelClassOf(const SdpaGraphKey& key, int64_t cudnn_version) {
  SdpaKernelClass c;
  c.backward = key.backward;
  c.dtype = key.dtype;
  c.head_dim = key.head_dim;
  c.gqa = key.backward && key.heads != key.heads_k;
  c.has_right_bound = key.has_right_bound;
  c.right_bound_shift = key.has_right_bound && key.right_bound != 0;
  c.has_left_bound = key.has_left_bound;
  c.padding_mask = key.padding_mask;
  const struct {
    const int64_t* stride;
    int64_t heads, rows;
  } tensors[5] = {{key.q_stride, key.heads, key.seqlen_q},
                  {key.k_stride, key.heads_k, key.seqlen_k},
                  {key.v_stride, key.heads_k, key.seqlen_k},
                  {key.o_stride, key.heads, key.seqlen_q},
                  {key.do_stride, key.heads, key.seqlen_q}};
  for (int i = 0; i < (key.backward ? 5 : 4); ++i) {
    const auto& t = tensors[i];
    if (t.heads > 1 && t.rows > 1 && t.stride[1] > t.stride[2]) c.head_major |= 1u << i;
  }
  c.kv_tail = key.backward && cudnn_version <= 91500 && key.seqlen_k % 128 != 0;
  return c;
}

std::string SdpaKernelClass::ToString() const {
  return absl::StrCat(
      "{", backward ? "backward" : "forward", " ", std::string(DTypeName(dtype)), " d=", head_dim,
      gqa ? " gqa" : "",
      has_right_bound ? (right_bound_shift ? " right_bound(shifted)" : " right_bound=0") : "",
      has_left_bound ? " left_bound" : "", padding_mask ? " padding_mask" : "",
      head_major != 0 ? absl::StrCat(" head_major=", head_major) : std::string(),
      kv_tail ? " kv_tail" : "", "}");
}

size_t SdpaKernelClassHash::operator()(const SdpaKernelClass& c) const {
  Fnv f;
  for (uint64_t x :
       {uint64_t{c.backward}, static_cast<uint64_t>(c.dtype), static_cast<uint64_t>(c.head_dim),
        uint64_t{c.gqa}, uint64_t{c.has_right_bound}, uint64_t{c.right_bound_shift},
        uint64_t{c.has_left_bound}, uint64_t{c.padding_mask}, uint64_t{c.head_major},
        uint64_t{c.kv_tail}}) {
    f.Mix(x);
  }
  return f.value();
}

int64_t SdpaWorkspaceBytes(const SdpaGraph& graph) { return graph.workspace_bytes; }

absl::Status ExecuteSdpa(const SdpaGraph& graph, cudnnHandle_t handle, const SdpaTensors& t,
                         void* workspace) {
  return Execute(graph, handle,
                 {{kUidQ, const_cast<void*>(t.q)},
                  {kUidK, const_cast<void*>(t.k)},
                  {kUidV, const_cast<void*>(t.v)},
                  {kUidO, t.o},
                  {kUidStats, t.stats}},
                 t.seq_len_q, t.seq_len_kv, workspace);
}

absl::Status ExecuteSdpaBackward(const SdpaGraph& graph, cudnnHandle_t handle,
                                 const SdpaBackwardTensors& t, void* workspace) {
  return Execute(graph, handle,
                 {{kUidQ, const_cast<void*>(t.q)},
                  {kUidK, const_cast<void*>(t.k)},
                  {kUidV, const_cast<void*>(t.v)},
                  {kUidO, const_cast<void*>(t.o)},
                  {kUidDO, const_cast<void*>(t.dout)},
                  {kUidStats, const_cast<float*>(t.stats)},
                  {kUidDQ, t.dq},
                  {kUidDK, t.dk},
                  {kUidDV, t.dv}},
                 t.seq_len_q, t.seq_len_kv, workspace);
}

// Dynamic shapes and kernel caches bound to an operation graph: cuDNN 9.5.
constexpr int64_t kMinDynamicCudnnVersion = 90500;

struct SdpaGraphCache::KernelClassState {
  std::shared_ptr<fe::KernelCache> cache = std::make_shared<fe::KernelCache>();
  std::shared_ptr<fe::graph::Graph> anchor;  // the graph whose operation graph `cache` is bound to
  int64_t dynamic_builds = 0;
  int64_t refusals = 0;  // dynamic builds cuDNN refused where a static one succeeded
  // After two refusals and no dynamic success, later graphs of the class are built static only.
  bool static_only() const { return refusals >= 2 && dynamic_builds == 0; }
};

SdpaGraphCache::SdpaGraphCache(bool dynamic_shapes)
    : dynamic_shapes_(dynamic_shapes), cudnn_version_(static_cast<int64_t>(cudnnGetVersion())) {
  if (dynamic_shapes_ && cudnn_version_ < kMinDynamicCudnnVersion) {
    dynamic_shapes_ = false;
    static std::atomic<bool> logged{false};
    if (!logged.exchange(true)) {
      LogWarning("cudnn",
                 "cuDNN too old for dynamic-shape SDPA graphs; every new sequence length compiles "
                 "its own graph",
                 {{"cudnn_version", cudnn_version_}, {"needs", kMinDynamicCudnnVersion}});
    }
  }
}
SdpaGraphCache::~SdpaGraphCache() = default;

absl::StatusOr<std::unique_ptr<SdpaGraph>> SdpaGraphCache::BuildInClass(cudnnHandle_t handle,
                                                                        const SdpaGraphKey& key,
                                                                        const SdpaKernelClass& cls,
                                                                        KernelClassState& state,
                                                                        bool* transient) {
  std::shared_ptr<fe::graph::Graph> no_anchor;
  if (state.static_only()) return GuardedBuild(handle, key, nullptr, &no_anchor, transient);
  bool threw = false;
  absl::StatusOr<std::unique_ptr<SdpaGraph>> built =
      GuardedBuild(handle, key, state.cache, &state.anchor, transient, &threw);
  if (built.ok()) {
    ++state.dynamic_builds;
    ++stats_.dynamic_builds;
    return built;
  }
  if (*transient && !threw) return built;  // a CUDA failure, not cuDNN refusing the graph
  // cuDNN refused the dynamic graph (or the frontend threw building it): the static one decides
  // whether the call can run at all.
  absl::StatusOr<std::unique_ptr<SdpaGraph>> fallback =
      GuardedBuild(handle, key, nullptr, &no_anchor, transient);
  if (!fallback.ok()) return fallback;
  ++stats_.static_fallbacks;
  if (++state.refusals == 1) {
    LogWarning("cudnn",
               "cuDNN refused a dynamic-shape SDPA graph; built it static (this class's new "
               "sequence lengths may compile their own kernels)",
               {{"class", cls.ToString()}, {"error", built.status().message()}});
  }
  return fallback;
}

absl::StatusOr<const SdpaGraph*> SdpaGraphCache::GetOrBuild(cudnnHandle_t handle,
                                                            const SdpaGraphKey& key) {
  if (auto it = entries_.find(key); it != entries_.end()) {
    if (it->second.graph == nullptr) return it->second.status;
    return it->second.graph.get();
  }
  absl::StatusOr<std::unique_ptr<SdpaGraph>> built;
  bool transient = false;
  if (dynamic_shapes_) {
    const SdpaKernelClass cls = KernelClassOf(key, cudnn_version_);
    std::unique_ptr<KernelClassState>& state = classes_[cls];
    if (state == nullptr) {
      state = std::make_unique<KernelClassState>();
      stats_.kernel_classes = static_cast<int64_t>(classes_.size());
    }
    built = BuildInClass(handle, key, cls, *state, &transient);
  } else {
    std::shared_ptr<fe::graph::Graph> no_anchor;
    built = GuardedBuild(handle, key, nullptr, &no_anchor, &transient);
  }
  return Store(key, std::move(built), transient);
}

void SdpaGraphCache::Insert(const SdpaGraphKey& key, absl::StatusOr<OwnedSdpaGraph> built,
                            bool transient) {
  if (Has(key)) return;
  absl::StatusOr<std::unique_ptr<SdpaGraph>> graph =
      built.ok() ? absl::StatusOr<std::unique_ptr<SdpaGraph>>(
                       std::unique_ptr<SdpaGraph>(built->release()))
                 : absl::StatusOr<std::unique_ptr<SdpaGraph>>(built.status());
  (void)Store(key, std::move(graph), transient);
}

absl::StatusOr<const SdpaGraph*> SdpaGraphCache::Store(
    const SdpaGraphKey& key, absl::StatusOr<std::unique_ptr<SdpaGraph>> built, bool transient) {
  if (entries_.size() >= kMaxEntries) entries_.clear();
  ++stats_.builds;
  if (!built.ok()) {
    if (!transient) entries_.emplace(key, Entry{nullptr, built.status()});
    return built.status();
  }
  Entry& entry = entries_[key];
  entry.graph = *std::move(built);
  entry.status = absl::OkStatus();
  return entry.graph.get();
}

void SdpaGraphDeleter::operator()(SdpaGraph* graph) const { delete graph; }

absl::StatusOr<OwnedSdpaGraph> BuildStaticGraph(cudnnHandle_t handle, const SdpaGraphKey& key,
                                                bool* transient) {
  *transient = false;
  std::shared_ptr<fe::graph::Graph> no_anchor;
  absl::StatusOr<std::unique_ptr<SdpaGraph>> built =
      GuardedBuild(handle, key, nullptr, &no_anchor, transient);
  if (!built.ok()) return built.status();
  return OwnedSdpaGraph(built->release());
}

}  // namespace ringattn
