// One device allocation that grows: RAII over cudaMalloc / cudaFree for buffers kept between
// calls (the ring's workspace) or sized once. Reserve(bytes) makes it hold at least `bytes`;
// growing frees the old block first and keeps no contents, so the buffer must be idle (no work
// queued that reads or writes it). Every CUDA failure is a status; the destructor, which cannot
// return one, logs a failed cudaFree (base/log.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "absl/status/status.h"
#include "base/cuda_check.h"
#include "base/log.h"
#include "base/status_macros.h"

namespace ringattn {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() {
    const absl::Status s = Free();
    if (!s.ok()) LogError("DeviceBuffer", s.ToString());
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    std::swap(ptr_, other.ptr_);
    std::swap(bytes_, other.bytes_);
    return *this;
  }

  // Holds at least `bytes` afterwards, on the device current at the first allocation: a larger
  // request frees the old block and allocates exactly `bytes` (cudaMalloc: 256-byte aligned);
  // a smaller one changes nothing. Zero bytes allocate nothing (get() stays null).
  absl::Status Reserve(size_t bytes) {
    if (bytes <= bytes_) return absl::OkStatus();
    RA_RETURN_IF_ERROR(Free());
    void* p = nullptr;
    RA_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
    ptr_ = p;
    bytes_ = bytes;
    return absl::OkStatus();
  }

  // Frees the block now (with the device that owns it current); empty afterwards either way.
  absl::Status Free() {
    void* p = std::exchange(ptr_, nullptr);
    bytes_ = 0;
    if (p != nullptr) RA_CUDA_RETURN_IF_ERROR(cudaFree(p));
    return absl::OkStatus();
  }

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }  // held (the largest Reserve so far)

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace ringattn
