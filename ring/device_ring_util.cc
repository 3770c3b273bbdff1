#include "ring/device_ring_util.h"

#include <chrono>
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"

namespace ringattn::device_ring_internal {
namespace {

using Clock = std::chrono::steady_clock;

// Polls until `stream` has no pending work or `timeout` passes, ignoring errors (the caller is
// failing already and only needs its buffers idle). False on timeout.
bool DrainStream(cudaStream_t stream, absl::Duration timeout) {
  if (stream == nullptr) return true;
  const Clock::time_point start = Clock::now();
  const Clock::time_point deadline = start + absl::ToChronoNanoseconds(timeout);
  for (;;) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e != cudaErrorNotReady) return true;  // done, or failed for good (sticky error)
    (void)cudaGetLastError();  // NotReady is not an error; see DeviceCommunicator::WaitStream
    const Clock::time_point now = Clock::now();
    if (now >= deadline) return false;
    device_comm_internal::PollPause(absl::FromChrono(now - start));
  }
}

}  // namespace

void ReportIfError(const char* owner, cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  std::fprintf(stderr, "%s: %s failed: %s (%s)\n", owner, what, cudaGetErrorName(e),
               cudaGetErrorString(e));
}

absl::Status CreateRingStreams(cudaStream_t* compute, cudaStream_t* comm) {
  int least = 0, greatest = 0;
  RA_CUDA_RETURN_IF_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  RA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(compute, cudaStreamNonBlocking, least));
  RA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(comm, cudaStreamNonBlocking, greatest));
  return absl::OkStatus();
}

absl::Status GrowFloats(float** buffer, size_t* capacity, size_t elems) {
  if (elems <= *capacity) return absl::OkStatus();
  if (*buffer != nullptr) RA_CUDA_RETURN_IF_ERROR(cudaFree(*buffer));
  *buffer = nullptr;
  *capacity = 0;
  RA_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(buffer), elems * sizeof(float)));
  *capacity = elems;
  return absl::OkStatus();
}

absl::Status GrowEvents(std::vector<cudaEvent_t>* events, size_t count) {
  while (events->size() < count) {
    cudaEvent_t e = nullptr;
    RA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDefault));
    events->push_back(e);
  }
  return absl::OkStatus();
}

absl::Status EnsureEvent(cudaEvent_t* event) {
  if (*event == nullptr) RA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(event, cudaEventDefault));
  return absl::OkStatus();
}

absl::StatusOr<double> ElapsedSeconds(cudaEvent_t from, cudaEvent_t to) {
  float ms = 0.0f;
  RA_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, from, to));
  return static_cast<double>(ms) * 1e-3;
}

absl::StatusOr<const float*> UploadAlibiSlopes(const std::vector<float>& slopes, float** device,
                                               size_t* capacity, std::vector<float>* host,
                                               cudaStream_t stream) {
  if (slopes.empty()) return static_cast<const float*>(nullptr);
  if (slopes == *host) return static_cast<const float*>(*device);
  host->clear();  // until the upload below is enqueued
  RA_RETURN_IF_ERROR(GrowFloats(device, capacity, slopes.size()));
  // From pageable memory: the runtime stages the bytes before returning, so `slopes` may change
  // afterwards; the copy lands in stream order before the kernels that read it.
  RA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(*device, slopes.data(), slopes.size() * sizeof(float),
                                          cudaMemcpyHostToDevice, stream));
  *host = slopes;
  return static_cast<const float*>(*device);
}

absl::Status AbortAndDrain(DeviceCommunicator& comm, const absl::Status& failure,
                           cudaStream_t compute, cudaStream_t transfer) {
  const std::string message = absl::StrCat("rank ", comm.rank(), ": ", failure.message());
  comm.Abort(absl::Status(failure.code(), message));
  const bool drained =
      DrainStream(compute, comm.timeout()) && DrainStream(transfer, comm.timeout());
  if (!drained) {
    return absl::Status(
        failure.code(),
        absl::StrCat(message, " [and the ring's streams did not drain within ",
                     absl::FormatDuration(comm.timeout()),
                     ": its buffers and the caller's tensors may still be in use]"));
  }
  return failure;  // as the host driver: the reason as it came, the abort carries the rank
}

DeviceAllocation::~DeviceAllocation() {
  if (ptr_ != nullptr) ReportIfError("DeviceAllocation", cudaFree(ptr_), "cudaFree");
}

absl::Status DeviceAllocation::Allocate(size_t bytes) {
  if (ptr_ != nullptr) return absl::FailedPreconditionError("DeviceAllocation: allocated twice");
  if (bytes == 0) return absl::OkStatus();
  RA_CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr_, bytes));
  bytes_ = bytes;
  return absl::OkStatus();
}

}  // namespace ringattn::device_ring_internal
