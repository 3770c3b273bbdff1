// Plumbing the device ring drivers share (device_ring.h: forward, device_ring_backward.h:
// backward): the workspaces' streams, events and growing buffers, timing from events, the
// failure path (abort, then drain), and a scoped backend stream. Internal to the drivers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "ring/transport/device_communicator.h"

namespace ringattn::device_ring_internal {

// Prints "<owner>: <what> failed: <error>" on stderr unless e is cudaSuccess: for destructors,
// which cannot return a status.
void ReportIfError(const char* owner, cudaError_t e, const char* what);

// The compute and comm streams of a workspace, on the current device. Non-blocking: no
// implicit synchronisation with the legacy default stream, which other ranks' threads of the
// same process may use. The transfers get the higher priority: an NCCL kernel or copy queued
// behind a wave of attention blocks would delay the next step's input (a choice, not yet
// measured).
absl::Status CreateRingStreams(cudaStream_t* compute, cudaStream_t* comm);

// Grows a device buffer of floats to `elems` (contents not kept). The buffer must be idle:
// every driver call drains its workspace's streams before returning.
absl::Status GrowFloats(float** buffer, size_t* capacity, size_t elems);

// Appends timing-enabled events (the drivers read elapsed times between them) up to `count`.
absl::Status GrowEvents(std::vector<cudaEvent_t>* events, size_t count);

// Creates a timing-enabled event unless *event exists.
absl::Status EnsureEvent(cudaEvent_t* event);

// Seconds between two completed events (negative when `to` completed first).
absl::StatusOr<double> ElapsedSeconds(cudaEvent_t from, cudaEvent_t to);

// The device copy of the ALiBi slopes ([heads] fp32), uploaded on `stream` unless it holds
// `slopes` already; null for none. *host remembers what the device copy holds.
absl::StatusOr<const float*> UploadAlibiSlopes(const std::vector<float>& slopes, float** device,
                                               size_t* capacity, std::vector<float>* host,
                                               cudaStream_t stream);

// The failure path of a ring call that failed with `failure`: aborts the communicator (so that
// peers fail at once with the reason rather than wait for this rank's blocks until their
// timeout), then waits out the work already enqueued on the two streams (an aborted
// transport's work is finite), so that the caller may free its tensors and the workspace's
// buffers. Returns the status to report: `failure` as it came, or with a note when the streams
// did not drain within the communicator's timeout.
absl::Status AbortAndDrain(DeviceCommunicator& comm, const absl::Status& failure,
                           cudaStream_t compute, cudaStream_t transfer);

// Sets a backend's stream (CudaBackend or CudaBackwardBackend: SetStream and stream()) for a
// scope and restores the caller's on exit.
template <typename Backend>
class ScopedBackendStream {
 public:
  ScopedBackendStream(Backend* backend, cudaStream_t stream)
      : backend_(backend), saved_(backend->stream()) {
    backend_->SetStream(stream);
  }
  ~ScopedBackendStream() { backend_->SetStream(saved_); }
  ScopedBackendStream(const ScopedBackendStream&) = delete;
  ScopedBackendStream& operator=(const ScopedBackendStream&) = delete;

 private:
  Backend* const backend_;
  const cudaStream_t saved_;
};

// One device allocation of a fixed size, freed on destruction (errors reported on stderr);
// null for zero bytes.
class DeviceAllocation {
 public:
  DeviceAllocation() = default;
  ~DeviceAllocation();
  DeviceAllocation(const DeviceAllocation&) = delete;
  DeviceAllocation& operator=(const DeviceAllocation&) = delete;

  // Once per allocation.
  absl::Status Allocate(size_t bytes);
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace ringattn::device_ring_internal
