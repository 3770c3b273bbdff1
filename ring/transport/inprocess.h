// A Communicator whose ranks are threads of one process: the ring's test transport, and the
// shape a single-process multi-GPU transport would take.
//
// The ranks share an InProcessGroup. Transfers between one ordered pair of ranks (src, dst)
// match first-in first-out; whichever side posts second copies the bytes straight from the
// sender's buffer into the receiver's, so nothing is buffered in between. The group fails as a
// whole: an abort, a timeout or a byte-count mismatch on any rank fails every rank's pending
// and later calls with the same status, so one failing rank never leaves the others waiting.
#pragma once

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
#include "ring/transport/communicator.h"

namespace ringattn {

class InProcessGroup : public std::enable_shared_from_this<InProcessGroup> {
 public:
  // A group of `world_size` ranks (>= 1). Each Wait gives up after `timeout` (> 0) with
  // DeadlineExceeded, which also aborts the group.
  static absl::StatusOr<std::shared_ptr<InProcessGroup>> Create(int world_size,
                                                                std::chrono::milliseconds timeout);

  // A new group and all of its communicators, rank r at index r.
  static absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> CreateCommunicators(
      int world_size, std::chrono::milliseconds timeout);

  // The communicator of `rank`; each rank can be taken once (FailedPrecondition otherwise).
  // The communicator keeps the group alive. Its methods other than Abort are meant for one
  // thread, the rank's own; Abort may come from any thread.
  absl::StatusOr<std::unique_ptr<Communicator>> MakeCommunicator(int rank);

  // Aborts every rank, as Communicator::Abort on any of them does.
  void Abort(const absl::Status& reason);

  int world_size() const { return world_size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  InProcessGroup(const InProcessGroup&) = delete;
  InProcessGroup& operator=(const InProcessGroup&) = delete;

 private:
  friend class InProcessCommunicator;

  // One posted transfer with bytes to move. Owned by its rank's batch.
  struct Op {
    enum class State { kQueued, kCopying, kFinished };
    bool is_send = false;
    int owner = 0;  // the rank that posted it
    int peer = 0;
    uint64_t index = 0;  // how many transfers in this direction between the pair came before
    size_t bytes = 0;
    const void* send_data = nullptr;
    void* recv_data = nullptr;
    State state = State::kQueued;
  };

  // What one rank has in flight.
  struct RankState {
    bool taken = false;  // MakeCommunicator handed it out
    bool in_flight = false;
    std::vector<std::unique_ptr<Op>> ops;
    int unfinished = 0;
    std::vector<uint64_t> sends_posted;  // per destination, zero-byte transfers included
    std::vector<uint64_t> recvs_posted;  // per source
  };

  // Transfers posted first and still waiting for their counterpart, for one (src, dst) pair.
  // At most one of the two is non-empty: a post that finds the other kind matches it instead.
  struct PairQueue {
    std::deque<Op*> sends;
    std::deque<Op*> recvs;
  };

  // A matched send and receive whose bytes the second poster copies outside the lock.
  struct Match {
    Op* send;
    Op* recv;
  };

  InProcessGroup(int world_size, std::chrono::milliseconds timeout);

  absl::Status Start(int rank, absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs);
  absl::Status Wait(int rank);
  // Aborts a batch left in flight and waits out its copies, so its buffers can go.
  void Release(int rank);

  absl::Status ValidateBatch(int rank, absl::Span<const SendOp> sends,
                             absl::Span<const RecvOp> recvs) const;
  // The *Locked functions need mu_ held. CopyMatches needs it not held.
  // Queues `op` or matches it with its counterpart; a match is appended to `matches`.
  absl::Status PostLocked(Op* op, std::vector<Match>* matches);
  void CopyMatches(const std::vector<Match>& matches);
  void FinishLocked(Op* op);
  bool AnyCopyingLocked(const RankState& state) const;
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
  // Guarded by mu_:
  absl::Status abort_status_;
  std::vector<RankState> ranks_;
  std::vector<PairQueue> queues_;  // [src * world_size + dst]
};

}  // namespace ringattn
