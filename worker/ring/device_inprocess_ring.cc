#include "worker/ring/device_inprocess_ring.h"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdio>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/status_macros.h"
#include "worker/ring/inprocess_device_communicator.h"

namespace ringattn {
namespace {

// One device allocation; null for zero bytes.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() {
    if (ptr_ == nullptr) return;
    if (const cudaError_t e = cudaFree(ptr_); e != cudaSuccess) {
      std::fprintf(stderr, "RunDeviceRingInProcess: cudaFree failed: %s\n", cudaGetErrorString(e));
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  absl::Status Allocate(size_t bytes) {
    if (bytes == 0) return absl::OkStatus();
    RA_CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr_, bytes));
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// One rank's shard on the device, rows in the plan's local order.
struct DeviceShard {
  DeviceBuffer q, k, v, out;  // [batch, rows, heads(_k), head_dim], whole.dtype
  DeviceBuffer lse;           // [batch, heads, rows] fp32
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
  // A group that failed stays aborted; a healthy one is reused, its per-pair order intact
  // (every successful Run matched every transfer it posted).
  bool healthy = !comms_.empty();
  for (const auto& comm : comms_) healthy = healthy && comm->CheckHealth().ok();
  if (healthy) return absl::OkStatus();
  comms_.clear();
  RA_ASSIGN_OR_RETURN(comms_, InProcessDeviceGroup::CreateCommunicators(world_, timeout_));
  return absl::OkStatus();
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
  std::vector<absl::StatusOr<RingTimings>> results(world_, absl::UnknownError("rank did not run"));
  std::vector<std::thread> threads;
  threads.reserve(world_);
  for (int r = 0; r < world_; ++r) {
    threads.emplace_back([&, r] {
      DeviceCommunicator& comm = *comms_[r];
      // The current device is per thread.
      if (const cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) {
        results[r] = CudaErrorStatus(e, "cudaSetDevice(device_)", __FILE__, __LINE__);
        comm.Abort(results[r].status());
        return;
      }
      if (backends_[r] == nullptr) {
        absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = make_backend_();
        if (!backend.ok()) {
          comm.Abort(backend.status());
          results[r] = backend.status();
          return;
        }
        backends_[r] = *std::move(backend);
      }
      results[r] = RingFlashAttnForwardDevice(comm, *backends_[r], plan, shards[r], options,
                                              workspaces_[r].get());
    });
  }
  for (std::thread& t : threads) t.join();

  std::vector<RingTimings> timings;
  timings.reserve(world_);
  for (int r = 0; r < world_; ++r) {
    if (!results[r].ok()) return results[r].status();
    timings.push_back(*std::move(results[r]));
  }
  return timings;
}

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
    auto upload = [&](DeviceBuffer& dst, const void* whole_tensor, size_t row_bytes) {
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
    auto download = [&](const DeviceBuffer& src, int64_t outer, size_t row_bytes, void* dst) {
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
