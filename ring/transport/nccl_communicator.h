// The ring's GPU transport across processes and hosts: one NCCL communicator per rank, one
// process per GPU (the caller selects the device, e.g. cudaSetDevice(local_rank), before
// Create; NCCL refuses two ranks on one GPU, for which see inprocess.h).
//
// RAII and fail-fast, after PyTorch's NCCLUtils / ProcessGroupNCCL:
//  - the communicator is non-blocking (ncclConfig_t::blocking = 0), so no NCCL call can hang
//    the host: every call that answers ncclInProgress is polled with ncclCommGetAsyncError
//    against the timeout, and the communicator is aborted when it runs out;
//  - the destructor finalizes and destroys a healthy communicator and aborts any other
//    (ncclCommDestroy can hang on a broken communicator; ncclCommAbort cannot);
//  - every failure carries the call, file, line, ncclGetErrorString and ncclGetLastError.
//
// NCCL_NVLS_ENABLE is left to the environment: NVLink SHARP (multicast) buffers are set up at
// init on NVSwitch hosts and are useless to point-to-point rings; operators set
// NCCL_NVLS_ENABLE=0 on multi-GPU hosts, where multicast objects can be scarce or refused.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "ring/transport/device_communicator.h"

namespace ringattn {

// The status of a failed NCCL call `expr` at file:line: ncclGetErrorString(result) and
// ncclGetLastError(comm) (comm may be null). ncclRemoteError and ncclSystemError (a peer or
// the network is gone) become UNAVAILABLE, ncclInvalidArgument and ncclInvalidUsage
// INVALID_ARGUMENT, the rest INTERNAL.
absl::Status NcclErrorStatus(ncclResult_t result, const char* expr, const char* file, int line,
                             ncclComm_t comm);

class NcclCommunicator final : public DeviceCommunicator {
 public:
  // A fresh unique id, NCCL_UNIQUE_ID_BYTES bytes, to hand to every rank's Create. Call it in
  // the process of rank 0: it starts NCCL's bootstrap root there, which must stay up until every
  // rank has joined. The coordinator only relays the bytes.
  static absl::StatusOr<std::string> GetUniqueId();

  // Joins the communicator `unique_id` as `rank` of `world` on the current CUDA device. Blocks
  // until every rank has joined, at most `timeout` (then DeadlineExceeded, the half-made
  // communicator aborted). `timeout` also bounds every later Enqueue and the destructor's
  // finalize; WaitStream takes its own.
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> Create(int rank, int world,
                                                                  std::string_view unique_id,
                                                                  absl::Duration timeout);

  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  absl::Duration timeout() const override { return timeout_; }

  // ncclGroupStart, one ncclSend / ncclRecv of bytes (ncclUint8) per operation with bytes > 0,
  // ncclGroupEnd, then polls until NCCL has put the operations on `stream`. Returns once they
  // are enqueued, not done. NCCL cannot check that a receive's size matches its send's; a
  // mismatch corrupts or hangs the transfer, which WaitStream then reports.
  absl::Status Enqueue(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs,
                       cudaStream_t stream) override;
  // ncclCommGetAsyncError; an error aborts the communicator.
  absl::Status CheckHealth() override;
  // ncclCommAbort (frees this rank's NCCL kernels and resources); later calls fail with
  // `reason`. Any thread.
  void Abort(const absl::Status& reason) override;

  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

 private:
  NcclCommunicator(int rank, int world, absl::Duration timeout, ncclComm_t comm);

  // Polls ncclCommGetAsyncError until the communicator leaves ncclInProgress; `what` names
  // the operation for errors. Releases mu_ between polls so that Abort can get in. On an error
  // or the deadline, aborts and returns it.
  absl::Status WaitWhileInProgress(std::unique_lock<std::mutex>& lock, const char* what);
  // ncclCommGetAsyncError on the live comm_: its state in *state; a failed query aborts.
  absl::Status QueryStateLocked(ncclResult_t* state);
  // Aborts with `error` and returns it.
  absl::Status FailLocked(const absl::Status& error);
  void AbortLocked(const absl::Status& reason);

  const int rank_;
  const int world_;
  const absl::Duration timeout_;

  // Every NCCL call on comm_ holds mu_: Abort may come from another thread, and
  // ncclCommAbort must not race a call on the same communicator.
  std::mutex mu_;
  ncclComm_t comm_ = nullptr;  // null once aborted
  absl::Status abort_status_;  // OK until aborted
};

}  // namespace ringattn
