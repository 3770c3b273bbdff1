// The "cudnn" attention backend: cuDNN's fused flash attention (the cudnn-frontend SDPA graphs)
// behind AttentionBackend, forward (with the softmax stats, the LSE the ring's merge needs) and
// backward (cudnn_backward.h). Device pointers (MemorySpace::kDevice), enqueued on the call's
// stream. Whatever cuDNN cannot express exactly is refused with InvalidArgument naming the
// option (dtype other than bf16/fp16, alibi_slopes, softcap, misaligned q/k/v, a partial mask
// that is no diagonal band in indices, ...); nothing falls back silently. PlanCudnnCall reduces
// a call's masks in positions to cuDNN's band on its live block: the rules, the derivation and
// the merge and caching design are in docs/cudnn.md.
//
// A new sequence length needs a new cuDNN graph. With dynamic shapes (CudnnBackendOptions, on
// by default) it reuses the kernel compiled for an earlier graph of its class (direction,
// dtype, head_dim, mask kind, ...; sdpa_graph_cache.h) instead of compiling one (tens of ms);
// Prewarm compiles common classes ahead of the first call.
// With background builds (CudnnBackendOptions, off by default; the worker's are on), the first
// calls of a shape whose static graph is not built yet run our own kernel instead while the
// graph builds on a thread of the backend.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_params.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/dtype.h"

namespace ringattn {

// What one call asks of cuDNN (see the rules above). Row and column indices are those of the
// call (0 <= i < seqlen_q, 0 <= j < seqlen_k).
struct CudnnMaskPlan {
  // No (query, key) pair is allowed: cuDNN is not called; every row is fully masked.
  bool empty = false;
  // The live block: query rows [q_begin, q_begin + q_count), key rows [k_begin, k_begin +
  // k_count). Rows outside it have no allowed key; keys outside it are seen by no live row.
  int64_t q_begin = 0, q_count = 0;
  int64_t k_begin = 0, k_count = 0;
  // TOP_LEFT diagonal band inside the live block (i', j' relative to q_begin, k_begin):
  // keep j' <= i' + right_bound, and j' > i' - left_bound.
  bool has_right_bound = false;
  int64_t right_bound = 0;  // >= 0
  bool has_left_bound = false;
  int64_t left_bound = 0;  // >= 1
  // Full-length padding mask (seq_len_q = q_count, seq_len_kv = k_count): masks nothing, lifts
  // cuDNN's s_q <= s_kv requirement for a left bound.
  bool padding_mask = false;

  // Whether cuDNN, run as planned, lets query row i see key row j (host emulation of the
  // semantics documented above; the tests compare it with KeyAllowed for every pair).
  bool Allows(int64_t i, int64_t j) const;
  std::string ToString() const;
};

// The plan for `p`, or InvalidArgument naming what cuDNN cannot express. Host only: needs no
// device and reads no tensor (pointers are checked for alignment only). Does not run
// ValidateParams; Forward runs both.
absl::StatusOr<CudnnMaskPlan> PlanCudnnCall(const AttentionParams& p);

// OK when the cudnn backend can compute `p` (ValidateParams, then PlanCudnnCall).
absl::Status CudnnSupports(const AttentionParams& p);

// Options of a cudnn backend (MakeCudnnBackend).
struct CudnnBackendOptions {
  // true: graphs with dynamic shapes, sharing one compiled kernel per class (cuDNN >= 9.5;
  // older ones, or a class cuDNN refuses, get static graphs, logged once). false: every graph
  // static, its kernel compiled for its sizes (each new length costs tens of ms). Off by
  // default: cuDNN 9.19's SDPA engines refuse dynamic shapes on an H100 (docs/cudnn.md).
  bool dynamic_shapes = false;
  // true (static graphs only): a call whose graph is not built yet runs our own kernel
  // (kernels/cuda flash forward/backward, when it supports the call) while a thread of the
  // backend builds the graph; later calls of that shape run cuDNN. Off by default (the cudnn
  // tests test cuDNN itself); the worker turns it on (docs/cudnn.md, "Background builds").
  bool background_builds = false;
};

// The options of the registered "cudnn" backend, from the environment: RINGATTN_CUDNN_DYNAMIC
// "1"/"true"/"on" turns dynamic shapes on; unset, empty, "0"/"false"/"off" leave them off;
// anything else is InvalidArgument naming the variable.
inline constexpr char kCudnnDynamicEnv[] = "RINGATTN_CUDNN_DYNAMIC";
absl::StatusOr<CudnnBackendOptions> CudnnBackendOptionsFromEnv();

// The worker turns background builds on for its cudnn backends unless this variable is "0".
inline constexpr char kCudnnBackgroundEnv[] = "RINGATTN_CUDNN_BACKGROUND";

// The kernel classes Prewarm compiles: every dtype x head_dim, unmasked and causal, for
// contiguous [b, s, h, d] tensors (the layout of the ring's shards), forward and/or backward
// (the backward both with heads == heads_k and with GQA).
struct CudnnPrewarmSpec {
  std::vector<DType> dtypes = {DType::kBF16, DType::kF16};
  std::vector<int64_t> head_dims = {64, 128};
  bool forward = true;
  bool backward = false;
};

// Counts of a backend's graph builds (sdpa_graph_cache.h).
struct CudnnGraphStats {
  int64_t builds = 0;            // graphs built, forward and backward, failed builds included
  int64_t dynamic_builds = 0;    // of them, with dynamic shapes and a class kernel cache
  int64_t static_fallbacks = 0;  // of them, static because cuDNN refused the dynamic graph
  int64_t kernel_classes = 0;    // classes met with dynamic shapes (one kernel cache each)
  int64_t own_kernel_calls = 0;  // calls served by our kernel while their graph was built
};

// The backend. Forward validates (CudnnSupports), then enqueues on the call's stream and returns
// without synchronising, like the CUDA backends; Backward likewise (CudnnBackwardSupports).
class CudnnBackend : public CudaBackend {
 public:
  // Graphs built so far by this backend, forward and backward (a repeated shape does not build
  // again).
  virtual int64_t graph_builds() const = 0;
  virtual CudnnGraphStats graph_stats() const = 0;
  // Whether graphs are built with dynamic shapes (asked for, and the cuDNN loaded has them).
  virtual bool dynamic_shapes() const = 0;
  // Bytes of the device workspace currently held.
  virtual int64_t workspace_bytes() const = 0;
  // Builds a graph of each class of `spec` (sequence length 256) on the current device, which
  // binds the backend to it as a first call would, so that with dynamic shapes the first call
  // of those classes at any length compiles nothing. Host-synchronous, enqueues nothing. OK
  // and nothing built without dynamic shapes (a static graph serves one length only). A class
  // cuDNN cannot build is skipped; the first such error is returned after the others are built.
  virtual absl::Status Prewarm(const CudnnPrewarmSpec& spec) = 0;
  // Turns background builds (CudnnBackendOptions) on or off for later calls.
  virtual void set_background_builds(bool on) = 0;
  // Blocks until every requested background build is in the cache. The error that stopped the
  // builder (no device or handle for its thread), if any; build failures surface at the calls.
  virtual absl::Status WaitForGraphs() = 0;
};

// A cudnn backend with `options` (the registered "cudnn" is MakeCudnnBackend with
// CudnnBackendOptionsFromEnv(), defaults where the environment is invalid). Touches no device.
std::unique_ptr<CudnnBackend> MakeCudnnBackend(const CudnnBackendOptions& options);

// `backend` as a CudnnBackend (for graph_builds()), or nullptr when it is not one.
inline CudnnBackend* AsCudnnBackend(AttentionBackend* backend) {
  return dynamic_cast<CudnnBackend*>(backend);
}

}  // namespace ringattn
