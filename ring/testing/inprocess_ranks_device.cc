// The device half of inprocess_ranks.h (ra_ring_cuda): the device rings over an
// InProcessDeviceGroup and their whole-problem runs.
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdio>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/device_buffer.h"
#include "base/status_macros.h"
#include "ring/device_ring.h"
#include "ring/testing/inprocess_ranks.h"
#include "ring/transport/device_communicator.h"
#include "ring/transport/inprocess.h"

namespace ringattn {
namespace {

using inprocess_internal::WholeTensor;

// The driver of each pass.
absl::StatusOr<RingTimings> RunDriver(DeviceCommunicator& comm, AttentionBackend& backend,
                                      const ShardPlan& plan, const RingShardTensors& t,
                                      const RingAttentionOptions& options,
                                      DeviceRingWorkspace* ws) {
  return RingFlashAttnForwardDevice(comm, backend, plan, t, options, ws);
}
absl::StatusOr<RingTimings> RunDriver(DeviceCommunicator& comm, AttentionBackend& backend,
                                      const ShardPlan& plan, const RingBackwardTensors& t,
                                      const RingAttentionOptions& options,
                                      DeviceRingWorkspace* ws) {
  return RingFlashAttnBackwardDevice(comm, backend, plan, t, options, ws);
}

// Keeps *comms when it holds `world` healthy communicators of one InProcessDeviceGroup, makes a
// new group otherwise (a group that failed stays aborted; a healthy one is reused, its per-pair
// order intact, as every successful run matched every transfer it posted).
absl::Status EnsureHealthyGroup(int world, std::chrono::milliseconds timeout,
                                std::vector<std::unique_ptr<DeviceCommunicator>>* comms) {
  bool healthy = comms->size() == static_cast<size_t>(world);
  for (const auto& comm : *comms) healthy = healthy && comm->CheckHealth().ok();
  if (healthy) return absl::OkStatus();
  comms->clear();
  RA_ASSIGN_OR_RETURN(*comms, InProcessDeviceGroup::CreateCommunicators(world, timeout));
  return absl::OkStatus();
}

// RunRanksInThreads (inprocess_ranks.h) with `device` current in every rank's thread.
absl::StatusOr<std::vector<RingTimings>> RunRanksOnDevice(
    int device, absl::Span<const std::unique_ptr<DeviceCommunicator>> comms,
    const std::function<absl::StatusOr<RingTimings>(int rank, DeviceCommunicator& comm)>&
        run_rank) {
  return RunRanksInThreads<DeviceCommunicator>(
      comms, [&](int r, DeviceCommunicator& comm) -> absl::StatusOr<RingTimings> {
        // The current device is per thread.
        RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
        return run_rank(r, comm);
      });
}

// Copies host tensors to and from the device on one stream of its own, synchronously per
// tensor: the host staging buffer is reused, and an async copy from pageable memory is only
// staged, not done, when it returns.
class Staging {
 public:
  // Reports a failure on stderr (a destructor cannot return it).
  ~Staging() {
    if (stream_ == nullptr) return;
    const cudaError_t e = cudaStreamDestroy(stream_);
    if (e != cudaSuccess) {
      std::fprintf(stderr, "in-process device ring staging: cudaStreamDestroy failed: %s (%s)\n",
                   cudaGetErrorName(e), cudaGetErrorString(e));
    }
  }
  absl::Status Init() {
    RA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    return absl::OkStatus();
  }
  // dst <- rank's rows of x.in.
  absl::Status Upload(const ShardPlan& plan, int rank, const WholeTensor& x,
                      const DeviceBuffer& dst) {
    if (dst.bytes() == 0) return absl::OkStatus();
    host_.resize(dst.bytes());
    ExtractShard(plan, rank, x.in, x.outer, x.row_bytes, host_.data());
    RA_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst.get(), host_.data(), dst.bytes(), cudaMemcpyHostToDevice, stream_));
    RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }
  // rank's rows of x.out <- src.
  absl::Status Download(const ShardPlan& plan, int rank, const DeviceBuffer& src,
                        const WholeTensor& x) {
    if (src.bytes() == 0) return absl::OkStatus();
    host_.resize(src.bytes());
    RA_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host_.data(), src.get(), src.bytes(), cudaMemcpyDeviceToHost, stream_));
    RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    InsertShard(plan, rank, host_.data(), x.outer, x.row_bytes, x.out);
    return absl::OkStatus();
  }
  // All bytes 0xff: NaN in fp32, fp16 and bf16.
  absl::Status Poison(const DeviceBuffer& d) {
    if (d.bytes() == 0) return absl::OkStatus();
    RA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d.get(), 0xff, d.bytes(), stream_));
    RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

 private:
  cudaStream_t stream_ = nullptr;
  std::vector<std::byte> host_;
};

// The whole-problem run of a device ring: shards the whole problem by the layout into device
// memory (inputs uploaded, outputs poisoned), runs a new Ring over the shards, and downloads
// the wanted outputs.
template <typename Ring, typename Whole>
absl::StatusOr<std::vector<RingTimings>> RunOnDevice(const Whole& whole, int world, Layout layout,
                                                     const RingAttentionOptions& options,
                                                     const BackendFactory& make_backend,
                                                     std::chrono::milliseconds timeout) {
  RA_ASSIGN_OR_RETURN(const ShardPlan plan, PlanShards(whole.seqlen, world, layout));
  const std::vector<WholeTensor> tensors = inprocess_internal::TensorsOf(whole);
  Staging staging;
  RA_RETURN_IF_ERROR(staging.Init());
  std::vector<std::vector<DeviceBuffer>> shards(world);  // [rank][tensor]
  std::vector<decltype(inprocess_internal::ShardOf(whole, {}))> views;
  for (int r = 0; r < world; ++r) {
    const int64_t rows = plan.shards[r].rows;
    shards[r] = std::vector<DeviceBuffer>(tensors.size());
    std::vector<void*> pointers;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const WholeTensor& x = tensors[i];
      DeviceBuffer& d = shards[r][i];  // allocated at its exact size
      RA_RETURN_IF_ERROR(d.Reserve(x.outer * rows * x.row_bytes));
      RA_RETURN_IF_ERROR(x.in != nullptr ? staging.Upload(plan, r, x, d) : staging.Poison(d));
      pointers.push_back(d.get());
    }
    views.push_back(inprocess_internal::ShardOf(whole, pointers));
  }
  RA_ASSIGN_OR_RETURN(std::unique_ptr<Ring> ring, Ring::Create(world, make_backend, timeout));
  RA_ASSIGN_OR_RETURN(std::vector<RingTimings> timings, ring->Run(plan, views, options));
  for (int r = 0; r < world; ++r) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].out == nullptr) continue;
      RA_RETURN_IF_ERROR(staging.Download(plan, r, shards[r][i], tensors[i]));
    }
  }
  return timings;
}

}  // namespace

// ---- BasicDeviceInProcessRing ---------------------------------------------------------------

template <typename Pass>
BasicDeviceInProcessRing<Pass>::BasicDeviceInProcessRing(int world, BackendFactory make_backend,
                                                         std::chrono::milliseconds timeout,
                                                         int device)
    : world_(world),
      make_backend_(std::move(make_backend)),
      timeout_(timeout),
      device_(device),
      backends_(world) {
  for (int r = 0; r < world; ++r) {
    workspaces_.push_back(std::make_unique<DeviceRingWorkspace>());
  }
}

template <typename Pass>
BasicDeviceInProcessRing<Pass>::~BasicDeviceInProcessRing() = default;

template <typename Pass>
absl::StatusOr<std::unique_ptr<BasicDeviceInProcessRing<Pass>>>
BasicDeviceInProcessRing<Pass>::Create(int world, BackendFactory make_backend,
                                       std::chrono::milliseconds timeout) {
  if (world < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world size must be >= 1, got ", world));
  }
  if (!make_backend) return absl::InvalidArgumentError("no backend factory");
  int device = -1;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  std::unique_ptr<BasicDeviceInProcessRing> ring(
      new BasicDeviceInProcessRing(world, std::move(make_backend), timeout, device));
  RA_RETURN_IF_ERROR(EnsureHealthyGroup(world, timeout, &ring->comms_));
  return ring;
}

template <typename Pass>
size_t BasicDeviceInProcessRing<Pass>::workspace_bytes() const {
  size_t bytes = 0;
  for (const auto& ws : workspaces_) bytes += ws->bytes_reserved();
  return bytes;
}

template <typename Pass>
absl::StatusOr<std::vector<RingTimings>> BasicDeviceInProcessRing<Pass>::Run(
    const ShardPlan& plan, absl::Span<const typename Pass::Tensors> shards,
    const RingAttentionOptions& options) {
  if (plan.world != world_ || shards.size() != static_cast<size_t>(world_)) {
    return absl::InvalidArgumentError(absl::StrCat("a ring of ", world_, " ranks got a plan for ",
                                                   plan.world, " and ", shards.size(), " shards"));
  }
  RA_RETURN_IF_ERROR(EnsureHealthyGroup(world_, timeout_, &comms_));
  return RunRanksOnDevice(
      device_, comms_, [&](int r, DeviceCommunicator& comm) -> absl::StatusOr<RingTimings> {
        if (backends_[r] == nullptr) {
          RA_ASSIGN_OR_RETURN(backends_[r], make_backend_());
        }
        return RunDriver(comm, *backends_[r], plan, shards[r], options, workspaces_[r].get());
      });
}

template class BasicDeviceInProcessRing<DeviceForwardPass>;
template class BasicDeviceInProcessRing<DeviceBackwardPass>;

// ---- The whole-problem runs -----------------------------------------------------------------

absl::StatusOr<std::vector<RingTimings>> RunDeviceRingInProcess(const WholeAttention& whole,
                                                                int world, Layout layout,
                                                                const RingAttentionOptions& options,
                                                                const BackendFactory& make_backend,
                                                                std::chrono::milliseconds timeout) {
  return RunOnDevice<DeviceInProcessRing>(whole, world, layout, options, make_backend, timeout);
}

absl::StatusOr<std::vector<RingTimings>> RunDeviceRingBackwardInProcess(
    const WholeAttentionBackward& whole, int world, Layout layout,
    const RingAttentionOptions& options, const BackendFactory& make_backend,
    std::chrono::milliseconds timeout) {
  return RunOnDevice<DeviceInProcessRingBackward>(whole, world, layout, options, make_backend,
                                                  timeout);
}

}  // namespace ringattn
