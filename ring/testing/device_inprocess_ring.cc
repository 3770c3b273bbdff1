#include "ring/testing/device_inprocess_ring.h"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdio>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "ring/device_ring_util.h"
#include "ring/transport/inprocess_device.h"

namespace ringattn {
namespace {

using device_ring_internal::DeviceAllocation;

// One rank's shard on the device, rows in the plan's local order.
struct DeviceShard {
  DeviceAllocation q, k, v, out;  // [batch, rows, heads(_k), head_dim], whole.dtype
  DeviceAllocation lse;           // [batch, heads, rows] fp32
};

}  // namespace

// ---- DeviceInProcessRing --------------------------------------------------------------------

DeviceInProcessRing::DeviceInProcessRing(int world, BackendFactory make_backend,
                                         std::chrono::milliseconds timeout, int device)
    : world_(world),
      make_backend_(std::move(make_backend)),
      timeout_(timeout),
      device_(device),
      backends_(world) {
  for (int r = 0; r < world; ++r) workspaces_.push_back(std::make_unique<DeviceRingWorkspace>());
}

DeviceInProcessRing::~DeviceInProcessRing() = default;

absl::StatusOr<std::unique_ptr<DeviceInProcessRing>> DeviceInProcessRing::Create(
    int world, BackendFactory make_backend, std::chrono::milliseconds timeout) {
  if (world < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world size must be >= 1, got ", world));
  }
  if (!make_backend) return absl::InvalidArgumentError("no backend factory");
  int device = -1;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  std::unique_ptr<DeviceInProcessRing> ring(
      new DeviceInProcessRing(world, std::move(make_backend), timeout, device));
  RA_RETURN_IF_ERROR(ring->EnsureGroup());
  return ring;
}

absl::Status DeviceInProcessRing::EnsureGroup() {
  return device_ring_internal::EnsureHealthyGroup(world_, timeout_, &comms_);
}

size_t DeviceInProcessRing::workspace_bytes() const {
  size_t bytes = 0;
  for (const auto& ws : workspaces_) bytes += ws->bytes_reserved();
  return bytes;
}

absl::StatusOr<std::vector<RingTimings>> DeviceInProcessRing::Run(
    const ShardPlan& plan, absl::Span<const RingShardTensors> shards,
    const RingAttentionOptions& options) {
  if (plan.world != world_ || shards.size() != static_cast<size_t>(world_)) {
    return absl::InvalidArgumentError(absl::StrCat("a ring of ", world_, " ranks got a plan for ",
                                                   plan.world, " and ", shards.size(), " shards"));
  }
  RA_RETURN_IF_ERROR(EnsureGroup());
  return device_ring_internal::RunRanksInThreads(
      device_, comms_, [&](int r, DeviceCommunicator& comm) -> absl::StatusOr<RingTimings> {
        if (backends_[r] == nullptr) {
          RA_ASSIGN_OR_RETURN(backends_[r], make_backend_());
        }
        return RingFlashAttnForwardDevice(comm, *backends_[r], plan, shards[r], options,
                                          workspaces_[r].get());
      });
}

// ---- Shared with the backward ---------------------------------------------------------------

namespace device_ring_internal {

absl::Status EnsureHealthyGroup(int world, std::chrono::milliseconds timeout,
                                std::vector<std::unique_ptr<DeviceCommunicator>>* comms) {
  bool healthy = comms->size() == static_cast<size_t>(world);
  for (const auto& comm : *comms) healthy = healthy && comm->CheckHealth().ok();
  if (healthy) return absl::OkStatus();
  comms->clear();
  RA_ASSIGN_OR_RETURN(*comms, InProcessDeviceGroup::CreateCommunicators(world, timeout));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<RingTimings>> RunRanksInThreads(
    int device, absl::Span<const std::unique_ptr<DeviceCommunicator>> comms,
    const RankRun& run_rank) {
  const int world = static_cast<int>(comms.size());
  std::vector<absl::StatusOr<RingTimings>> results(world, absl::UnknownError("rank did not run"));
  std::vector<std::thread> threads;
  threads.reserve(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      DeviceCommunicator& comm = *comms[r];
      // The current device is per thread.
      if (const cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
        results[r] = CudaErrorStatus(e, "cudaSetDevice(device)", __FILE__, __LINE__);
      } else {
        results[r] = run_rank(r, comm);
      }
      // The ring drivers abort on their own failures; this covers a rank that failed before
      // its driver ran (e.g. its backend could not be made). Abort is idempotent.
      if (!results[r].ok()) comm.Abort(results[r].status());
    });
  }
  for (std::thread& t : threads) t.join();

  std::vector<RingTimings> timings;
  timings.reserve(world);
  for (int r = 0; r < world; ++r) {
    if (!results[r].ok()) return results[r].status();
    timings.push_back(*std::move(results[r]));
  }
  return timings;
}

}  // namespace device_ring_internal

// ---- RunDeviceRingInProcess -----------------------------------------------------------------

absl::StatusOr<std::vector<RingTimings>> RunDeviceRingInProcess(const WholeAttention& whole,
                                                                int world, Layout layout,
                                                                const RingAttentionOptions& options,
                                                                const BackendFactory& make_backend,
                                                                std::chrono::milliseconds timeout) {
  RA_ASSIGN_OR_RETURN(const ShardPlan plan, PlanShards(whole.seqlen, world, layout));
  const size_t es = DTypeSize(whole.dtype);
  const size_t q_row = static_cast<size_t>(whole.heads) * whole.head_dim * es;
  const size_t kv_row = static_cast<size_t>(whole.heads_k) * whole.head_dim * es;
  const int64_t lse_outer = static_cast<int64_t>(whole.batch) * whole.heads;

  // Host staging of one rank's shard at a time, [batch, rows, ...].
  std::vector<DeviceShard> shards(world);
  std::vector<RingShardTensors> views(world);
  cudaStream_t stream = nullptr;
  RA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // Destroys the staging stream on every exit.
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() {
      if (const cudaError_t e = cudaStreamDestroy(s); e != cudaSuccess) {
        std::fprintf(stderr, "RunDeviceRingInProcess: cudaStreamDestroy failed: %s\n",
                     cudaGetErrorString(e));
      }
    }
  } guard{stream};

  std::vector<std::byte> host;
  for (int r = 0; r < world; ++r) {
    const int64_t rows = plan.shards[r].rows;
    DeviceShard& d = shards[r];
    RA_RETURN_IF_ERROR(d.q.Allocate(whole.batch * rows * q_row));
    RA_RETURN_IF_ERROR(d.k.Allocate(whole.batch * rows * kv_row));
    RA_RETURN_IF_ERROR(d.v.Allocate(whole.batch * rows * kv_row));
    RA_RETURN_IF_ERROR(d.out.Allocate(whole.batch * rows * q_row));
    RA_RETURN_IF_ERROR(d.lse.Allocate(lse_outer * rows * sizeof(float)));
    // Synchronous per tensor: `host` is reused, and an async copy from pageable memory is
    // only staged, not done, when it returns.
    auto upload = [&](DeviceAllocation& dst, const void* whole_tensor, size_t row_bytes) {
      if (dst.bytes() == 0) return absl::OkStatus();
      host.resize(dst.bytes());
      ExtractShard(plan, r, whole_tensor, whole.batch, row_bytes, host.data());
      RA_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(dst.get(), host.data(), dst.bytes(), cudaMemcpyHostToDevice, stream));
      RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
      return absl::OkStatus();
    };
    RA_RETURN_IF_ERROR(upload(d.q, whole.q, q_row));
    RA_RETURN_IF_ERROR(upload(d.k, whole.k, kv_row));
    RA_RETURN_IF_ERROR(upload(d.v, whole.v, kv_row));
    // Poison: all bytes 0xff is NaN in fp32, fp16 and bf16.
    if (d.out.bytes() > 0) {
      RA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d.out.get(), 0xff, d.out.bytes(), stream));
    }
    if (d.lse.bytes() > 0) {
      RA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d.lse.get(), 0xff, d.lse.bytes(), stream));
    }
    RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));

    RingShardTensors& t = views[r];
    t.dtype = whole.dtype;
    t.batch = whole.batch;
    t.heads = whole.heads;
    t.heads_k = whole.heads_k;
    t.head_dim = whole.head_dim;
    t.q = d.q.get();
    t.k = d.k.get();
    t.v = d.v.get();
    t.out = d.out.get();
    t.lse = whole.lse != nullptr ? static_cast<float*>(d.lse.get()) : nullptr;
  }

  RA_ASSIGN_OR_RETURN(std::unique_ptr<DeviceInProcessRing> ring,
                      DeviceInProcessRing::Create(world, make_backend, timeout));
  RA_ASSIGN_OR_RETURN(std::vector<RingTimings> timings, ring->Run(plan, views, options));

  for (int r = 0; r < world; ++r) {
    DeviceShard& d = shards[r];
    auto download = [&](const DeviceAllocation& src, int64_t outer, size_t row_bytes, void* dst) {
      if (src.bytes() == 0) return absl::OkStatus();
      host.resize(src.bytes());
      RA_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(host.data(), src.get(), src.bytes(), cudaMemcpyDeviceToHost, stream));
      RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
      InsertShard(plan, r, host.data(), outer, row_bytes, dst);
      return absl::OkStatus();
    };
    RA_RETURN_IF_ERROR(download(d.out, whole.batch, q_row, whole.out));
    if (whole.lse != nullptr) {
      RA_RETURN_IF_ERROR(download(d.lse, lse_outer, sizeof(float), whole.lse));
    }
  }
  return timings;
}

}  // namespace ringattn
