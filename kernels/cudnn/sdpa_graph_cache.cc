// Building and executing cuDNN SDPA forward graphs with cudnn-frontend.
#include "kernels/cudnn/sdpa_graph_cache.h"

#include <cudnn_frontend.h>

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

static_assert(CUDNN_FRONTEND_VERSION >= 11100,
              "the cudnn backend needs cudnn-frontend >= 1.11 (diagonal band bounds)");

namespace ringattn {

namespace fe = cudnn_frontend;

struct SdpaGraph {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace_bytes = 0;
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
  const std::string message = absl::StrCat("cuDNN SDPA graph ", step, " failed (", CodeName(e.code),
                                           "): ", e.err_msg, "; graph ", key.ToString());
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

absl::StatusOr<std::unique_ptr<SdpaGraph>> Build(cudnnHandle_t handle, const SdpaGraphKey& key,
                                                 bool* transient) {
  using fe::graph::Tensor_attributes;
  const int64_t b = key.batch, h = key.heads, hk = key.heads_k, sq = key.seqlen_q,
                sk = key.seqlen_k, d = key.head_dim;
  const fe::DataType_t io = IoType(key.dtype);

  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(io)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);

  auto q = graph->tensor(Tensor_attributes()
                             .set_name("Q")
                             .set_uid(kUidQ)
                             .set_data_type(io)
                             .set_dim({b, h, sq, d})
                             .set_stride({key.q_stride[0], key.q_stride[1], key.q_stride[2], 1}));
  auto k = graph->tensor(Tensor_attributes()
                             .set_name("K")
                             .set_uid(kUidK)
                             .set_data_type(io)
                             .set_dim({b, hk, sk, d})
                             .set_stride({key.k_stride[0], key.k_stride[1], key.k_stride[2], 1}));
  auto v = graph->tensor(Tensor_attributes()
                             .set_name("V")
                             .set_uid(kUidV)
                             .set_data_type(io)
                             .set_dim({b, hk, sk, d})
                             .set_stride({key.v_stride[0], key.v_stride[1], key.v_stride[2], 1}));

  float scale;
  std::memcpy(&scale, &key.scale_bits, sizeof(scale));
  fe::graph::SDPA_attributes options;
  options.set_name("ringattn_sdpa").set_generate_stats(true).set_attn_scale(scale);
  // Only TOP_LEFT alignment: every offset is folded into the bounds (cudnn_backend.h).
  options.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT);
  if (key.has_right_bound) {
    options.set_diagonal_band_right_bound(static_cast<int>(key.right_bound));
  }
  if (key.has_left_bound) options.set_diagonal_band_left_bound(static_cast<int>(key.left_bound));
  if (key.padding_mask) {
    auto seq_q = graph->tensor(Tensor_attributes()
                                   .set_name("seq_len_q")
                                   .set_uid(kUidSeqLenQ)
                                   .set_dim({b, 1, 1, 1})
                                   .set_stride({1, 1, 1, 1})
                                   .set_data_type(fe::DataType_t::INT32));
    auto seq_kv = graph->tensor(Tensor_attributes()
                                    .set_name("seq_len_kv")
                                    .set_uid(kUidSeqLenKv)
                                    .set_dim({b, 1, 1, 1})
                                    .set_stride({1, 1, 1, 1})
                                    .set_data_type(fe::DataType_t::INT32));
    options.set_padding_mask(true).set_seq_len_q(seq_q).set_seq_len_kv(seq_kv);
  }

  auto outputs = graph->sdpa(q, k, v, options);
  const std::shared_ptr<Tensor_attributes>& o = outputs[0];
  const std::shared_ptr<Tensor_attributes>& stats = outputs[1];
  if (o == nullptr || stats == nullptr) {
    return absl::InternalError(
        absl::StrCat("cudnn-frontend sdpa() returned no O or Stats; graph ", key.ToString()));
  }
  o->set_output(true)
      .set_uid(kUidO)
      .set_data_type(io)
      .set_dim({b, h, sq, d})
      .set_stride({key.o_stride[0], key.o_stride[1], key.o_stride[2], 1});
  stats->set_output(true)
      .set_uid(kUidStats)
      .set_data_type(fe::DataType_t::FLOAT)
      .set_dim({b, h, sq, 1})
      .set_stride({h * sq, sq, 1, 1});

  if (fe::error_t e = graph->validate(); e.is_bad())
    return BuildError("validate", e, key, transient);
  if (fe::error_t e = graph->build_operation_graph(handle); e.is_bad()) {
    return BuildError("build_operation_graph", e, key, transient);
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
  built->padding_mask = key.padding_mask;
  return built;
}

}  // namespace

std::string SdpaGraphKey::ToString() const {
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  auto strides = [](const int64_t* s) {
    return absl::StrCat("{", s[0], ",", s[1], ",", s[2], "}");
  };
  return absl::StrCat("{", std::string(DTypeName(dtype)), " b=", batch, " h=", heads,
                      " h_k=", heads_k, " s_q=", seqlen_q, " s_k=", seqlen_k, " d=", head_dim,
                      " q_strides(b,h,s)=", strides(q_stride), " k_strides=", strides(k_stride),
                      " v_strides=", strides(v_stride), " o_strides=", strides(o_stride),
                      has_right_bound ? absl::StrCat(" right_bound=", right_bound) : std::string(),
                      has_left_bound ? absl::StrCat(" left_bound=", left_bound) : std::string(),
                      padding_mask ? " padding_mask" : "", " scale=", scale, "}");
}

size_t SdpaGraphKeyHash::operator()(const SdpaGraphKey& k) const {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields
  auto mix = [&h](uint64_t x) {
    for (int i = 0; i < 8; ++i) {
      h ^= (x >> (8 * i)) & 0xffu;
      h *= 1099511628211ull;
    }
  };
  mix(static_cast<uint64_t>(k.dtype));
  for (int64_t x : {k.batch, k.heads, k.heads_k, k.seqlen_q, k.seqlen_k, k.head_dim}) {
    mix(static_cast<uint64_t>(x));
  }
  for (const int64_t* s : {k.q_stride, k.k_stride, k.v_stride, k.o_stride}) {
    for (int i = 0; i < 3; ++i) mix(static_cast<uint64_t>(s[i]));
  }
  mix(k.has_right_bound);
  mix(static_cast<uint64_t>(k.right_bound));
  mix(k.has_left_bound);
  mix(static_cast<uint64_t>(k.left_bound));
  mix(k.padding_mask);
  mix(k.scale_bits);
  return static_cast<size_t>(h);
}

int64_t SdpaWorkspaceBytes(const SdpaGraph& graph) { return graph.workspace_bytes; }

absl::Status ExecuteSdpa(const SdpaGraph& graph, cudnnHandle_t handle, const SdpaTensors& t,
                         void* workspace) {
  std::unordered_map<fe::graph::Tensor_attributes::uid_t, void*> pack = {
      {kUidQ, const_cast<void*>(t.q)},
      {kUidK, const_cast<void*>(t.k)},
      {kUidV, const_cast<void*>(t.v)},
      {kUidO, t.o},
      {kUidStats, t.stats},
  };
  if (graph.padding_mask) {
    pack.emplace(kUidSeqLenQ, t.seq_len_q);
    pack.emplace(kUidSeqLenKv, t.seq_len_kv);
  }
  fe::error_t e;
  try {
    e = graph.graph->execute(handle, pack, workspace);
  } catch (const std::exception& ex) {
    return absl::InternalError(absl::StrCat("cuDNN SDPA execute threw: ", ex.what()));
  }
  if (e.is_bad()) {
    return absl::InternalError(
        absl::StrCat("cuDNN SDPA execute failed (", CodeName(e.code), "): ", e.err_msg));
  }
  return absl::OkStatus();
}

SdpaGraphCache::SdpaGraphCache() = default;
SdpaGraphCache::~SdpaGraphCache() = default;

absl::StatusOr<const SdpaGraph*> SdpaGraphCache::GetOrBuild(cudnnHandle_t handle,
                                                            const SdpaGraphKey& key) {
  if (auto it = entries_.find(key); it != entries_.end()) {
    if (it->second.graph == nullptr) return it->second.status;
    return it->second.graph.get();
  }
  if (entries_.size() >= kMaxEntries) entries_.clear();
  ++builds_;
  absl::StatusOr<std::unique_ptr<SdpaGraph>> built;
  bool transient = false;
  try {
    built = Build(handle, key, &transient);
  } catch (const std::exception& ex) {
    transient = true;
    built = absl::InternalError(
        absl::StrCat("cuDNN SDPA graph build threw: ", ex.what(), "; graph ", key.ToString()));
  }
  if (!built.ok()) {
    if (!transient) entries_.emplace(key, Entry{nullptr, built.status()});
    return built.status();
  }
  Entry& entry = entries_[key];
  entry.graph = *std::move(built);
  entry.status = absl::OkStatus();
  return entry.graph.get();
}

}  // namespace ringattn
