// cuDNN SDPA graphs (cudnn-frontend), forward and backward, built once per shape/option key
// and cached.
//
// A graph fixes everything but the device pointers: direction, dtype, sizes, the strides of
// Q/K/V/O (and dO), the mask band (cudnn_backend.h), the softmax scale. Tensors in cuDNN's
// [b, h, s, d] order; our [b, s, h, d] tensors are views with strides {batch, head, row, 1}.
// Stats is always a packed fp32 [b, h, s_q, 1] tensor; the backward's dQ, dK and dV are packed
// [b, s, h(_k), d] tensors of the input dtype. This header keeps the cudnn-frontend headers out
// of its includers; only sdpa_graph_cache.cc includes them.
//
// Dynamic shapes (the default, cuDNN >= 9.5): every graph is built with dynamic shapes and the
// kernel cache of its SdpaKernelClass, so a graph that differs from an earlier one only in sizes,
// strides or scalar values (scale, band bounds) reuses its compiled kernel instead of compiling
// again. Where cuDNN refuses the dynamic graph, the graph is built static instead (logged once
// per class). Design and figures: docs/cudnn.md.
#pragma once

#include <cudnn.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype.h"

namespace ringattn {

struct SdpaGraphKey {
  bool backward = false;       // sdpa_backward (dQ, dK, dV) instead of sdpa (O, Stats)
  DType dtype = DType::kBF16;  // q, k, v, O (and dO, dQ, dK, dV): bf16 or fp16
  int64_t batch = 0, heads = 0, heads_k = 0, seqlen_q = 0, seqlen_k = 0, head_dim = 0;
  // {batch, head, row} strides in elements (the head_dim stride is 1). O is the forward's
  // output, or the backward's input.
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t o_stride[3] = {0, 0, 0};
  int64_t do_stride[3] = {0, 0, 0};  // backward only
  bool has_right_bound = false;
  int64_t right_bound = 0;
  bool has_left_bound = false;
  int64_t left_bound = 0;
  bool padding_mask = false;
  uint32_t scale_bits = 0;  // the softmax scale's fp32 bits

  bool operator==(const SdpaGraphKey&) const = default;
  std::string ToString() const;
};

struct SdpaGraphKeyHash {
  size_t operator()(const SdpaGraphKey& k) const;
};

// What a compiled kernel is specialised on: the key less its sizes, strides and scalar values
// (the scale and the band bounds are pass-by-value operands of the graph, given at each
// execution). Graphs of one class have one operation-graph topology, which a cuDNN kernel cache
// requires (it is bound to the first operation graph it sees).
struct SdpaKernelClass {
  bool backward = false;
  DType dtype = DType::kBF16;
  int64_t head_dim = 0;
  bool gqa = false;  // backward only: heads != heads_k adds a reduction of dK/dV
  bool has_right_bound = false;
  bool right_bound_shift = false;  // right_bound != 0 adds a shift operand
  bool has_left_bound = false;
  bool padding_mask = false;
  // Bit i set: tensor i of (Q, K, V, O, dO) has its head stride above its row stride ([b, h, s,
  // d]-like); clear for our [b, s, h, d] views, or where heads or rows are 1.
  uint32_t head_major = 0;
  // Backward on cuDNN <= 9.15 only: s_kv % 128 != 0 (the frontend then adds a padding mask).
  bool kv_tail = false;

  bool operator==(const SdpaKernelClass&) const = default;
  std::string ToString() const;
};

struct SdpaKernelClassHash {
  size_t operator()(const SdpaKernelClass& c) const;
};

// The class of `key` under cuDNN `cudnn_version` (cudnnGetVersion(), e.g. 91900).
SdpaKernelClass KernelClassOf(const SdpaGraphKey& key, int64_t cudnn_version);

// A built graph (opaque outside sdpa_graph_cache.cc).
struct SdpaGraph;
struct SdpaGraphDeleter {
  void operator()(SdpaGraph* graph) const;
};
// A built graph owned outside the cache (destructible where SdpaGraph is incomplete).
using OwnedSdpaGraph = std::unique_ptr<SdpaGraph, SdpaGraphDeleter>;

// A static graph for `key` built with `handle` (on its current device), touching no cache: what
// SdpaGraphCache::GetOrBuild builds without dynamic shapes, with its errors. *transient: the
// failure may not recur (a CUDA call failed, or the frontend threw), so it is not remembered.
absl::StatusOr<OwnedSdpaGraph> BuildStaticGraph(cudnnHandle_t handle, const SdpaGraphKey& key,
                                                bool* transient);

// Device pointers of one forward execution.
struct SdpaTensors {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* stats = nullptr;
  int32_t* seq_len_q = nullptr;   // [batch], only with padding_mask
  int32_t* seq_len_kv = nullptr;  // [batch], only with padding_mask
};

// Device pointers of one backward execution.
struct SdpaBackwardTensors {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* o = nullptr;
  const void* dout = nullptr;
  const float* stats = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int32_t* seq_len_q = nullptr;   // [batch], only with padding_mask
  int32_t* seq_len_kv = nullptr;  // [batch], only with padding_mask
};

// Bytes of device workspace the graph's plan needs (cuDNN's and the frontend's).
int64_t SdpaWorkspaceBytes(const SdpaGraph& graph);

// Enqueue a forward / backward graph on the handle's stream (cudnnSetStream is the caller's
// job).
absl::Status ExecuteSdpa(const SdpaGraph& graph, cudnnHandle_t handle, const SdpaTensors& t,
                         void* workspace);
absl::Status ExecuteSdpaBackward(const SdpaGraph& graph, cudnnHandle_t handle,
                                 const SdpaBackwardTensors& t, void* workspace);

// Counts of a cache's builds.
struct SdpaGraphCacheStats {
  int64_t builds = 0;            // graphs built, forward and backward, failed builds included
  int64_t dynamic_builds = 0;    // of them, built with dynamic shapes and a class kernel cache
  int64_t static_fallbacks = 0;  // of them, built static after cuDNN refused the dynamic graph
  int64_t kernel_classes = 0;    // kernel caches held (classes met with dynamic shapes)
};

// Key -> built graph, or the status of a failed build (not retried, except failures of CUDA
// calls, which may be transient). Not thread-safe: the backend serialises calls.
class SdpaGraphCache {
 public:
  // Beyond this many entries the cache is emptied before the next build (a ring sees a handful
  // of shapes; this only bounds pathological use). Kernel caches are kept (a few per process).
  static constexpr size_t kMaxEntries = 512;

  // dynamic_shapes: build dynamic-shape graphs sharing a kernel cache per SdpaKernelClass (when
  // the cuDNN loaded is >= 9.5; older ones get static graphs, logged once). false: every graph
  // static, compiled for its sizes (the behaviour before kernel caches; for comparison).
  explicit SdpaGraphCache(bool dynamic_shapes = true);
  ~SdpaGraphCache();
  SdpaGraphCache(const SdpaGraphCache&) = delete;
  SdpaGraphCache& operator=(const SdpaGraphCache&) = delete;

  // The graph for `key`, built with `handle` (on its current device) on first use. A build
  // that cuDNN refuses (no engine for the configuration) is InvalidArgument carrying cuDNN's
  // message; other failures are Internal.
  absl::StatusOr<const SdpaGraph*> GetOrBuild(cudnnHandle_t handle, const SdpaGraphKey& key);

  // Whether `key` has an entry: a built graph, or a remembered failure.
  bool Has(const SdpaGraphKey& key) const { return entries_.contains(key); }
  // Stores a graph built elsewhere (BuildStaticGraph) as GetOrBuild would have: counted in
  // builds, a failure remembered unless `transient`. Ignored when `key` has an entry already.
  void Insert(const SdpaGraphKey& key, absl::StatusOr<OwnedSdpaGraph> built, bool transient);

  // Builds so far, forward and backward.
  int64_t builds() const { return stats_.builds; }
  const SdpaGraphCacheStats& stats() const { return stats_; }
  size_t size() const { return entries_.size(); }
  // Whether graphs are built with dynamic shapes (asked for, and the cuDNN loaded has them).
  bool dynamic_shapes() const { return dynamic_shapes_; }

 private:
  struct Entry {
    std::unique_ptr<SdpaGraph> graph;  // null when the build failed
    absl::Status status;
  };
  // One class's kernel cache (a cudnn_frontend::KernelCache, opaque here) and what cuDNN said.
  struct KernelClassState;
  // Stores the outcome of a build of `key` (no entry yet); the entry's graph, or the error.
  absl::StatusOr<const SdpaGraph*> Store(const SdpaGraphKey& key,
                                         absl::StatusOr<std::unique_ptr<SdpaGraph>> built,
                                         bool transient);
  // Dynamic build of `key` in `state`'s class, falling back to a static one when cuDNN refuses.
  absl::StatusOr<std::unique_ptr<SdpaGraph>> BuildInClass(cudnnHandle_t handle,
                                                          const SdpaGraphKey& key,
                                                          const SdpaKernelClass& cls,
                                                          KernelClassState& state, bool* transient);

  bool dynamic_shapes_;
  int64_t cudnn_version_ = 0;
  std::unordered_map<SdpaGraphKey, Entry, SdpaGraphKeyHash> entries_;
  std::unordered_map<SdpaKernelClass, std::unique_ptr<KernelClassState>, SdpaKernelClassHash>
      classes_;
  SdpaGraphCacheStats stats_;
};

}  // namespace ringattn
