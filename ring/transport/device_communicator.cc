#include "ring/transport/device_communicator.h"

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"

namespace ringattn {
namespace device_comm_internal {

void PollPause(absl::Duration elapsed) {
  if (elapsed < absl::Milliseconds(10)) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

}  // namespace device_comm_internal

absl::Status DeviceCommunicator::WaitStream(cudaStream_t stream, absl::Duration timeout) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  const Clock::time_point deadline = start + absl::ToChronoNanoseconds(timeout);
  for (;;) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return CheckHealth();  // a peer may have failed meanwhile
    if (e != cudaErrorNotReady) {
      const absl::Status error = CudaErrorStatus(e, "cudaStreamQuery(stream)", __FILE__, __LINE__);
      Abort(error);
      return error;
    }
    // cudaErrorNotReady is not a failure, but the runtime may keep it as this thread's last
    // error, and the next launch check (cudaGetLastError) would report it; clear it, as
    // PyTorch's CUDAStream::query does.
    (void)cudaGetLastError();
    if (absl::Status health = CheckHealth(); !health.ok()) return health;
    const Clock::time_point now = Clock::now();
    if (now >= deadline) {
      const absl::Status timed_out = absl::DeadlineExceededError(absl::StrCat(
          "rank ", rank(), ": the stream's work did not finish within ",
          absl::FormatDuration(timeout),
          " (a transfer waiting for a peer that never posted, or a hung kernel); group aborted"));
      Abort(timed_out);
      return timed_out;
    }
    device_comm_internal::PollPause(absl::FromChrono(now - start));
  }
}

}  // namespace ringattn
