// Builds static cuDNN SDPA graphs (BuildStaticGraph) on a thread of its own, so that a call
// meeting a new shape need not wait tens of ms for its graph (docs/cudnn.md, "Background
// builds").
//
// The thread starts at the first Request, on the device current at that request, and makes its
// own cuDNN handle there (destroyed with the builder: destroy the graphs it built first). Keys are queued once: a key queued or being
// built is not queued again. Each build runs without any lock held; its outcome then goes to
// `insert`, which takes the cache's lock. The builder's own lock is never held while `insert`
// runs, so Request may be called with the cache's lock held; WaitIdle and Stop must not be.
#pragma once

#include <cudnn.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cudnn/sdpa_graph_cache.h"

namespace ringattn {

class BackgroundGraphBuilder {
 public:
  // Receives each build's outcome on the builder thread (`transient` as BuildStaticGraph's).
  using InsertFn =
      std::function<void(const SdpaGraphKey&, absl::StatusOr<OwnedSdpaGraph>, bool transient)>;

  explicit BackgroundGraphBuilder(InsertFn insert);
  // Stop(), then destroys the handle.
  ~BackgroundGraphBuilder();
  BackgroundGraphBuilder(const BackgroundGraphBuilder&) = delete;
  BackgroundGraphBuilder& operator=(const BackgroundGraphBuilder&) = delete;

  // Queues the build of `key` (a no-op when it is queued or being built). false when the builder
  // cannot build: stopped, or its thread found no device or handle (the caller builds itself).
  bool Request(const SdpaGraphKey& key);
  // Blocks until nothing is queued or being built. The error that ended the thread, if any.
  absl::Status WaitIdle();
  // Drops the queued keys, lets the build in progress finish (and reach `insert`), joins the
  // thread. Later requests are refused.
  void Stop();

 private:
  void Run(int device);

  const InsertFn insert_;
  std::mutex mu_;
  std::condition_variable work_cv_;  // a key queued, or stop
  std::condition_variable idle_cv_;  // the queue emptied and nothing is building
  std::deque<SdpaGraphKey> queue_;
  std::unordered_set<SdpaGraphKey, SdpaGraphKeyHash> pending_;  // queued or being built
  bool building_ = false;
  bool stop_ = false;
  absl::Status failed_;  // why the thread ended early (no device, no handle)
  cudnnHandle_t handle_ = nullptr;  // the thread's; set before its first build
  std::thread thread_;
};

}  // namespace ringattn
