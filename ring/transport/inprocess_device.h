// A DeviceCommunicator whose ranks are threads of one process sharing one GPU, each rank with
// its own streams: the device ring's test and benchmark transport (NCCL refuses two ranks on
// one GPU). The device twin of inprocess_communicator.h, with the same matching design.
//
// Transfers between one ordered pair of ranks (src, dst) match first-in first-out. Enqueue
// records an event on the poster's stream (the point where its send data is ready and its
// receive buffers are free), posts its operations and blocks on the host until every one of
// them is matched. Whichever side posts second enqueues the copy of a matched pair, on the
// RECEIVER's stream:
//
//   cudaStreamWaitEvent(recv_stream, sender_post_event)   // the sender's data is ready
//   cudaMemcpyAsync(dst, src, bytes, D2D, recv_stream)    // after the receiver's own post
//   cudaEventRecord(send_done_event, recv_stream)         // an event of the sender's
//
// and once all of its operations are matched, the sender's own Enqueue makes its stream wait
// for its sends' done events, so work it enqueues afterwards cannot overwrite a buffer before
// the copy has read it; work the receiver enqueues afterwards sees the bytes. Nothing is
// buffered in between and no host thread waits for the GPU.
//
// Why the sender's waits come last, in its own thread: issued at match time instead, rank r's
// stream gets "wait for r+1's copy" before "copy from r-1" whenever r's send matched first; were
// that so on every rank of a ring, each copy would sit behind a wait for the next rank's copy,
// a cycle, and the GPU would hang. Only the order of the matches would then rule that out, an
// argument that depends on how callers batch their operations. With the waits last, every
// stream holds a batch as post, copies in, waits for copies out: copies wait only for posts,
// waits only for copies, so no cycle can form whatever the batches. And the done events belong
// to the sender, so no later batch of the receiver can record them again before the sender's
// waits are issued.
//
// The copies are enqueued under the group's lock: that takes microseconds, and the owner of a
// stream never enqueues on it concurrently (it is blocked in its own Enqueue until its
// operations are matched), which is what makes another rank's thread enqueueing on it safe.
//
// The group fails as a whole: an abort, a timeout or a byte-count mismatch on any rank fails
// every rank's pending and later calls with the same status. After an abort no copy is
// enqueued any more; the copies already enqueued are finite (each waits only for events that
// were recorded before it was enqueued), so every rank's streams drain.
//
// Every rank's streams must belong to the same device, the one current on the threads that
// call Enqueue.
#pragma once

#include <cuda_runtime_api.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "ring/transport/device_communicator.h"

namespace ringattn {

class InProcessDeviceGroup : public std::enable_shared_from_this<InProcessDeviceGroup> {
 public:
  // A group of `world_size` ranks (>= 1). An Enqueue whose operations are not all matched
  // within `timeout` (> 0) fails with DeadlineExceeded, which also aborts the group.
  static absl::StatusOr<std::shared_ptr<InProcessDeviceGroup>> Create(
      int world_size, std::chrono::milliseconds timeout);

  // A new group and all of its communicators, rank r at index r.
  static absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> CreateCommunicators(
      int world_size, std::chrono::milliseconds timeout);

  // The communicator of `rank`; each rank can be taken once (FailedPrecondition otherwise).
  // The communicator keeps the group alive. Its methods other than Abort and CheckHealth are
  // meant for one thread, the rank's own; Abort may come from any thread.
  absl::StatusOr<std::unique_ptr<DeviceCommunicator>> MakeCommunicator(int rank);

  // Aborts every rank, as DeviceCommunicator::Abort on any of them does.
  void Abort(const absl::Status& reason);
  // The abort reason, or OK.
  absl::Status status();

  int world_size() const { return world_size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  ~InProcessDeviceGroup();
  InProcessDeviceGroup(const InProcessDeviceGroup&) = delete;
  InProcessDeviceGroup& operator=(const InProcessDeviceGroup&) = delete;

 private:
  friend class InProcessDeviceCommunicator;

  // One posted transfer with bytes to move. Owned by its rank's batch.
  struct Op {
    bool is_send = false;
    int owner = 0;  // the rank that posted it
    int peer = 0;
    uint64_t index = 0;  // how many transfers in this direction between the pair came before
    size_t bytes = 0;
    const void* send_data = nullptr;  // device memory
    void* recv_data = nullptr;        // device memory
    cudaStream_t stream = nullptr;    // the owner's stream
    // Sends only: an event of the owner's, recorded on copy_stream (the receiver's) after the
    // copy, which the owner's stream waits for before its Enqueue returns.
    cudaEvent_t done_event = nullptr;
    cudaStream_t copy_stream = nullptr;
    bool copied = false;  // the copy was enqueued
    bool finished = false;
  };

  // What one rank has in flight, and its events. The events are created and grown by the
  // owner's thread while it has nothing in flight (no other thread can reach them then: they
  // are only used to copy a match against one of its queued operations).
  struct RankState {
    bool taken = false;  // MakeCommunicator handed it out
    bool in_flight = false;
    std::vector<std::unique_ptr<Op>> ops;
    int unfinished = 0;
    std::vector<uint64_t> sends_posted;    // per destination, zero-byte transfers included
    std::vector<uint64_t> recvs_posted;    // per source
    cudaEvent_t post_event = nullptr;      // recorded on the owner's stream at each Enqueue
    std::vector<cudaEvent_t> done_events;  // one per send of a batch, reused across batches
  };

  // Transfers posted first and still waiting for their counterpart, for one (src, dst) pair.
  // At most one of the two is non-empty: a post that finds the other kind matches it instead.
  struct PairQueue {
    std::deque<Op*> sends;
    std::deque<Op*> recvs;
  };

  InProcessDeviceGroup(int world_size, std::chrono::milliseconds timeout);

  absl::Status Enqueue(int rank, absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs,
                       cudaStream_t stream);
  // Destroys the rank's events; called by its communicator's destructor.
  void Release(int rank);

  absl::Status ValidateBatch(int rank, absl::Span<const SendOp> sends,
                             absl::Span<const RecvOp> recvs) const;
  // Makes sure `rank` has a post event and `sends` done events. Owner thread, nothing in
  // flight, mu_ not held.
  absl::Status EnsureEvents(int rank, size_t sends);
  // The *Locked functions need mu_ held.
  // Queues `op` or matches it with its counterpart and enqueues the copy.
  absl::Status PostLocked(Op* op);
  absl::Status EnqueueCopyLocked(Op* send, Op* recv);
  // Makes the owner's stream wait for the copies of its sends that were enqueued.
  absl::Status WaitForSendsLocked(RankState& state);
  void FinishLocked(Op* op);
  void ClearBatchLocked(RankState& state);
  absl::Status TimeoutStatusLocked(int rank) const;
  void AbortLocked(const absl::Status& reason);
  PairQueue& QueueLocked(int src, int dst) {
    return queues_[static_cast<size_t>(src) * world_size_ + dst];
  }

  const int world_size_;
  const std::chrono::milliseconds timeout_;

  // std::mutex rather than absl::Mutex: the prebuilt Abseil is invisible to ThreadSanitizer,
  // pthread-based locks are not.
  std::mutex mu_;
  // Notified on every finished transfer and on abort; waiters recheck their own batch.
  std::condition_variable changed_;
  // Guarded by mu_ (a rank's events: see RankState):
  absl::Status abort_status_;
  std::vector<RankState> ranks_;
  std::vector<PairQueue> queues_;  // [src * world_size + dst]
};

}  // namespace ringattn
