#include "kernels/cudnn/graph_builder.h"

#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cudnn/cudnn_context.h"

namespace ringattn {

BackgroundGraphBuilder::BackgroundGraphBuilder(InsertFn insert) : insert_(std::move(insert)) {}

BackgroundGraphBuilder::~BackgroundGraphBuilder() {
  Stop();
  if (handle_ != nullptr) (void)cudnnDestroy(handle_);
}

bool BackgroundGraphBuilder::Request(const SdpaGraphKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stop_ || !failed_.ok()) return false;
  if (!thread_.joinable()) {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return false;
    thread_ = std::thread([this, device] { Run(device); });
  }
  if (pending_.insert(key).second) {
    queue_.push_back(key);
    work_cv_.notify_one();
  }
  return true;
}

absl::Status BackgroundGraphBuilder::WaitIdle() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_cv_.wait(lock, [this] { return queue_.empty() && !building_; });
  return failed_;
}

void BackgroundGraphBuilder::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    queue_.clear();
    work_cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lock(mu_);
  pending_.clear();
  idle_cv_.notify_all();
}

void BackgroundGraphBuilder::Run(int device) {
  cudnnHandle_t handle = nullptr;
  absl::Status start;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
    start = absl::InternalError(absl::StrCat("background graph builder: cudaSetDevice(", device,
                                             ") failed: ", cudaGetErrorString(e)));
  } else {
    start = CudnnStatus(cudnnCreate(&handle), "background graph builder: cudnnCreate");
  }
  handle_ = handle;  // only this thread uses it; destroyed with the builder
  if (!start.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    failed_ = start;
    queue_.clear();
    pending_.clear();
    idle_cv_.notify_all();
    return;
  }
  for (;;) {
    SdpaGraphKey key;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_) break;
      key = queue_.front();
      queue_.pop_front();
      building_ = true;
    }
    bool transient = false;
    absl::StatusOr<OwnedSdpaGraph> built = BuildStaticGraph(handle, key, &transient);
    insert_(key, std::move(built), transient);  // takes the cache's lock, not ours
    std::lock_guard<std::mutex> lock(mu_);
    pending_.erase(key);  // after the insert: a request in between finds the key pending
    building_ = false;
    if (queue_.empty()) idle_cv_.notify_all();
  }
}

}  // namespace ringattn
