#include "worker/device_ring_engine.h"

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <map>
#include <mutex>
#include <optional>

#include <cstddef>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "base/cuda_check.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "ringattn_config.h"
#include "kernels/backend_registry.h"
#include "ring/device_ring.h"
#include "ring/transport/nccl_communicator.h"
#include "worker/pitched_runs.h"
#if RINGATTN_HAVE_CUDNN
#include "kernels/cudnn/cudnn_backend.h"
#endif

namespace ringattn {
namespace {

constexpr char kNcclIdKey[] = "nccl_unique_id";

// A device allocation that only grows.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  absl::StatusOr<void*> Reserve(size_t bytes) {
    if (bytes <= capacity_) return ptr_;
    if (ptr_ != nullptr) {
      RA_CUDA_RETURN_IF_ERROR(cudaFree(ptr_));
      ptr_ = nullptr;
      capacity_ = 0;
    }
    RA_CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr_, bytes));
    capacity_ = bytes;
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t capacity_ = 0;
};

// Bytes of one rank's shard tensors.
struct ShardBytes {
  size_t q = 0;    // q, out, dout: [batch, rows, heads, head_dim], dtype
  size_t kv = 0;   // k, v: [batch, rows, heads_k, head_dim], dtype
  size_t lse = 0;  // [batch, heads, rows] fp32
  size_t dq = 0;   // [batch, rows, heads, head_dim], grad_dtype
  size_t dkv = 0;  // dk, dv: [batch, rows, heads_k, head_dim], grad_dtype

  template <typename Tensors>
  static ShardBytes Of(const Tensors& t, int64_t rows, DType grad_dtype) {
    const size_t q_elems = static_cast<size_t>(t.batch) * rows * t.heads * t.head_dim;
    const size_t kv_elems = static_cast<size_t>(t.batch) * rows * t.heads_k * t.head_dim;
    ShardBytes b;
    b.q = q_elems * DTypeSize(t.dtype);
    b.kv = kv_elems * DTypeSize(t.dtype);
    b.lse = static_cast<size_t>(t.batch) * t.heads * rows * sizeof(float);
    b.dq = q_elems * DTypeSize(grad_dtype);
    b.dkv = kv_elems * DTypeSize(grad_dtype);
    return b;
  }
};

double SecondsSince(absl::Time t0) { return absl::ToDoubleSeconds(absl::Now() - t0); }

// The bytes of the device allocation that starts at `p` (cuMemGetAddressRange, reached through
// the runtime so that the binary needs no libcuda where there is no GPU).
absl::StatusOr<size_t> AllocationBytes(void* p) {
  using GetRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  static GetRange get_range = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<GetRange>(fn);
  }();
  CUdeviceptr base = 0;
  size_t size = 0;
  if (get_range == nullptr ||
      get_range(&base, &size, reinterpret_cast<CUdeviceptr>(p)) != CUDA_SUCCESS) {
    return absl::InvalidArgumentError("the CUDA IPC handle's allocation has no known size");
  }
  if (base != reinterpret_cast<CUdeviceptr>(p)) {
    return absl::InvalidArgumentError("the CUDA IPC handle does not open at its allocation's start");
  }
  return size;
}

// Whether `p` is memory of `device` (device-resident shard tensors are used in place).
bool OnDevice(const void* p, int device) {
  if (p == nullptr) return false;
  cudaPointerAttributes a;
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();  // not a pointer CUDA knows
    return false;
  }
  return a.type == cudaMemoryTypeDevice && a.device == device;
}

// The device side of one call's shard tensors: each tensor used where it lies when it is in
// this device's memory, else copied into a kept buffer (inputs at once, outputs back by
// CopyBack). Synchronous copies: the drivers require their inputs ready when called.
class CallStaging {
 public:
  explicit CallStaging(int device) : device_(device) {}

  absl::StatusOr<const void*> In(const void* src, size_t bytes, DeviceBuffer& buffer) {
    if (OnDevice(src, device_)) return src;
    RA_ASSIGN_OR_RETURN(void* dst, buffer.Reserve(bytes));
    const absl::Time t0 = absl::Now();
    if (bytes > 0) RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
    in_seconds_ += SecondsSince(t0);
    return dst;
  }
  absl::StatusOr<void*> Out(void* dst, size_t bytes, DeviceBuffer& buffer) {
    if (dst == nullptr || OnDevice(dst, device_)) return dst;
    RA_ASSIGN_OR_RETURN(void* src, buffer.Reserve(bytes));
    copies_back_.push_back({static_cast<char*>(dst), static_cast<const char*>(src), bytes});
    return src;
  }
  absl::Status CopyBack(RingTimings* timings) {
    const absl::Time t0 = absl::Now();
    for (const CopySpan& c : copies_back_) {
      if (c.bytes > 0) {
        RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(c.dst, c.src, c.bytes, cudaMemcpyDefault));
      }
    }
    timings->host_to_device_seconds = in_seconds_;
    timings->device_to_host_seconds = SecondsSince(t0);
    return absl::OkStatus();
  }

 private:
  const int device_;
  double in_seconds_ = 0;
  std::vector<CopySpan> copies_back_;
};

class DeviceRingConnection final : public RingConnection {
 public:
  // `backward` is null when the kernel has no device backward (cuda_reference).
  DeviceRingConnection(int device, AttentionBackend* backend, AttentionBackend* backward,
                       std::unique_ptr<NcclCommunicator> comm)
      : device_(device), backend_(backend), backward_(backward), comm_(std::move(comm)) {}

  int rank() const override { return comm_->rank(); }
  int world_size() const override { return comm_->world_size(); }
  void Abort(const absl::Status& reason) override { comm_->Abort(reason); }

  absl::StatusOr<RingTimings> Backward(const ShardPlan& plan, const RingBackwardTensors& t,
                                       const RingAttentionOptions& options) override {
    if (backward_ == nullptr) {
      return absl::UnimplementedError(
          absl::StrCat("kernel '", std::string(backend_->name()),
                       "' has no backward on GPU workers; run the workers with --kernel=cuda or "
                       "--kernel=cudnn"));
    }
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    RA_RETURN_IF_ERROR(CheckPlanMatchesGroup(plan, comm_->rank(), comm_->world_size()));
    const ShardBytes b = ShardBytes::Of(t, plan.shards[comm_->rank()].rows, t.grad_dtype);
    CallStaging io(device_);
    RingBackwardTensors d = t;  // same sizes and dtypes, device pointers
    RA_ASSIGN_OR_RETURN(d.q, io.In(t.q, b.q, q_));
    RA_ASSIGN_OR_RETURN(d.k, io.In(t.k, b.kv, k_));
    RA_ASSIGN_OR_RETURN(d.v, io.In(t.v, b.kv, v_));
    RA_ASSIGN_OR_RETURN(d.out, io.In(t.out, b.q, out_));
    RA_ASSIGN_OR_RETURN(d.dout, io.In(t.dout, b.q, dout_));
    RA_ASSIGN_OR_RETURN(const void* lse, io.In(t.lse, b.lse, lse_));
    d.lse = static_cast<const float*>(lse);
    RA_ASSIGN_OR_RETURN(d.dq, io.Out(t.dq, b.dq, dq_));
    RA_ASSIGN_OR_RETURN(d.dk, io.Out(t.dk, b.dkv, dk_));
    RA_ASSIGN_OR_RETURN(d.dv, io.Out(t.dv, b.dkv, dv_));
    RA_ASSIGN_OR_RETURN(
        RingTimings timings,
        RingFlashAttnBackwardDevice(*comm_, *backward_, plan, d, options, &backward_ws_));
    RA_RETURN_IF_ERROR(io.CopyBack(&timings));
    return timings;
  }

  absl::StatusOr<RingTimings> Forward(const ShardPlan& plan, const RingShardTensors& t,
                                      const RingAttentionOptions& options) override {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    const ShardBytes b = ShardBytes::Of(t, plan.shards[comm_->rank()].rows, t.dtype);
    CallStaging io(device_);
    RingShardTensors d = t;  // same sizes and dtype, device pointers
    RA_ASSIGN_OR_RETURN(d.q, io.In(t.q, b.q, q_));
    RA_ASSIGN_OR_RETURN(d.k, io.In(t.k, b.kv, k_));
    RA_ASSIGN_OR_RETURN(d.v, io.In(t.v, b.kv, v_));
    RA_ASSIGN_OR_RETURN(d.out, io.Out(t.out, b.q, out_));
    RA_ASSIGN_OR_RETURN(void* lse, io.Out(t.lse, b.lse, lse_));  // null unless wanted
    d.lse = static_cast<float*>(lse);
    RA_ASSIGN_OR_RETURN(RingTimings timings,
                        RingFlashAttnForwardDevice(*comm_, *backend_, plan, d, options, &ws_));
    RA_RETURN_IF_ERROR(io.CopyBack(&timings));
    return timings;
  }

 private:
  const int device_;
  AttentionBackend* const backend_;
  AttentionBackend* const backward_;
  std::unique_ptr<NcclCommunicator> comm_;
  DeviceRingWorkspace ws_;
  DeviceRingWorkspace backward_ws_;
  // Shard buffers kept between calls; q, k, v, out and lse serve the forward and the backward
  // (one call at a time per connection).
  DeviceBuffer q_, k_, v_, out_, lse_, dout_, dq_, dk_, dv_;
};

class DeviceRingEngine final : public RingEngine {
 public:
  DeviceRingEngine(int device, std::string device_name, std::unique_ptr<AttentionBackend> backend,
                   std::unique_ptr<AttentionBackend> backward)
      : device_(device),
        device_name_(std::move(device_name)),
        backend_(std::move(backend)),
        backward_(std::move(backward)) {}

  std::string backend_name() const override { return std::string(backend_->name()); }
  std::string device_name() const override { return device_name_; }
  std::string transport() const override { return "nccl"; }

  std::optional<DeviceMemory> DeviceMemoryNow() const override {
    size_t free = 0, total = 0;
    if (cudaSetDevice(device_) != cudaSuccess || cudaMemGetInfo(&free, &total) != cudaSuccess) {
      cudaGetLastError();  // a reading missed, not an error of the next CUDA call
      return std::nullopt;
    }
    return DeviceMemory{static_cast<int64_t>(total - free), static_cast<int64_t>(total)};
  }

  absl::StatusOr<std::shared_ptr<char>> AllocateHost(size_t bytes) override {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    void* p = nullptr;
    RA_CUDA_RETURN_IF_ERROR(cudaMallocHost(&p, bytes > 0 ? bytes : 1));
    return std::shared_ptr<char>(static_cast<char*>(p), [](char* q) { cudaFreeHost(q); });
  }

  absl::StatusOr<std::shared_ptr<char>> AllocateShard(size_t bytes) override {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    void* p = nullptr;
    RA_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes > 0 ? bytes : 1));
    return std::shared_ptr<char>(static_cast<char*>(p), [](char* q) { cudaFree(q); });
  }

  absl::StatusOr<bool> PinHost(SharedMemoryMapping& mapping) override {
    std::lock_guard<std::mutex> lock(pin_mu_);  // two calls must not register one mapping twice
    if (mapping.attachment() != nullptr) return true;
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    void* base = mapping.map_base();
    if (cudaHostRegister(base, mapping.map_bytes(), cudaHostRegisterDefault) != cudaSuccess) {
      cudaGetLastError();  // not registrable here: the caller stages through AllocateHost
      return false;
    }
    mapping.set_attachment(std::shared_ptr<void>(base, [](void* p) { cudaHostUnregister(p); }));
    return true;
  }

  absl::Status CopyShard(const std::vector<CopySpan>& spans, absl::string_view what) override {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    // 2-D copies take pitches below 2^31 (cudaDevAttrMaxPitch); others go piece by piece.
    constexpr size_t kMaxPitch = (size_t{1} << 31) - 1;
    for (const PitchedRun& r : PitchedRuns(spans)) {
      if (r.bytes == 0) continue;
      if (r.count > 1 && r.dst_pitch <= kMaxPitch && r.src_pitch <= kMaxPitch) {
        const CopySpan& c = spans[r.first];
        RA_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(c.dst, r.dst_pitch, c.src, r.src_pitch,
                                                  r.bytes, r.count, cudaMemcpyDefault,
                                                  cudaStreamPerThread));
        continue;
      }
      for (size_t i = r.first; i < r.first + r.count; ++i) {
        RA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(spans[i].dst, spans[i].src, spans[i].bytes,
                                                cudaMemcpyDefault, cudaStreamPerThread));
      }
    }
    const cudaError_t e = cudaStreamSynchronize(cudaStreamPerThread);
    if (e != cudaSuccess) {
      return absl::InternalError(
          absl::StrCat(what, ": copy failed: ", cudaGetErrorString(e)));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::shared_ptr<char>> OpenCudaShared(const std::string& handle,
                                                       int64_t bytes) override {
    std::lock_guard<std::mutex> lock(ipc_mu_);
    auto it = ipc_.find(handle);
    if (it == ipc_.end()) {
      RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
      cudaIpcMemHandle_t h;
      if (handle.size() != sizeof(h)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "CUDA IPC handle has ", handle.size(), " bytes, expected ", sizeof(h)));
      }
      std::memcpy(&h, handle.data(), sizeof(h));
      void* p = nullptr;
      const cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
      if (e != cudaSuccess) {
        cudaGetLastError();
        return absl::InvalidArgumentError(absl::StrCat(
            "the CUDA IPC handle does not open on this worker's GPU: ", cudaGetErrorString(e)));
      }
      std::shared_ptr<char> opened(static_cast<char*>(p),
                                   [](char* q) { cudaIpcCloseMemHandle(q); });
      RA_ASSIGN_OR_RETURN(const size_t size, AllocationBytes(p));
      if (ipc_.size() >= kMaxOpenHandles) ipc_.erase(ipc_.begin());  // closed when unheld
      it = ipc_.emplace(handle, OpenedIpc{std::move(opened), size}).first;
    }
    if (bytes < 0 || static_cast<size_t>(bytes) > it->second.size) {
      return absl::InvalidArgumentError(
          absl::StrCat("the CUDA shared-memory region's tensors reach byte ", bytes,
                       " of an allocation of ", it->second.size));
    }
    return it->second.base;
  }

  absl::StatusOr<std::unique_ptr<RingConnection>> Connect(
      int rank, int world, std::shared_ptr<CoordinatorStore> store,
      std::chrono::milliseconds timeout) override {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    std::string id;
    if (rank == 0) {
      RA_ASSIGN_OR_RETURN(id, NcclCommunicator::GetUniqueId());
      RA_RETURN_IF_ERROR(store->Set(kNcclIdKey, std::vector<char>(id.begin(), id.end())));
    } else {
      RA_ASSIGN_OR_RETURN(std::vector<std::string> values, store->Get({kNcclIdKey}, timeout));
      id = std::move(values[0]);
    }
    RA_ASSIGN_OR_RETURN(std::unique_ptr<NcclCommunicator> comm,
                        NcclCommunicator::Create(rank, world, id, absl::FromChrono(timeout)));
    return std::unique_ptr<RingConnection>(std::make_unique<DeviceRingConnection>(
        device_, backend_.get(), backward_.get(), std::move(comm)));
  }

 private:
  static constexpr size_t kMaxOpenHandles = 64;
  struct OpenedIpc {
    std::shared_ptr<char> base;  // closes the handle when the last holder lets go
    size_t size = 0;             // of the allocation
  };

  const int device_;
  const std::string device_name_;
  std::unique_ptr<AttentionBackend> backend_;
  std::unique_ptr<AttentionBackend> backward_;  // null: the kernel has no backward
  std::mutex pin_mu_;
  std::mutex ipc_mu_;
  std::map<std::string, OpenedIpc> ipc_;  // by handle bytes; guarded by ipc_mu_
};

}  // namespace

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

absl::StatusOr<std::unique_ptr<RingEngine>> MakeDeviceRingEngine(
    std::unique_ptr<AttentionBackend> backend, const RingEngineOptions& options) {
  const int count = CudaDeviceCount();
  if (count == 0) {
    return absl::UnavailableError(
        absl::StrCat("kernel '", options.kernel, "' needs a GPU and this machine has none"));
  }
  const int device = ((options.device % count) + count) % count;
  RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  cudaDeviceProp prop;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  // The backward ring gets an instance of its own; none where the kernel has no backward
  // (cuda_reference: Backward then says so).
  std::unique_ptr<AttentionBackend> backward;
  if (backend->capabilities().backward) {
    RA_ASSIGN_OR_RETURN(backward, MakeBackend(backend->name()));
  }
#if RINGATTN_HAVE_CUDNN
  // cuDNN compiles a kernel per class of graph; compiled now, a request's first length costs a
  // graph build on the compiled kernel instead (docs/cudnn.md). A failure costs only speed.
  // Background builds (on unless RINGATTN_CUDNN_BACKGROUND=0): a new length's first calls run
  // our kernel while its graph builds, instead of waiting 44-70 ms for it (docs/cudnn.md).
  if (CudnnBackend* cudnn = AsCudnnBackend(backend.get()); cudnn != nullptr) {
    const char* bg_env = std::getenv(kCudnnBackgroundEnv);
    const bool background = bg_env == nullptr || std::string_view(bg_env) != "0";
    cudnn->set_background_builds(background);
    if (CudnnBackend* b = AsCudnnBackend(backward.get()); b != nullptr) {
      b->set_background_builds(background);
    }
    const absl::Time t0 = absl::Now();
    absl::Status s = cudnn->Prewarm({});
    if (CudnnBackend* b = AsCudnnBackend(backward.get()); s.ok() && b != nullptr) {
      s = b->Prewarm({.forward = false, .backward = true});
    }
    Log(s.ok() ? LogLevel::kInfo : LogLevel::kWarning, "worker", "cudnn prewarm",
        {{"ms", absl::ToDoubleMilliseconds(absl::Now() - t0)},
         {"status", s.ok() ? std::string("ok") : s.ToString()},
         {"background_builds", background}});
  }
#endif
  return std::unique_ptr<RingEngine>(std::make_unique<DeviceRingEngine>(
      device, prop.name, std::move(backend), std::move(backward)));
}

}  // namespace ringattn
