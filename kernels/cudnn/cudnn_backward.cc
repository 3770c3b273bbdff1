// The cudnn backward backend (see cudnn_backward.h): validation, the sdpa_backward graph cache,
// Backward and ComputeDelta.
#include "kernels/cudnn/cudnn_backward.h"

#include <cuda_runtime_api.h>
#include <cudnn.h>
#include <cudnn_frontend.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/cuda/flash_bwd.h"
#include "kernels/cudnn/cudnn_backend.h"
#include "kernels/cudnn/merge_kernel.h"

namespace ringattn {

namespace fe = cudnn_frontend;

namespace {

constexpr std::string_view kName = "cudnn";

enum : fe::graph::Tensor_attributes::uid_t {
  kUidQ = 1,
  kUidK,
  kUidV,
  kUidO,
  kUidDO,
  kUidStats,
  kUidDQ,
  kUidDK,
  kUidDV,
  kUidSeqLenQ,
  kUidSeqLenKv,
};

bool Aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

const void* Advance(const void* base, int64_t elements, DType t) {
  return static_cast<const char*>(base) + elements * DTypeSize(t);
}

int64_t Align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

absl::Status CudnnStatus(cudnnStatus_t s, const char* expr) {
  if (s == CUDNN_STATUS_SUCCESS) return absl::OkStatus();
  const std::string message =
      absl::StrCat(expr, " failed: ", cudnnGetErrorString(s), " (", static_cast<int>(s), ")");
  if (s == CUDNN_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

// The backward's own alignment rule for out and dout (cuDNN loads them like q).
absl::Status CheckOutAlignment(const AttentionBackwardParams& p, const CudnnMaskPlan& plan) {
  const int64_t sizes[3] = {p.fwd.batch, p.fwd.heads, plan.q_count};
  struct T {
    const char* name;
    const void* ptr;
    const char* stride_names[3];
    int64_t strides[3];
  };
  const T tensors[2] = {
      {"out",
       p.out,
       {"out_batch_stride", "out_head_stride", "out_row_stride"},
       {p.out_batch_stride, p.out_head_stride, p.out_row_stride}},
      {"dout",
       p.dout,
       {"dout_batch_stride", "dout_head_stride", "dout_row_stride"},
       {p.dout_batch_stride, p.dout_head_stride, p.dout_row_stride}},
  };
  for (const T& t : tensors) {
    if (!Aligned16(Advance(t.ptr, plan.q_begin * t.strides[2], p.out_dtype))) {
      return absl::InvalidArgumentError(
          absl::StrCat("the cudnn backward needs ", t.name,
                       " 16-byte aligned at its first live row (pointer not 16-byte aligned)"));
    }
    for (int i = 0; i < 3; ++i) {
      if (sizes[i] > 1 && t.strides[i] % 8 != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the cudnn backward needs out/dout batch/head/row strides in multiples of 8 "
            "elements (cuDNN's vector loads); got ",
            t.stride_names[i], " = ", t.strides[i]));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<CudnnMaskPlan> PlanBackward(const AttentionBackwardParams& p) {
  RA_RETURN_IF_ERROR(ValidateBackwardParams(p));
  // The forward's rules (dtype, alibi, softcap, masks, q/k/v alignment).
  // fwd.o, fwd.lse and merge_into_output are not the backward's: validated as
  // ValidateBackwardParams does, with dout in o's place.
  AttentionParams fwd = p.fwd;
  fwd.o = const_cast<void*>(p.dout);
  fwd.o_dtype = p.out_dtype;
  fwd.lse = nullptr;
  fwd.merge_into_output = false;
  RA_RETURN_IF_ERROR(CudnnSupports(fwd));
  if (p.out == nullptr) {
    return absl::InvalidArgumentError(
        "the cudnn backward needs out (cuDNN computes D = rowsum(dO * O) from O itself); got "
        "out = null");
  }
  if (p.out_dtype != p.fwd.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the cudnn backward needs out_dtype == dtype (cuDNN reads O and dO in the input dtype); "
        "got out_dtype ",
        std::string(DTypeName(p.out_dtype)), " with dtype ", std::string(DTypeName(p.fwd.dtype))));
  }
  RA_ASSIGN_OR_RETURN(CudnnMaskPlan plan, PlanCudnnCall(p.fwd));
  if (!plan.empty) RA_RETURN_IF_ERROR(CheckOutAlignment(p, plan));
  return plan;
}

// ---- Graphs ---------------------------------------------------------------------------------

// The key: dtype, b, h, h_k, s_q', s_k', d, strides {b,h,s} of q, k, v, o, dO, band, padding,
// scale bits.
using BwdKey = std::vector<int64_t>;

struct BwdGraph {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace_bytes = 0;
  bool padding_mask = false;
};

struct BwdEntry {
  std::unique_ptr<BwdGraph> graph;
  absl::Status status;
};

std::string KeyString(const BwdKey& k) { return absl::StrCat("{", absl::StrJoin(k, ","), "}"); }

absl::Status BuildError(const char* step, const fe::error_t& e, const BwdKey& key,
                        bool* transient) {
  *transient = e.code == fe::error_code_t::CUDA_API_FAILED ||
               e.code == fe::error_code_t::HANDLE_ERROR ||
               e.code == fe::error_code_t::INVALID_CUDA_DEVICE;
  const std::string message =
      absl::StrCat("cuDNN SDPA backward graph ", step, " failed (code ", static_cast<int>(e.code),
                   "): ", e.err_msg,
                   "; key {dtype,b,h,h_k,s_q,s_k,d,q_str[3],k_str[3],v_str[3],o_str[3],"
                   "do_str[3],has_rb,rb,has_lb,lb,padding,scale_bits} = ",
                   KeyString(key));
  switch (e.code) {
    case fe::error_code_t::GRAPH_NOT_SUPPORTED:
    case fe::error_code_t::GRAPH_EXECUTION_PLAN_CREATION_FAILED:
    case fe::error_code_t::HEURISTIC_QUERY_FAILED:
      return absl::InvalidArgumentError(absl::StrCat(
          "the cudnn backward cannot run this configuration (cuDNN refused it): ", message));
    default:
      return absl::InternalError(message);
  }
}

struct GraphSpec {
  DType dtype;
  int64_t b, h, hk, sq, sk, d;
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3], do_stride[3];
  const CudnnMaskPlan* plan;
  float scale;

  BwdKey Key() const {
    BwdKey k = {static_cast<int64_t>(dtype), b, h, hk, sq, sk, d};
    for (const int64_t* s : {q_stride, k_stride, v_stride, o_stride, do_stride}) {
      k.insert(k.end(), s, s + 3);
    }
    uint32_t bits;
    std::memcpy(&bits, &scale, sizeof(bits));
    k.insert(k.end(), {plan->has_right_bound, plan->right_bound, plan->has_left_bound,
                       plan->left_bound, plan->padding_mask, static_cast<int64_t>(bits)});
    return k;
  }
};

absl::StatusOr<std::unique_ptr<BwdGraph>> Build(cudnnHandle_t handle, const GraphSpec& s,
                                                const BwdKey& key, bool* transient) {
  using fe::graph::Tensor_attributes;
  const fe::DataType_t io =
      s.dtype == DType::kF16 ? fe::DataType_t::HALF : fe::DataType_t::BFLOAT16;
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(io)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  auto tensor = [&](const char* name, int64_t uid, int64_t heads, int64_t rows,
                    const int64_t stride[3]) {
    return graph->tensor(Tensor_attributes()
                             .set_name(name)
                             .set_uid(uid)
                             .set_data_type(io)
                             .set_dim({s.b, heads, rows, s.d})
                             .set_stride({stride[0], stride[1], stride[2], 1}));
  };
  auto q = tensor("Q", kUidQ, s.h, s.sq, s.q_stride);
  auto k = tensor("K", kUidK, s.hk, s.sk, s.k_stride);
  auto v = tensor("V", kUidV, s.hk, s.sk, s.v_stride);
  auto o = tensor("O", kUidO, s.h, s.sq, s.o_stride);
  auto dout = tensor("dO", kUidDO, s.h, s.sq, s.do_stride);
  auto stats = graph->tensor(Tensor_attributes()
                                 .set_name("Stats")
                                 .set_uid(kUidStats)
                                 .set_data_type(fe::DataType_t::FLOAT)
                                 .set_dim({s.b, s.h, s.sq, 1})
                                 .set_stride({s.h * s.sq, s.sq, 1, 1}));

  fe::graph::SDPA_backward_attributes options;
  options.set_name("ringattn_sdpa_backward").set_attn_scale(s.scale);
  options.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT);
  const CudnnMaskPlan& plan = *s.plan;
  if (plan.has_right_bound) {
    options.set_diagonal_band_right_bound(static_cast<int>(plan.right_bound));
  }
  if (plan.has_left_bound) options.set_diagonal_band_left_bound(static_cast<int>(plan.left_bound));
  if (plan.padding_mask) {
    auto seqlen = [&](const char* name, int64_t uid) {
      return graph->tensor(Tensor_attributes()
                               .set_name(name)
                               .set_uid(uid)
                               .set_dim({s.b, 1, 1, 1})
                               .set_stride({1, 1, 1, 1})
                               .set_data_type(fe::DataType_t::INT32));
    };
    options.set_padding_mask(true)
        .set_seq_len_q(seqlen("seq_len_q", kUidSeqLenQ))
        .set_seq_len_kv(seqlen("seq_len_kv", kUidSeqLenKv));
  }

  auto grads = graph->sdpa_backward(q, k, v, o, dout, stats, options);
  if (grads[0] == nullptr || grads[1] == nullptr || grads[2] == nullptr) {
    return absl::InternalError("cudnn-frontend sdpa_backward() returned no dQ/dK/dV");
  }
  // Packed [b, s, h, d] scratch (what LaunchGradToFloat reads).
  grads[0]
      ->set_output(true)
      .set_uid(kUidDQ)
      .set_data_type(io)
      .set_dim({s.b, s.h, s.sq, s.d})
      .set_stride({s.sq * s.h * s.d, s.d, s.h * s.d, 1});
  grads[1]
      ->set_output(true)
      .set_uid(kUidDK)
      .set_data_type(io)
      .set_dim({s.b, s.hk, s.sk, s.d})
      .set_stride({s.sk * s.hk * s.d, s.d, s.hk * s.d, 1});
  grads[2]
      ->set_output(true)
      .set_uid(kUidDV)
      .set_data_type(io)
      .set_dim({s.b, s.hk, s.sk, s.d})
      .set_stride({s.sk * s.hk * s.d, s.d, s.hk * s.d, 1});

  if (fe::error_t e = graph->validate(); e.is_bad()) {
    return BuildError("validate", e, key, transient);
  }
  if (fe::error_t e = graph->build_operation_graph(handle); e.is_bad()) {
    return BuildError("build_operation_graph", e, key, transient);
  }
  if (fe::error_t e = graph->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
      e.is_bad()) {
    return BuildError("create_execution_plans", e, key, transient);
  }
  if (fe::error_t e = graph->check_support(); e.is_bad()) {
    return BuildError("check_support", e, key, transient);
  }
  if (fe::error_t e = graph->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE); e.is_bad()) {
    return BuildError("build_plans", e, key, transient);
  }
  int64_t workspace = 0;
  if (fe::error_t e = graph->get_workspace_size(workspace); e.is_bad()) {
    return BuildError("get_workspace_size", e, key, transient);
  }
  auto built = std::make_unique<BwdGraph>();
  built->graph = std::move(graph);
  built->workspace_bytes = workspace;
  built->padding_mask = plan.padding_mask;
  return built;
}

// ---- The backend ----------------------------------------------------------------------------

class CudnnBackwardImpl final : public CudnnBackwardBackend {
 public:
  ~CudnnBackwardImpl() override;
  std::string_view name() const override { return kName; }
  absl::Status Backward(const AttentionBackwardParams& p) override;
  absl::Status ComputeDelta(const AttentionBackwardParams& p, float* delta) override;
  int64_t graph_builds() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return builds_;
  }

 private:
  absl::Status EnsureHandle();
  absl::Status EnsureWorkspace(int64_t bytes, cudaStream_t stream);
  absl::StatusOr<const BwdGraph*> GetOrBuild(const GraphSpec& spec);
  absl::Status WaitForPrevious(cudaStream_t stream);
  absl::Status RecordDone(cudaStream_t stream);

  mutable std::mutex mu_;
  int device_ = -1;
  cudnnHandle_t handle_ = nullptr;
  bool async_alloc_ = false;
  cudaEvent_t done_ = nullptr;
  bool done_recorded_ = false;
  cudaStream_t last_stream_ = nullptr;
  void* workspace_ = nullptr;
  int64_t workspace_bytes_ = 0;
  std::map<BwdKey, BwdEntry> cache_;  // cleared before the handle is destroyed
  int64_t builds_ = 0;
};

CudnnBackwardImpl::~CudnnBackwardImpl() {
  if (done_recorded_) (void)cudaEventSynchronize(done_);
  cache_.clear();
  if (workspace_ != nullptr) (void)cudaFree(workspace_);
  if (done_ != nullptr) (void)cudaEventDestroy(done_);
  if (handle_ != nullptr) (void)cudnnDestroy(handle_);
}

absl::Status CudnnBackwardImpl::EnsureHandle() {
  int count = 0;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (count == 0) return absl::FailedPreconditionError("the cudnn backward needs a CUDA device");
  int device = 0;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (handle_ != nullptr) {
    if (device != device_) {
      return absl::FailedPreconditionError(
          absl::StrCat("the cudnn backward was first used on CUDA device ", device_,
                       " and this call is on device ", device, "; use one backend per device"));
    }
    return absl::OkStatus();
  }
  int pools = 0;
  RA_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device));
  if (done_ == nullptr) {
    RA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  }
  cudnnHandle_t handle = nullptr;
  RA_RETURN_IF_ERROR(CudnnStatus(cudnnCreate(&handle), "cudnnCreate"));
  handle_ = handle;
  device_ = device;
  async_alloc_ = pools != 0;
  return absl::OkStatus();
}

absl::Status CudnnBackwardImpl::EnsureWorkspace(int64_t bytes, cudaStream_t stream) {
  if (bytes <= workspace_bytes_) return absl::OkStatus();
  const int64_t want = std::max(bytes, workspace_bytes_ + workspace_bytes_ / 2);
  const int64_t grown = (want + (int64_t{2} << 20) - 1) / (int64_t{2} << 20) * (int64_t{2} << 20);
  if (async_alloc_) {
    if (workspace_ != nullptr) RA_CUDA_RETURN_IF_ERROR(cudaFreeAsync(workspace_, stream));
    workspace_ = nullptr;
    workspace_bytes_ = 0;
    RA_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&workspace_, static_cast<size_t>(grown), stream));
  } else {
    if (done_recorded_) RA_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done_));
    if (workspace_ != nullptr) RA_CUDA_RETURN_IF_ERROR(cudaFree(workspace_));
    workspace_ = nullptr;
    workspace_bytes_ = 0;
    RA_CUDA_RETURN_IF_ERROR(cudaMalloc(&workspace_, static_cast<size_t>(grown)));
  }
  workspace_bytes_ = grown;
  return absl::OkStatus();
}

absl::StatusOr<const BwdGraph*> CudnnBackwardImpl::GetOrBuild(const GraphSpec& spec) {
  const BwdKey key = spec.Key();
  if (auto it = cache_.find(key); it != cache_.end()) {
    if (it->second.graph == nullptr) return it->second.status;
    return it->second.graph.get();
  }
  if (cache_.size() >= 512) cache_.clear();
  ++builds_;
  absl::StatusOr<std::unique_ptr<BwdGraph>> built;
  bool transient = false;
  try {
    built = Build(handle_, spec, key, &transient);
  } catch (const std::exception& ex) {
    transient = true;
    built = absl::InternalError(absl::StrCat("cuDNN SDPA backward graph build threw: ", ex.what(),
                                             "; key ", KeyString(key)));
  }
  if (!built.ok()) {
    if (!transient) cache_.emplace(key, BwdEntry{nullptr, built.status()});
    return built.status();
  }
  BwdEntry& entry = cache_[key];
  entry.graph = *std::move(built);
  entry.status = absl::OkStatus();
  return entry.graph.get();
}

absl::Status CudnnBackwardImpl::WaitForPrevious(cudaStream_t stream) {
  if (done_recorded_ && stream != last_stream_) {
    RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, done_, 0));
  }
  return absl::OkStatus();
}

absl::Status CudnnBackwardImpl::RecordDone(cudaStream_t stream) {
  if (done_ != nullptr) {
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(done_, stream));
    done_recorded_ = true;
    last_stream_ = stream;
  }
  return absl::OkStatus();
}

absl::Status CudnnBackwardImpl::Backward(const AttentionBackwardParams& p) {
  RA_ASSIGN_OR_RETURN(const CudnnMaskPlan plan, PlanBackward(p));
  const AttentionParams& f = p.fwd;
  std::lock_guard<std::mutex> lock(mu_);
  const cudaStream_t stream = this->stream();
  RA_RETURN_IF_ERROR(WaitForPrevious(stream));
  // cuDNN's backward rejects one query against one key ("s_q = s_kv = 1 is not supported" at
  // graph validation), which rings with single-row segments produce (seq 7 over 4 ranks). Such
  // a call is one dot product per head; it runs our kernel (flash_bwd.h) on the same stream.
  if (!plan.empty && plan.q_count == 1 && plan.k_count == 1) {
    RA_RETURN_IF_ERROR(FlashBackwardAllocatingDelta(p, stream));
    return RecordDone(stream);
  }

  GradToFloatParams gq, gk, gv;
  gq.batch = gk.batch = gv.batch = f.batch;
  gq.head_dim = gk.head_dim = gv.head_dim = f.head_dim;
  gq.src_dtype = gk.src_dtype = gv.src_dtype = f.dtype;
  gq.accumulate = gk.accumulate = gv.accumulate = p.accumulate;
  gq.rows = f.seqlen_q;
  gq.heads = f.heads;
  gk.rows = gv.rows = f.seqlen_k;
  gk.heads = gv.heads = f.heads_k;
  gq.dst = p.dq;
  gq.dst_batch_stride = p.dq_batch_stride;
  gq.dst_row_stride = p.dq_row_stride;
  gq.dst_head_stride = p.dq_head_stride;
  gk.dst = p.dk;
  gk.dst_batch_stride = p.dk_batch_stride;
  gk.dst_row_stride = p.dk_row_stride;
  gk.dst_head_stride = p.dk_head_stride;
  gv.dst = p.dv;
  gv.dst_batch_stride = p.dv_batch_stride;
  gv.dst_row_stride = p.dv_row_stride;
  gv.dst_head_stride = p.dv_head_stride;

  if (!plan.empty) {
    RA_RETURN_IF_ERROR(EnsureHandle());
    const int64_t b = f.batch, h = f.heads, hk = f.heads_k, d = f.head_dim;
    const int64_t sq = plan.q_count, sk = plan.k_count;
    GraphSpec spec;
    spec.dtype = f.dtype;
    spec.b = b;
    spec.h = h;
    spec.hk = hk;
    spec.sq = sq;
    spec.sk = sk;
    spec.d = d;
    const int64_t qs[3] = {f.q_batch_stride, f.q_head_stride, f.q_row_stride};
    const int64_t ks[3] = {f.k_batch_stride, f.k_head_stride, f.k_row_stride};
    const int64_t vs[3] = {f.v_batch_stride, f.v_head_stride, f.v_row_stride};
    const int64_t os[3] = {p.out_batch_stride, p.out_head_stride, p.out_row_stride};
    const int64_t ds[3] = {p.dout_batch_stride, p.dout_head_stride, p.dout_row_stride};
    for (int i = 0; i < 3; ++i) {
      spec.q_stride[i] = qs[i];
      spec.k_stride[i] = ks[i];
      spec.v_stride[i] = vs[i];
      spec.o_stride[i] = os[i];
      spec.do_stride[i] = ds[i];
    }
    spec.plan = &plan;
    spec.scale = f.softmax_scale;
    RA_ASSIGN_OR_RETURN(const BwdGraph* graph, GetOrBuild(spec));

    // Workspace: [cuDNN's][stats][dQ][dK][dV][seq_len_q, seq_len_kv].
    const int64_t es = DTypeSize(f.dtype);
    const int64_t cudnn_bytes = Align256(graph->workspace_bytes);
    const int64_t stats_bytes = Align256(b * h * sq * static_cast<int64_t>(sizeof(float)));
    const int64_t dq_bytes = Align256(b * sq * h * d * es);
    const int64_t dkv_bytes = Align256(b * sk * hk * d * es);
    const int64_t seqlen_bytes = plan.padding_mask ? Align256(2 * b * sizeof(int32_t)) : 0;
    RA_RETURN_IF_ERROR(EnsureWorkspace(
        cudnn_bytes + stats_bytes + dq_bytes + 2 * dkv_bytes + seqlen_bytes, stream));
    char* const base = static_cast<char*>(workspace_);
    float* const stats = reinterpret_cast<float*>(base + cudnn_bytes);
    char* const dq = base + cudnn_bytes + stats_bytes;
    char* const dk = dq + dq_bytes;
    char* const dv = dk + dkv_bytes;
    int32_t* const seqlens = reinterpret_cast<int32_t*>(dv + dkv_bytes);

    RA_RETURN_IF_ERROR(LaunchGatherLse(p.lse, p.lse_batch_stride, p.lse_head_stride, b, h,
                                       plan.q_begin, sq, stats, stream));
    std::unordered_map<fe::graph::Tensor_attributes::uid_t, void*> pack = {
        {kUidQ, const_cast<void*>(Advance(f.q, plan.q_begin * f.q_row_stride, f.dtype))},
        {kUidK, const_cast<void*>(Advance(f.k, plan.k_begin * f.k_row_stride, f.dtype))},
        {kUidV, const_cast<void*>(Advance(f.v, plan.k_begin * f.v_row_stride, f.dtype))},
        {kUidO, const_cast<void*>(Advance(p.out, plan.q_begin * p.out_row_stride, f.dtype))},
        {kUidDO, const_cast<void*>(Advance(p.dout, plan.q_begin * p.dout_row_stride, f.dtype))},
        {kUidStats, stats},
        {kUidDQ, dq},
        {kUidDK, dk},
        {kUidDV, dv},
    };
    if (plan.padding_mask) {
      RA_RETURN_IF_ERROR(LaunchFillInt32(seqlens, b, static_cast<int32_t>(sq), stream));
      RA_RETURN_IF_ERROR(LaunchFillInt32(seqlens + b, b, static_cast<int32_t>(sk), stream));
      pack.emplace(kUidSeqLenQ, seqlens);
      pack.emplace(kUidSeqLenKv, seqlens + b);
    }
    RA_RETURN_IF_ERROR(CudnnStatus(cudnnSetStream(handle_, stream), "cudnnSetStream"));
    fe::error_t e;
    try {
      e = graph->graph->execute(handle_, pack, base);
    } catch (const std::exception& ex) {
      return absl::InternalError(absl::StrCat("cuDNN SDPA backward execute threw: ", ex.what()));
    }
    if (e.is_bad()) {
      return absl::InternalError(absl::StrCat("cuDNN SDPA backward execute failed (code ",
                                              static_cast<int>(e.code), "): ", e.err_msg));
    }
    gq.src = dq;
    gq.live_begin = plan.q_begin;
    gq.live_count = sq;
    gk.src = dk;
    gv.src = dv;
    gk.live_begin = gv.live_begin = plan.k_begin;
    gk.live_count = gv.live_count = sk;
  }
  RA_RETURN_IF_ERROR(LaunchGradToFloat(gq, stream));
  RA_RETURN_IF_ERROR(LaunchGradToFloat(gk, stream));
  RA_RETURN_IF_ERROR(LaunchGradToFloat(gv, stream));
  return RecordDone(stream);
}

absl::Status CudnnBackwardImpl::ComputeDelta(const AttentionBackwardParams& p, float* delta) {
  // Only out, dout and their sizes are read (a ring computes D before any step, from a params
  // struct that has no lse or gradients yet).
  if (p.fwd.batch < 0 || p.fwd.seqlen_q < 0 || p.fwd.heads <= 0 || p.fwd.head_dim <= 0) {
    return absl::InvalidArgumentError("ComputeDelta: batch, seqlen_q, heads, head_dim invalid");
  }
  if (p.fwd.batch * p.fwd.seqlen_q == 0) return absl::OkStatus();
  if (p.out == nullptr || p.dout == nullptr || delta == nullptr) {
    return absl::InvalidArgumentError("ComputeDelta needs out, dout and delta (got a null one)");
  }
  std::lock_guard<std::mutex> lock(mu_);
  const cudaStream_t stream = this->stream();
  RA_RETURN_IF_ERROR(WaitForPrevious(stream));
  RA_RETURN_IF_ERROR(LaunchComputeDelta(p, delta, stream));
  return RecordDone(stream);
}

}  // namespace

absl::Status CudnnBackwardSupports(const AttentionBackwardParams& p) {
  return PlanBackward(p).status();
}

std::unique_ptr<AttentionBackwardBackend> MakeCudnnBackwardBackend() {
  return std::make_unique<CudnnBackwardImpl>();
}

}  // namespace ringattn
