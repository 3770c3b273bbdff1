// What the cudnn backend's forward and backward calls share on the device (internal to
// kernels/cudnn): the cuDNN handle, the graph cache, one device workspace and the order of calls
// across streams.
//
// The handle is made at the first call that needs it, on the then-current device; later calls
// must be on that device. The workspace is kept and grown (by at least half again, in 2 MiB
// steps) with cudaMallocAsync/cudaFreeAsync on the call's stream, so that nothing synchronises
// the device (on a device without memory pools, cudaMalloc after waiting for the previous
// call). Calls are serialised by mutex(); a call on another stream than the previous one first
// makes its stream wait for the previous call (WaitForPrevious), and every call records its end
// (RecordDone).
//
// With background builds on (and static graphs), a call whose graph is not built yet runs our
// own kernel while a BackgroundGraphBuilder builds the graph (docs/cudnn.md).
#pragma once

#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "kernels/attention_params.h"
#include "kernels/cudnn/cudnn_backend.h"
#include "kernels/cudnn/graph_builder.h"
#include "kernels/cudnn/sdpa_graph_cache.h"
#include "kernels/dtype.h"

namespace ringattn {

class CudnnDeviceContext {
 public:
  // dynamic_shapes: the graph cache's (SdpaGraphCache).
  explicit CudnnDeviceContext(bool dynamic_shapes);
  // Stops the background builder, waits for the last call, then frees the graphs, the
  // workspace and the handles (errors are ignored: there is no one to report them to, the
  // driver may be shutting down).
  ~CudnnDeviceContext();
  CudnnDeviceContext(const CudnnDeviceContext&) = delete;
  CudnnDeviceContext& operator=(const CudnnDeviceContext&) = delete;

  // Held for a whole call; every member below needs it.
  std::mutex& mutex() const { return mu_; }

  // Makes `stream` wait for the previous call when that ran on another stream.
  absl::Status WaitForPrevious(cudaStream_t stream);
  // Records the end of a call on `stream` (from the first handle on: before it no call has
  // used the workspace).
  absl::Status RecordDone(cudaStream_t stream);

  // Makes the handle on the current device at the first call; FailedPrecondition without a
  // device, or on another device than the first call's.
  absl::Status EnsureHandle();
  // The handle (after EnsureHandle), bound to `stream`.
  absl::Status BindHandle(cudaStream_t stream);
  cudnnHandle_t handle() const { return handle_; }
  SdpaGraphCache& graphs() { return *graphs_; }
  const SdpaGraphCache& graphs() const { return *graphs_; }

  // At least `bytes` of device workspace for work enqueued on `stream` (after EnsureHandle).
  absl::Status EnsureWorkspace(int64_t bytes, cudaStream_t stream);
  char* workspace() const { return static_cast<char*>(workspace_); }
  int64_t workspace_bytes() const { return workspace_bytes_; }

  void set_background_builds(bool on) { background_builds_ = on; }
  // Whether a call of `key` may run our kernel while its graph is built in the background:
  // background builds on, static graphs, no cache entry for `key` yet.
  bool MayBuildInBackground(const SdpaGraphKey& key) const {
    return background_builds_ && !graphs_->dynamic_shapes() && !graphs_->Has(key);
  }
  // Requests the background build of `key`; true when the builder took it, and the call is then
  // counted as served by our kernel. false: the caller builds the graph itself (GetOrBuild).
  bool RequestBackgroundBuild(const SdpaGraphKey& key);
  // Calls served by our kernel while their graph was built.
  int64_t own_kernel_calls() const { return own_kernel_calls_; }
  // Blocks until the builder is idle; call WITHOUT mutex() held (the builder takes it).
  absl::Status WaitForBackgroundBuilds() { return builder_->WaitIdle(); }

 private:
  mutable std::mutex mu_;
  int device_ = -1;
  cudnnHandle_t handle_ = nullptr;
  bool async_alloc_ = false;    // the device has stream-ordered memory pools
  cudaEvent_t done_ = nullptr;  // recorded after each call's last use of the workspace
  bool done_recorded_ = false;
  cudaStream_t last_stream_ = nullptr;
  void* workspace_ = nullptr;
  int64_t workspace_bytes_ = 0;
  std::unique_ptr<SdpaGraphCache> graphs_;  // destroyed before the handles they were built with
  bool background_builds_ = false;
  int64_t own_kernel_calls_ = 0;
  // Inserts into graphs_ under mu_; stopped first, destroyed (with its handle) after graphs_.
  std::unique_ptr<BackgroundGraphBuilder> builder_;
};

// ---- Helpers of both directions -------------------------------------------------------------

// The graph key of a call of `p` planned as `plan` (non-empty): the live block's sizes, q/k/v's
// strides, the band, the scale. The O (and dO) strides and the direction are the caller's.
SdpaGraphKey PlannedGraphKey(const AttentionParams& p, const CudnnMaskPlan& plan);

// One graph key per class of `spec` (CudnnPrewarmSpec): batch 1, sequence length 256, 8 heads
// (8:2 for the backward's GQA classes), contiguous [b, s, h, d] tensors, scale 1/sqrt(d).
std::vector<SdpaGraphKey> PrewarmKeys(const CudnnPrewarmSpec& spec);

// The cuDNN status of `expr` as an absl::Status.
absl::Status CudnnStatus(cudnnStatus_t s, const char* expr);

inline bool Aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// `base` moved by `elements` of type t.
inline const void* Advance(const void* base, int64_t elements, DType t) {
  return static_cast<const char*>(base) + elements * DTypeSize(t);
}
inline void* Advance(void* base, int64_t elements, DType t) {
  return static_cast<char*>(base) + elements * DTypeSize(t);
}

// Workspace sections start 256-byte aligned.
inline int64_t Align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace ringattn
