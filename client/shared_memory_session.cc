#include "client/shared_memory_session.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "client/shared_memory_placement.h"
#include "ringattn_config.h"
#if RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "base/cuda_check.h"
#endif

namespace ringattn {
namespace {

constexpr absl::Duration kCloseTimeoutOnDestruction = absl::Seconds(5);

// A POSIX shared-memory object this process created.
class SystemMemory final : public SessionMemory {
 public:
  explicit SystemMemory(std::unique_ptr<SharedMemoryRegion> region) : region_(std::move(region)) {}
  absl::Span<char> bytes() override {
    return absl::Span<char>(region_->data(), static_cast<size_t>(region_->size()));
  }
  const RegionCopier& copier() const override { return copier_; }
  std::string Describe() const override { return region_->key(); }
  absl::Status Register(AttentionClient& client, const std::string& name,
                        absl::Duration timeout) override {
    return client.RegisterSystemSharedMemory(name, region_->key(), 0, region_->size(), timeout);
  }
  absl::Status Unregister(AttentionClient& client, const std::string& name,
                          absl::Duration timeout) override {
    return client.UnregisterSystemSharedMemory(name, timeout);
  }

 private:
  std::unique_ptr<SharedMemoryRegion> region_;
  const RegionCopier copier_;  // null: ParallelCopy
};

#if RINGATTN_HAVE_CUDA
// A GPU allocation of this process, exported by CUDA IPC.
class CudaMemory final : public SessionMemory {
 public:
  static absl::StatusOr<std::unique_ptr<CudaMemory>> Allocate(int64_t byte_size, int device) {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    void* p = nullptr;
    RA_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, static_cast<size_t>(byte_size)));
    std::unique_ptr<CudaMemory> m(new CudaMemory(static_cast<char*>(p), byte_size, device));
    RA_CUDA_RETURN_IF_ERROR(cudaIpcGetMemHandle(&m->handle_, p));
    return m;
  }
  ~CudaMemory() override {
    cudaSetDevice(device_);
    cudaFree(data_);
  }
  absl::Span<char> bytes() override { return absl::Span<char>(data_, static_cast<size_t>(size_)); }
  const RegionCopier& copier() const override { return copier_; }
  std::string Describe() const override { return absl::StrCat("cuda:", device_); }
  absl::Status Register(AttentionClient& client, const std::string& name,
                        absl::Duration timeout) override {
    return client.RegisterCudaSharedMemory(
        name, std::string(reinterpret_cast<const char*>(&handle_), sizeof(handle_)), device_,
        size_, timeout);
  }
  absl::Status Unregister(AttentionClient& client, const std::string& name,
                          absl::Duration timeout) override {
    return client.UnregisterCudaSharedMemory(name, timeout);
  }

 private:
  CudaMemory(char* data, int64_t size, int device)
      : data_(data), size_(size), device_(device), copier_([device](
                                                         const std::vector<CopySpan>& copies,
                                                         absl::string_view what) -> absl::Status {
          RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
          for (const CopySpan& c : copies) {
            const cudaError_t e = cudaMemcpy(c.dst, c.src, c.bytes, cudaMemcpyDefault);
            if (e != cudaSuccess) {
              return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
            }
          }
          return absl::OkStatus();
        }) {}

  char* data_;
  int64_t size_;
  int device_;
  cudaIpcMemHandle_t handle_{};
  const RegionCopier copier_;
};
#endif

template <typename Request>
absl::StatusOr<std::unique_ptr<SharedMemorySession>> OpenSized(AttentionClient& client,
                                                               const Request& request,
                                                               absl::Duration timeout,
                                                               SharedMemorySession::Kind kind,
                                                               int device) {
  RA_ASSIGN_OR_RETURN(const SharedMemoryPlacement placement, SharedMemoryPlacement::Of(request));
  if (kind == SharedMemorySession::Kind::kCuda) {
    return SharedMemorySession::OpenCuda(client, placement.bytes(), device, timeout);
  }
  return SharedMemorySession::Open(client, placement.bytes(), timeout);
}

}  // namespace

SharedMemorySession::SharedMemorySession(AttentionClient& client,
                                         std::unique_ptr<SessionMemory> memory, std::string name)
    : client_(client), memory_(std::move(memory)), name_(std::move(name)) {}

absl::StatusOr<std::unique_ptr<SharedMemorySession>> SharedMemorySession::Registered(
    AttentionClient& client, std::unique_ptr<SessionMemory> memory, std::string name,
    absl::Duration timeout) {
  std::unique_ptr<SharedMemorySession> session(
      new SharedMemorySession(client, std::move(memory), std::move(name)));
  RA_RETURN_IF_ERROR(session->memory_->Register(client, session->name_, timeout));
  session->registered_ = true;
  return session;
}

absl::StatusOr<std::unique_ptr<SharedMemorySession>> SharedMemorySession::Open(
    AttentionClient& client, int64_t byte_size, absl::Duration timeout) {
  RA_ASSIGN_OR_RETURN(std::unique_ptr<SharedMemoryRegion> region,
                      SharedMemoryRegion::Create(MakeSharedMemoryKey(), byte_size));
  std::string name = region->key().substr(1);
  return Registered(client, std::make_unique<SystemMemory>(std::move(region)), std::move(name),
                    timeout);
}

absl::StatusOr<std::unique_ptr<SharedMemorySession>> SharedMemorySession::OpenCuda(
    AttentionClient& client, int64_t byte_size, int device, absl::Duration timeout) {
#if RINGATTN_HAVE_CUDA
  RA_ASSIGN_OR_RETURN(std::unique_ptr<CudaMemory> memory, CudaMemory::Allocate(byte_size, device));
  // A fresh name in the caller's name space, as a system region's (the key without its '/').
  std::string name = absl::StrCat("cuda", MakeSharedMemoryKey().substr(1));
  return Registered(client, std::move(memory), std::move(name), timeout);
#else
  (void)client;
  (void)byte_size;
  (void)device;
  (void)timeout;
  return absl::UnimplementedError("CUDA shared memory needs a build with CUDA");
#endif
}

absl::StatusOr<std::unique_ptr<SharedMemorySession>> SharedMemorySession::OpenFor(
    AttentionClient& client, const v1::AttendRequest& request, absl::Duration timeout, Kind kind,
    int device) {
  return OpenSized(client, request, timeout, kind, device);
}

absl::StatusOr<std::unique_ptr<SharedMemorySession>> SharedMemorySession::OpenFor(
    AttentionClient& client, const v1::AttendBackwardRequest& request, absl::Duration timeout,
    Kind kind, int device) {
  return OpenSized(client, request, timeout, kind, device);
}

SharedMemorySession::~SharedMemorySession() { Close(kCloseTimeoutOnDestruction).IgnoreError(); }

absl::Status SharedMemorySession::Close(absl::Duration timeout) {
  if (!registered_) return absl::OkStatus();
  registered_ = false;
  return memory_->Unregister(client_, name_, timeout);
}

template <typename Request>
absl::StatusOr<Request> SharedMemorySession::PlaceIn(const Request& request) {
  RA_ASSIGN_OR_RETURN(const SharedMemoryPlacement placement, SharedMemoryPlacement::Of(request));
  return placement.Place(request, name_, memory_->bytes(), memory_->copier());
}

absl::StatusOr<v1::AttendRequest> SharedMemorySession::PlaceResident(
    const v1::AttendRequest& request) {
  return PlaceIn(request);
}

absl::StatusOr<v1::AttendBackwardRequest> SharedMemorySession::PlaceResident(
    const v1::AttendBackwardRequest& request) {
  return PlaceIn(request);
}

template <typename Request, typename Call>
auto SharedMemorySession::CallThrough(const Request& request, SharedMemoryCopyTimes* copies,
                                      const Call& call) -> decltype(call(request)) {
  const absl::Time t0 = absl::Now();
  RA_ASSIGN_OR_RETURN(const SharedMemoryPlacement placement, SharedMemoryPlacement::Of(request));
  const absl::Span<char> bytes = memory_->bytes();
  RA_ASSIGN_OR_RETURN(const Request sent,
                      placement.Place(request, name_, bytes, memory_->copier()));
  const absl::Time t1 = absl::Now();
  auto response = call(sent);
  if (!response.ok()) return response;
  const absl::Time t2 = absl::Now();
  RA_RETURN_IF_ERROR(placement.Collect(bytes, &*response, memory_->copier()));
  if (copies != nullptr) {
    copies->in_seconds = absl::ToDoubleSeconds(t1 - t0);
    copies->out_seconds = absl::ToDoubleSeconds(absl::Now() - t2);
  }
  return response;
}

absl::StatusOr<v1::AttendResponse> SharedMemorySession::Attend(const v1::AttendRequest& request,
                                                               absl::Duration timeout,
                                                               SharedMemoryCopyTimes* copies) {
  return CallThrough(request, copies,
                     [&](const v1::AttendRequest& sent) { return client_.Attend(sent, timeout); });
}

absl::StatusOr<v1::AttendBackwardResponse> SharedMemorySession::AttendBackward(
    const v1::AttendBackwardRequest& request, absl::Duration timeout,
    SharedMemoryCopyTimes* copies) {
  return CallThrough(request, copies, [&](const v1::AttendBackwardRequest& sent) {
    return client_.AttendBackward(sent, timeout);
  });
}

}  // namespace ringattn
