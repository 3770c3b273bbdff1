#include "worker/device_ring_engine.h"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/status_macros.h"
#include "worker/ring/device_ring.h"
#include "worker/ring/nccl_communicator.h"
#if defined(RINGATTN_HAVE_CUDNN)
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

class DeviceRingConnection final : public RingConnection {
 public:
  DeviceRingConnection(int device, AttentionBackend* backend,
                       std::unique_ptr<NcclCommunicator> comm)
      : device_(device), backend_(backend), comm_(std::move(comm)) {}

  int rank() const override { return comm_->rank(); }
  int world_size() const override { return comm_->world_size(); }
  void Abort(const absl::Status& reason) override { comm_->Abort(reason); }

  absl::StatusOr<RingTimings> Backward(const ShardPlan& /*plan*/,
                                       const RingBackwardTensors& /*t*/,
                                       const RingAttentionOptions& /*options*/) override {
    return absl::UnimplementedError(absl::StrCat(
        "the backward runs on CPU workers only for now (kernel ", std::string(backend_->name()),
        ")"));
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
    if (q_bytes > 0) RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(q, t.q, q_bytes, cudaMemcpyHostToDevice));
    if (kv_bytes > 0) {
      RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(k, t.k, kv_bytes, cudaMemcpyHostToDevice));
      RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(v, t.v, kv_bytes, cudaMemcpyHostToDevice));
    }
    RA_ASSIGN_OR_RETURN(RingTimings timings,
                        RingFlashAttnForwardDevice(*comm_, *backend_, plan, d, options, &ws_));
    if (q_bytes > 0) {
      RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(t.out, out, q_bytes, cudaMemcpyDeviceToHost));
    }
    if (t.lse != nullptr && lse_bytes > 0) {
      RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(t.lse, d.lse, lse_bytes, cudaMemcpyDeviceToHost));
    }
    return timings;
  }

 private:
  const int device_;
  AttentionBackend* const backend_;
  std::unique_ptr<NcclCommunicator> comm_;
  DeviceRingWorkspace ws_;
  DeviceBuffer q_, k_, v_, out_, lse_;
};

class DeviceRingEngine final : public RingEngine {
 public:
  DeviceRingEngine(int device, std::string device_name, std::unique_ptr<AttentionBackend> backend)
      : device_(device), device_name_(std::move(device_name)), backend_(std::move(backend)) {}

  std::string backend_name() const override { return std::string(backend_->name()); }
  std::string device_name() const override { return device_name_; }
  std::string transport() const override { return "nccl"; }

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
    return std::unique_ptr<RingConnection>(
        std::make_unique<DeviceRingConnection>(device_, backend_.get(), std::move(comm)));
  }

 private:
  const int device_;
  const std::string device_name_;
  std::unique_ptr<AttentionBackend> backend_;
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

absl::StatusOr<std::unique_ptr<RingEngine>> MakeDeviceRingEngine(const RingEngineOptions& options) {
  const int count = CudaDeviceCount();
  if (count == 0) {
    return absl::UnavailableError(
        absl::StrCat("kernel '", options.kernel, "' needs a GPU and this machine has none"));
  }
  const int device = ((options.device % count) + count) % count;
  RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  cudaDeviceProp prop;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  std::unique_ptr<AttentionBackend> backend;
  if (options.kernel == "cudnn") {
#if defined(RINGATTN_HAVE_CUDNN)
    backend = MakeCudnnBackend();
#else
    return absl::UnavailableError("this build has no cuDNN backend");
#endif
  } else {
    RA_ASSIGN_OR_RETURN(backend, MakeCudaBackend(options.kernel));
  }
  return std::unique_ptr<RingEngine>(
      std::make_unique<DeviceRingEngine>(device, prop.name, std::move(backend)));
}

}  // namespace ringattn
