#include "worker/device_ring_engine.h"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/backend_registry.h"
#include "ring/device_ring.h"
#include "ring/transport/nccl_communicator.h"

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

  static ShardBytes Of(int batch, int64_t rows, int heads, int heads_k, int head_dim, DType dtype,
                       DType grad_dtype) {
    const size_t q_elems = static_cast<size_t>(batch) * rows * heads * head_dim;
    const size_t kv_elems = static_cast<size_t>(batch) * rows * heads_k * head_dim;
    ShardBytes b;
    b.q = q_elems * DTypeSize(dtype);
    b.kv = kv_elems * DTypeSize(dtype);
    b.lse = static_cast<size_t>(batch) * heads * rows * sizeof(float);
    b.dq = q_elems * DTypeSize(grad_dtype);
    b.dkv = kv_elems * DTypeSize(grad_dtype);
    return b;
  }
};

// Synchronous copies (the host tensors are pageable gRPC buffers; the drivers require their
// inputs ready on the device when called). Zero bytes copy nothing.
double SecondsSince(absl::Time t0) { return absl::ToDoubleSeconds(absl::Now() - t0); }

absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  return absl::OkStatus();
}
absl::Status CopyToHost(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  return absl::OkStatus();
}

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
    const ShardBytes b = ShardBytes::Of(t.batch, plan.shards[comm_->rank()].rows, t.heads,
                                        t.heads_k, t.head_dim, t.dtype, t.grad_dtype);
    RingBackwardTensors d = t;  // same sizes and dtypes, device pointers
    RA_ASSIGN_OR_RETURN(void* q, q_.Reserve(b.q));
    RA_ASSIGN_OR_RETURN(void* k, k_.Reserve(b.kv));
    RA_ASSIGN_OR_RETURN(void* v, v_.Reserve(b.kv));
    RA_ASSIGN_OR_RETURN(void* out, out_.Reserve(b.q));
    RA_ASSIGN_OR_RETURN(void* dout, dout_.Reserve(b.q));
    RA_ASSIGN_OR_RETURN(void* lse, lse_.Reserve(b.lse));
    RA_ASSIGN_OR_RETURN(void* dq, dq_.Reserve(b.dq));
    RA_ASSIGN_OR_RETURN(void* dk, dk_.Reserve(b.dkv));
    RA_ASSIGN_OR_RETURN(void* dv, dv_.Reserve(b.dkv));
    d.q = q;
    d.k = k;
    d.v = v;
    d.out = out;
    d.dout = dout;
    d.lse = static_cast<const float*>(lse);
    d.dq = dq;
    d.dk = dk;
    d.dv = dv;
    const absl::Time h2d0 = absl::Now();
    RA_RETURN_IF_ERROR(CopyToDevice(q, t.q, b.q));
    RA_RETURN_IF_ERROR(CopyToDevice(k, t.k, b.kv));
    RA_RETURN_IF_ERROR(CopyToDevice(v, t.v, b.kv));
    RA_RETURN_IF_ERROR(CopyToDevice(out, t.out, b.q));
    RA_RETURN_IF_ERROR(CopyToDevice(dout, t.dout, b.q));
    RA_RETURN_IF_ERROR(CopyToDevice(lse, t.lse, b.lse));
    const double h2d_seconds = SecondsSince(h2d0);
    RA_ASSIGN_OR_RETURN(
        RingTimings timings,
        RingFlashAttnBackwardDevice(*comm_, *backward_, plan, d, options, &backward_ws_));
    const absl::Time d2h0 = absl::Now();
    RA_RETURN_IF_ERROR(CopyToHost(t.dq, dq, b.dq));
    RA_RETURN_IF_ERROR(CopyToHost(t.dk, dk, b.dkv));
    RA_RETURN_IF_ERROR(CopyToHost(t.dv, dv, b.dkv));
    timings.host_to_device_seconds = h2d_seconds;
    timings.device_to_host_seconds = SecondsSince(d2h0);
    return timings;
  }

  absl::StatusOr<RingTimings> Forward(const ShardPlan& plan, const RingShardTensors& t,
                                      const RingAttentionOptions& options) override {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    const int64_t rows = plan.shards[comm_->rank()].rows;
    const size_t es = DTypeSize(t.dtype);
    const size_t q_bytes = static_cast<size_t>(t.batch) * rows * t.heads * t.head_dim * es;
    const size_t kv_bytes = static_cast<size_t>(t.batch) * rows * t.heads_k * t.head_dim * es;
    const size_t lse_bytes = static_cast<size_t>(t.batch) * t.heads * rows * sizeof(float);
    RingShardTensors d = t;  // same sizes and dtype, device pointers
    RA_ASSIGN_OR_RETURN(void* q, q_.Reserve(q_bytes));
    RA_ASSIGN_OR_RETURN(void* k, k_.Reserve(kv_bytes));
    RA_ASSIGN_OR_RETURN(void* v, v_.Reserve(kv_bytes));
    RA_ASSIGN_OR_RETURN(void* out, out_.Reserve(q_bytes));
    d.q = q;
    d.k = k;
    d.v = v;
    d.out = out;
    d.lse = nullptr;
    if (t.lse != nullptr) {
      RA_ASSIGN_OR_RETURN(void* lse, lse_.Reserve(lse_bytes));
      d.lse = static_cast<float*>(lse);
    }
    // Synchronous copies: the driver requires q/k/v ready on the device when it is called.
    const absl::Time h2d0 = absl::Now();
    if (q_bytes > 0) RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(q, t.q, q_bytes, cudaMemcpyHostToDevice));
    if (kv_bytes > 0) {
      RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(k, t.k, kv_bytes, cudaMemcpyHostToDevice));
      RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(v, t.v, kv_bytes, cudaMemcpyHostToDevice));
    }
    const double h2d_seconds = SecondsSince(h2d0);
    RA_ASSIGN_OR_RETURN(RingTimings timings,
                        RingFlashAttnForwardDevice(*comm_, *backend_, plan, d, options, &ws_));
    const absl::Time d2h0 = absl::Now();
    if (q_bytes > 0) {
      RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(t.out, out, q_bytes, cudaMemcpyDeviceToHost));
    }
    if (t.lse != nullptr && lse_bytes > 0) {
      RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(t.lse, d.lse, lse_bytes, cudaMemcpyDeviceToHost));
    }
    timings.host_to_device_seconds = h2d_seconds;
    timings.device_to_host_seconds = SecondsSince(d2h0);
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

  absl::StatusOr<std::shared_ptr<char>> AllocateHost(size_t bytes) override {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    void* p = nullptr;
    RA_CUDA_RETURN_IF_ERROR(cudaMallocHost(&p, bytes > 0 ? bytes : 1));
    return std::shared_ptr<char>(static_cast<char*>(p), [](char* q) { cudaFreeHost(q); });
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
  const int device_;
  const std::string device_name_;
  std::unique_ptr<AttentionBackend> backend_;
  std::unique_ptr<AttentionBackend> backward_;  // null: the kernel has no backward
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
  return std::unique_ptr<RingEngine>(std::make_unique<DeviceRingEngine>(
      device, prop.name, std::move(backend), std::move(backward)));
}

}  // namespace ringattn
