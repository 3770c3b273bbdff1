// Transports whose ranks are threads of one process: the ring's test and benchmark transports.
// InProcessGroup carries host memory (a Communicator: Start, then Wait). InProcessDeviceGroup
// (CUDA builds) carries device memory of one GPU shared by every rank, each rank with its own
// streams (a DeviceCommunicator: Enqueue on a stream), for rings of several ranks on one card,
// which NCCL refuses.
//
// Both are one mailbox that differs only in how a matched pair's bytes move. Transfers between
// one ordered pair of ranks (src, dst) match first-in first-out; whichever side posts second
// moves the bytes straight from the sender's buffer into the receiver's, nothing buffered in
// between: a memcpy on the host (outside the group's lock, so every rank's copies run in
// parallel), or on the device a cudaMemcpyAsync on the RECEIVER's stream, after the point
// where the sender's stream had its data ready, with the sender's stream made to wait for the
// copy before its Enqueue returns. So Enqueue returns once every transfer of the batch is
// matched and ordered on the streams: work enqueued before it on a rank's stream happens
// before the transfers read or write, work enqueued after sees their result, and no host
// thread waits for the GPU.
//
// The group fails as a whole: an abort, a timeout or a byte-count mismatch on any rank fails
// every rank's pending and later calls with the same status, so one failing rank never leaves
// the others waiting. After an abort no copy starts any more; host copies under way finish
// before their owners' Wait returns, device copies already enqueued are finite, so every rank's
// streams drain.
//
// Device groups: every rank's streams belong to the GPU current on the threads that call
// Enqueue.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ring/transport/communicator.h"
#include "ringattn_config.h"

namespace ringattn {

class DeviceCommunicator;  // device_communicator.h

namespace inprocess_internal {
template <typename Comm>
class Mailbox;
}  // namespace inprocess_internal

// A group of ranks whose communicators are of type Comm: Communicator (InProcessGroup) or
// DeviceCommunicator (InProcessDeviceGroup).
template <typename Comm>
class BasicInProcessGroup {
 public:
  // A group of `world_size` ranks (>= 1). A batch whose transfers are not all matched within
  // `timeout` (> 0) of its Wait (host) or Enqueue (device) fails with DeadlineExceeded, which
  // also aborts the group.
  static absl::StatusOr<std::shared_ptr<BasicInProcessGroup>> Create(
      int world_size, std::chrono::milliseconds timeout);

  // A new group and all of its communicators, rank r at index r.
  static absl::StatusOr<std::vector<std::unique_ptr<Comm>>> CreateCommunicators(
      int world_size, std::chrono::milliseconds timeout);

  // The communicator of `rank`; each rank can be taken once (FailedPrecondition otherwise).
  // The communicator keeps the group's state alive. Its methods are meant for one thread, the
  // rank's own, except Abort and a device communicator's CheckHealth, which any thread may call.
  // Destroying it with a batch in flight aborts the group.
  absl::StatusOr<std::unique_ptr<Comm>> MakeCommunicator(int rank);

  // Aborts every rank, as Abort on any communicator of the group does.
  void Abort(const absl::Status& reason);
  // The abort reason, or OK.
  absl::Status status() const;

  int world_size() const;
  std::chrono::milliseconds timeout() const;

  ~BasicInProcessGroup();
  BasicInProcessGroup(const BasicInProcessGroup&) = delete;
  BasicInProcessGroup& operator=(const BasicInProcessGroup&) = delete;

 private:
  explicit BasicInProcessGroup(std::shared_ptr<inprocess_internal::Mailbox<Comm>> mailbox);

  // Shared with the communicators.
  const std::shared_ptr<inprocess_internal::Mailbox<Comm>> mailbox_;
};

using InProcessGroup = BasicInProcessGroup<Communicator>;
extern template class BasicInProcessGroup<Communicator>;

#if RINGATTN_HAVE_CUDA
using InProcessDeviceGroup = BasicInProcessGroup<DeviceCommunicator>;
extern template class BasicInProcessGroup<DeviceCommunicator>;
#endif

}  // namespace ringattn
