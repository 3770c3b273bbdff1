// The ring's transport interface on GPUs: batched point-to-point transfers between the ranks of
// a fixed group, ordered on a CUDA stream rather than waited for on the host. Implementations:
// NCCL (nccl_communicator.h: one process per GPU, across hosts) and in-process
// (inprocess.h: ranks as threads sharing one GPU; tests and benchmarks).
//
// The host interface (communicator.h) is Start + Wait on the host; here the host only enqueues,
// and the stream carries the dependency: work enqueued on the stream before Enqueue happens
// before the transfers read or write, and work enqueued after them sees their result. The host
// waits only where it must (the end of a ring call), through WaitStream, which is a watchdog:
// it polls, never blocks forever, and aborts the group on an error or the deadline.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "ring/transport/communicator.h"  // GroupRank, SendOp, RecvOp

namespace ringattn {

// rank(), world_size() and Abort: GroupRank (communicator.h). Abort releases peers where the
// transport can (in-process: every rank; NCCL: ncclCommAbort, which frees this process's
// kernels; remote ranks learn of it from their own watchdog or the coordinator).
class DeviceCommunicator : public GroupRank {
 public:
  // How long one transfer or one WaitStream may take before the group is declared stuck.
  virtual absl::Duration timeout() const = 0;

  // Enqueues a batch of sends and receives of device memory on `stream`: the transfers start
  // after the work already enqueued on `stream`, and work enqueued on `stream` afterwards sees
  // the received bytes and may overwrite the send buffers. Transfers between one pair of ranks
  // match in the order they were posted; a receive's byte count must equal its matching send's
  // (the in-process transport checks, NCCL cannot). Zero-byte operations move nothing; both
  // sides must agree on every size, which the ring does because every rank knows every shard.
  // A send to or a receive from this rank itself is allowed. Whether the host call returns at
  // once (NCCL) or once the peers have posted their side (in-process) is the transport's
  // business; either way it returns within timeout(), and a failure aborts the group.
  virtual absl::Status Enqueue(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs,
                               cudaStream_t stream) = 0;

  // Non-blocking health check: the abort reason once aborted, else an asynchronous transport
  // error (which aborts the group), else OK.
  virtual absl::Status CheckHealth() = 0;

  // The watchdog wait (nccl-tests testStreamSynchronize, PyTorch WorkNCCL::checkTimeout): polls
  // cudaStreamQuery(stream) and CheckHealth() until the stream is done, a CUDA or transport
  // error, or `timeout` passes; the last two abort the group and return the error
  // (DeadlineExceeded for the timeout). Never hangs, unlike cudaStreamSynchronize on a stream
  // whose transfer waits for a dead peer.
  absl::Status WaitStream(cudaStream_t stream, absl::Duration timeout);
};

namespace device_comm_internal {

// One pause of a polling loop that has been polling for `elapsed`: a yield for the first 10 ms,
// then 50 us sleeps. A ring call waits once, for milliseconds to seconds of kernels; spinning
// first keeps the wake-up latency of short calls at the scheduler's (a 50 us sleep would add up
// to 5% to a 1 ms one-rank call, whose target is 3%), sleeping later bounds the CPU a waiting
// rank burns to what a 50 us tick costs, at most 0.5% of any wait past 10 ms.
void PollPause(absl::Duration elapsed);

}  // namespace device_comm_internal
}  // namespace ringattn
