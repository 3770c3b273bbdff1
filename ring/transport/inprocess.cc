#include "ring/transport/inprocess.h"

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "base/status_macros.h"
#include "ringattn_config.h"

#if RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <cstdio>

#include "absl/time/time.h"
#include "base/cuda_check.h"
#include "ring/transport/device_communicator.h"
#endif

namespace ringattn {
namespace inprocess_internal {
namespace {

using Clock = std::chrono::steady_clock;

// "send #3 to rank 1" / "receive #0 from rank 2", for error messages.
std::string DescribeOp(bool is_send, uint64_t index, int peer) {
  return is_send ? absl::StrCat("send #", index, " to rank ", peer)
                 : absl::StrCat("receive #", index, " from rank ", peer);
}

}  // namespace

// One posted transfer with bytes to move, owned by its rank's batch. `Extra` is what the
// transport's copy needs beyond the buffers.
template <typename Extra>
struct Transfer {
  enum class State { kQueued, kCopying, kFinished };
  bool is_send = false;
  int owner = 0;  // the rank that posted it
  int peer = 0;
  uint64_t index = 0;  // how many transfers in this direction between the pair came before
  size_t bytes = 0;
  const void* send_data = nullptr;
  void* recv_data = nullptr;
  State state = State::kQueued;
  Extra extra;
};

// ---- How bytes move -------------------------------------------------------------------------
//
// A copy policy gives the mailbox:
//   kName, kCopiesUnderLock: whether Copy runs under the mailbox's lock, finishing the pair at
//     once, or later outside it, by the poster that matched the pair;
//   Batch: what a post takes beyond its operations; RankState, OpState: what it keeps;
//   Prepare (owner's thread, nothing in flight, lock not held), InitOp, Copy, Complete (the
//     batch is matched or the group aborted: lock held), Release (nothing in flight).

// Host memory: a memcpy by the second poster, outside the lock, so that every rank's copies
// run in parallel.
struct HostCopy {
  static constexpr const char* kName = "in-process group";
  static constexpr bool kCopiesUnderLock = false;
  struct Batch {};
  struct RankState {};
  struct OpState {};
  using Op = Transfer<OpState>;

  static absl::Status Prepare(RankState&, absl::Span<const SendOp>, const Batch&) {
    return absl::OkStatus();
  }
  static void InitOp(RankState&, const Batch&, Op&) {}
  static absl::Status Copy(const RankState& /*sender*/, Op& send, Op& recv) {
    std::memcpy(recv.recv_data, send.send_data, send.bytes);
    return absl::OkStatus();
  }
  static absl::Status Complete(RankState&, absl::Span<const std::unique_ptr<Op>>) {
    return absl::OkStatus();
  }
  static void Release(RankState&) {}
};

#if RINGATTN_HAVE_CUDA
namespace {
// For destructors, which cannot return the error.
void ReportIfError(cudaError_t e) {
  if (e == cudaSuccess) return;
  std::fprintf(stderr, "InProcessDeviceGroup: cudaEventDestroy failed: %s (%s)\n",
               cudaGetErrorName(e), cudaGetErrorString(e));
}
}  // namespace

// Device memory of one GPU, ordered on the ranks' streams. Each post records an event on the
// poster's stream (the point where its send data is ready and its receive buffers are free);
// the copy of a matched pair goes on the RECEIVER's stream:
//
//   cudaStreamWaitEvent(recv_stream, sender_post_event)   // the sender's data is ready
//   cudaMemcpyAsync(dst, src, bytes, D2D, recv_stream)    // after the receiver's own post
//   cudaEventRecord(send_done_event, recv_stream)         // an event of the sender's
//
// and once all of a rank's operations are matched, its own Enqueue makes its stream wait for
// its sends' done events (Complete), so work it enqueues afterwards cannot overwrite a buffer
// before the copy has read it; work the receiver enqueues afterwards sees the bytes.
//
// The copies are enqueued under the mailbox's lock: that takes microseconds, and the owner of
// a stream never enqueues on it concurrently (it is blocked in its own Enqueue until its
// operations are matched), which is what makes another rank's thread enqueueing on it safe.
// The sender's post event was recorded before it posted, and it records it again only in its
// next Enqueue, after every copy that waits for it was issued.
//
// Why the sender's waits come last, in its own thread: issued at match time instead, rank r's
// stream gets "wait for r+1's copy" before "copy from r-1" whenever r's send matched first;
// were that so on every rank of a ring, each copy would sit behind a wait for the next rank's
// copy, a cycle, and the GPU would hang. Only the order of the matches would then rule that
// out, an argument that depends on how callers batch their operations. With the waits last,
// every stream holds a batch as post, copies in, waits for copies out: copies wait only for
// posts, waits only for copies, so no cycle can form whatever the batches. And the done events
// belong to the sender, so no later batch of the receiver can record them again before the
// sender's waits are issued.
struct DeviceCopy {
  static constexpr const char* kName = "in-process device group";
  static constexpr bool kCopiesUnderLock = true;
  struct Batch {
    cudaStream_t stream = nullptr;  // the poster's
  };
  // Created and grown by the owner's thread while it has nothing in flight (no other thread
  // can reach them then: they are only used to copy a match against one of its operations).
  struct RankState {
    cudaEvent_t post_event = nullptr;      // recorded on the owner's stream at each post
    std::vector<cudaEvent_t> done_events;  // one per send of a batch, reused across batches
    size_t next_done_event = 0;
  };
  struct OpState {
    cudaStream_t stream = nullptr;  // the owner's
    // Sends only: an event of the owner's, recorded on copy_stream (the receiver's) after the
    // copy, which the owner's stream waits for before its Enqueue returns.
    cudaEvent_t done_event = nullptr;
    cudaStream_t copy_stream = nullptr;
    bool copied = false;  // the copy was enqueued
  };
  using Op = Transfer<OpState>;

  // Makes sure of a post event and a done event per send with bytes, then records the post
  // event: everything enqueued on the stream so far.
  static absl::Status Prepare(RankState& state, absl::Span<const SendOp> sends,
                              const Batch& batch) {
    size_t sends_with_bytes = 0;
    for (const SendOp& s : sends) sends_with_bytes += s.bytes > 0 ? 1 : 0;
    // Timing off: these events only order streams, and timing events cost more to record.
    if (state.post_event == nullptr) {
      RA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&state.post_event, cudaEventDisableTiming));
    }
    while (state.done_events.size() < sends_with_bytes) {
      cudaEvent_t e = nullptr;
      RA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      state.done_events.push_back(e);
    }
    state.next_done_event = 0;
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(state.post_event, batch.stream));
    return absl::OkStatus();
  }

  static void InitOp(RankState& state, const Batch& batch, Op& op) {
    op.extra.stream = batch.stream;
    if (op.is_send) op.extra.done_event = state.done_events[state.next_done_event++];
  }

  static absl::Status Copy(const RankState& sender, Op& send, Op& recv) {
    const cudaStream_t stream = recv.extra.stream;
    RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, sender.post_event, 0));
    // Same device (see inprocess.h), so this is a device-local copy; under UVA it would also
    // be a peer copy between two devices.
    RA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(recv.recv_data, send.send_data, send.bytes,
                                            cudaMemcpyDeviceToDevice, stream));
    send.extra.copied = true;  // from here the copy may read the sender's buffer
    send.extra.copy_stream = stream;
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(send.extra.done_event, stream));
    return absl::OkStatus();
  }

  // Makes the owner's stream wait for the copies of its sends that were enqueued: last, after
  // every copy into this rank's buffers is on its stream (see above).
  static absl::Status Complete(RankState&, absl::Span<const std::unique_ptr<Op>> ops) {
    for (const auto& op : ops) {
      const OpState& x = op->extra;
      if (!op->is_send || !x.copied || x.copy_stream == x.stream) continue;
      RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(x.stream, x.done_event, 0));
    }
    return absl::OkStatus();
  }

  // An event still pending in a stream is released by the runtime once the stream passes it.
  static void Release(RankState& state) {
    if (state.post_event != nullptr) ReportIfError(cudaEventDestroy(state.post_event));
    state.post_event = nullptr;
    for (cudaEvent_t e : state.done_events) ReportIfError(cudaEventDestroy(e));
    state.done_events.clear();
  }
};
#endif  // RINGATTN_HAVE_CUDA

template <typename Comm>
struct CopyOf;
template <>
struct CopyOf<Communicator> {
  using type = HostCopy;
};
#if RINGATTN_HAVE_CUDA
template <>
struct CopyOf<DeviceCommunicator> {
  using type = DeviceCopy;
};
#endif

// ---- The mailbox ----------------------------------------------------------------------------

// The state of a group: every rank's batch and the queues that match them, under one lock, so
// that matching and aborting see every rank at once.
template <typename Comm>
class Mailbox {
 public:
  using Copier = typename CopyOf<Comm>::type;
  using Op = typename Copier::Op;
  using Batch = typename Copier::Batch;

  static absl::StatusOr<std::shared_ptr<Mailbox>> Create(int world_size,
                                                         std::chrono::milliseconds timeout) {
    if (world_size < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(Copier::kName, " needs world_size >= 1, got ", world_size));
    }
    if (timeout <= std::chrono::milliseconds::zero()) {
      return absl::InvalidArgumentError(
          absl::StrCat(Copier::kName, " needs a positive timeout, got ", timeout.count(), " ms"));
    }
    return std::make_shared<Mailbox>(world_size, timeout);
  }

  Mailbox(int world_size, std::chrono::milliseconds timeout)
      : world_size_(world_size),
        timeout_(timeout),
        ranks_(world_size),
        queues_(static_cast<size_t>(world_size) * world_size) {
    for (RankState& r : ranks_) {
      r.sends_posted.assign(world_size, 0);
      r.recvs_posted.assign(world_size, 0);
    }
  }
  // Every communicator released its rank already (each holds the mailbox alive).
  ~Mailbox() {
    for (RankState& r : ranks_) Copier::Release(r.copier);
  }

  int world_size() const { return world_size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  // MakeCommunicator's bookkeeping: each rank can be taken once.
  absl::Status Take(int rank) {
    if (rank < 0 || rank >= world_size_) {
      return absl::InvalidArgumentError(
          absl::StrCat("rank ", rank, " is outside the group's [0, ", world_size_, ")"));
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (ranks_[rank].taken) {
      return absl::FailedPreconditionError(
          absl::StrCat("the communicator of rank ", rank, " was already made"));
    }
    ranks_[rank].taken = true;
    return absl::OkStatus();
  }

  // Posts rank's batch and copies the pairs it matched (host). *in_flight tells whether the
  // batch is now in flight: then Wait ends it, also after a failure here (the group is aborted,
  // and Wait waits out what was posted). A malformed batch is rejected before anything is
  // posted, so it changes nothing.
  absl::Status Start(int rank, absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs,
                     const Batch& batch, bool* in_flight) {
    *in_flight = false;
    RA_RETURN_IF_ERROR(CheckBatch(rank, world_size_, sends, recvs));
    RankState& state = ranks_[rank];
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!abort_status_.ok()) return abort_status_;
      if (state.in_flight) {
        return absl::FailedPreconditionError(
            absl::StrCat("rank ", rank,
                         ": a batch is in flight already; Wait for it first (one rank, one "
                         "thread)"));
      }
    }
    // Outside the lock: this rank has nothing queued, so no other thread reaches its state.
    if (absl::Status prepared = Copier::Prepare(state.copier, sends, batch); !prepared.ok()) {
      Abort(prepared);
      return prepared;
    }
    std::vector<Match> matches;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!abort_status_.ok()) return abort_status_;
      state.in_flight = true;
      *in_flight = true;
      auto post = [&](bool is_send, int peer, size_t bytes, const void* send_data,
                      void* recv_data) -> absl::Status {
        uint64_t& counter = is_send ? state.sends_posted[peer] : state.recvs_posted[peer];
        const uint64_t index = counter++;
        if (bytes == 0) return absl::OkStatus();  // carries nothing; never queued
        auto op = std::make_unique<Op>();
        op->is_send = is_send;
        op->owner = rank;
        op->peer = peer;
        op->index = index;
        op->bytes = bytes;
        op->send_data = send_data;
        op->recv_data = recv_data;
        Copier::InitOp(state.copier, batch, *op);
        Op* raw = op.get();
        state.ops.push_back(std::move(op));
        ++state.unfinished;
        return PostLocked(raw, &matches);
      };
      absl::Status posted;
      for (const SendOp& s : sends) {
        if (posted.ok()) posted = post(true, s.peer, s.bytes, s.data, nullptr);
      }
      for (const RecvOp& r : recvs) {
        if (posted.ok()) posted = post(false, r.peer, r.bytes, nullptr, r.data);
      }
      if (!posted.ok()) {
        // The group is aborted already; the matches made before the failure are dropped
        // uncopied, as the Waits report the failure anyway.
        for (const Match& m : matches) {
          FinishLocked(m.send);
          FinishLocked(m.recv);
        }
        return posted;
      }
    }
    return CopyMatches(matches);
  }

  // Waits until every transfer of rank's batch is done (host: copied; device: enqueued), the
  // group is aborted, or the timeout passes (which aborts the group). Nothing in flight: the
  // abort reason or OK.
  absl::Status Wait(int rank) {
    const Clock::time_point deadline = Clock::now() + timeout_;
    std::unique_lock<std::mutex> lock(mu_);
    RankState& state = ranks_[rank];
    if (!state.in_flight) return abort_status_;
    for (;;) {
      const bool aborted = !abort_status_.ok();
      if (aborted && AnyCopyingLocked(state)) {
        // Hold until no peer is still copying into or out of this rank's buffers.
        changed_.wait(lock);
        continue;
      }
      if (aborted || state.unfinished == 0) {
        if (absl::Status done = Copier::Complete(state.copier, state.ops); !done.ok()) {
          AbortLocked(done);
        }
        state.ops.clear();
        state.unfinished = 0;
        state.in_flight = false;
        return abort_status_;
      }
      if (Clock::now() >= deadline) {
        // Aborting releases the peers too: whatever they wait for from this rank won't come.
        AbortLocked(TimeoutStatusLocked(rank));
        continue;
      }
      changed_.wait_until(lock, deadline);
    }
  }

  // For the communicator's destructor: aborts a batch left in flight and waits out its copies,
  // so that its buffers can go; then frees the rank's transport state.
  void Release(int rank) {
    bool in_flight = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_flight = ranks_[rank].in_flight;
      if (in_flight) {
        AbortLocked(absl::CancelledError(
            absl::StrCat("rank ", rank, "'s communicator was destroyed with a batch in flight")));
      }
    }
    if (in_flight) Wait(rank).IgnoreError();
    Copier::Release(ranks_[rank].copier);
  }

  void Abort(const absl::Status& reason) {
    std::lock_guard<std::mutex> lock(mu_);
    AbortLocked(reason);
  }

  absl::Status status() const {
    std::lock_guard<std::mutex> lock(mu_);
    return abort_status_;
  }

  // Set with abort_status_, for Communicator::aborted().
  const std::atomic<bool>& aborted() const { return aborted_; }

 private:
  // What one rank has in flight.
  struct RankState {
    bool taken = false;  // MakeCommunicator handed it out
    bool in_flight = false;
    std::vector<std::unique_ptr<Op>> ops;
    int unfinished = 0;
    std::vector<uint64_t> sends_posted;  // per destination, zero-byte transfers included
    std::vector<uint64_t> recvs_posted;  // per source
    typename Copier::RankState copier;
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

  // The *Locked functions need mu_ held.

  // Queues `op` or matches it with its counterpart: copies the pair at once, or appends it to
  // `matches` (see kCopiesUnderLock).
  absl::Status PostLocked(Op* op, std::vector<Match>* matches) {
    const int src = op->is_send ? op->owner : op->peer;
    const int dst = op->is_send ? op->peer : op->owner;
    PairQueue& q = queues_[static_cast<size_t>(src) * world_size_ + dst];
    std::deque<Op*>& counterparts = op->is_send ? q.recvs : q.sends;
    if (counterparts.empty()) {
      (op->is_send ? q.sends : q.recvs).push_back(op);
      return absl::OkStatus();
    }
    Op* other = counterparts.front();
    counterparts.pop_front();
    Op* send = op->is_send ? op : other;
    Op* recv = op->is_send ? other : op;
    absl::Status status;
    if (send->bytes != recv->bytes) {
      status = absl::InvalidArgumentError(
          absl::StrCat("byte count mismatch: rank ", src, "'s ", DescribeOp(true, send->index, dst),
                       " is ", send->bytes, " bytes but rank ", dst, "'s ",
                       DescribeOp(false, recv->index, src), " is ", recv->bytes, " bytes"));
    } else if constexpr (!Copier::kCopiesUnderLock) {
      send->state = recv->state = Op::State::kCopying;
      matches->push_back({send, recv});
      return absl::OkStatus();
    } else {
      status = Copier::Copy(ranks_[send->owner].copier, *send, *recv);
    }
    FinishLocked(send);
    FinishLocked(recv);
    if (!status.ok()) {
      AbortLocked(status);
      return status;
    }
    changed_.notify_all();
    return absl::OkStatus();
  }

  // Copies `matches` outside the lock, so that every rank's copies run in parallel. The
  // buffers stay valid: both owners' Waits hold while a transfer of theirs is being copied,
  // even after an abort.
  absl::Status CopyMatches(const std::vector<Match>& matches) {
    if (matches.empty()) return absl::OkStatus();
    absl::Status copied;
    for (const Match& m : matches) {
      if (copied.ok()) copied = Copier::Copy(ranks_[m.send->owner].copier, *m.send, *m.recv);
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (!copied.ok()) AbortLocked(copied);
    for (const Match& m : matches) {
      FinishLocked(m.send);
      FinishLocked(m.recv);
    }
    changed_.notify_all();
    return copied;
  }

  void FinishLocked(Op* op) {
    if (op->state == Op::State::kFinished) return;
    op->state = Op::State::kFinished;
    --ranks_[op->owner].unfinished;
  }

  bool AnyCopyingLocked(const RankState& state) const {
    for (const auto& op : state.ops) {
      if (op->state == Op::State::kCopying) return true;
    }
    return false;
  }

  absl::Status TimeoutStatusLocked(int rank) const {
    for (const auto& op : ranks_[rank].ops) {
      if (op->state != Op::State::kQueued) continue;
      return absl::DeadlineExceededError(absl::StrCat(
          "rank ", rank, " timed out after ", timeout_.count(), " ms waiting for its ",
          DescribeOp(op->is_send, op->index, op->peer), " (", op->bytes, " bytes) to match; rank ",
          op->peer, " has not posted the matching ", op->is_send ? "receive" : "send"));
    }
    return absl::DeadlineExceededError(absl::StrCat("rank ", rank, " timed out after ",
                                                    timeout_.count(), " ms waiting for its batch"));
  }

  void AbortLocked(const absl::Status& reason) {
    if (!abort_status_.ok()) return;  // the first reason sticks
    abort_status_ =
        reason.ok()
            ? absl::AbortedError(absl::StrCat(Copier::kName, " aborted (with an OK reason)"))
            : reason;
    aborted_.store(true, std::memory_order_release);
    // Nothing queued may match from now on. Copies under way finish (host: their owners'
    // Waits hold until then; device: they are finite, and their owners drain their streams
    // before releasing the buffers).
    for (PairQueue& q : queues_) {
      q.sends.clear();
      q.recvs.clear();
    }
    changed_.notify_all();
  }

  const int world_size_;
  const std::chrono::milliseconds timeout_;

  // std::mutex rather than absl::Mutex: the prebuilt Abseil is invisible to ThreadSanitizer,
  // pthread-based locks are not.
  mutable std::mutex mu_;
  // Notified on every finished transfer and on abort; waiters recheck their own batch.
  std::condition_variable changed_;
  // Guarded by mu_, except a rank's copier state (see Start):
  absl::Status abort_status_;
  std::atomic<bool> aborted_{false};
  std::vector<RankState> ranks_;
  std::vector<PairQueue> queues_;  // [src * world_size + dst]
};

// ---- The communicators ----------------------------------------------------------------------

namespace {

// What both communicators share: one rank of a mailbox, which it keeps alive.
template <typename Comm>
class RankOf : public Comm {
 public:
  RankOf(std::shared_ptr<Mailbox<Comm>> mailbox, int rank)
      : mailbox_(std::move(mailbox)), rank_(rank) {}
  ~RankOf() override { mailbox_->Release(rank_); }

  int rank() const override { return rank_; }
  int world_size() const override { return mailbox_->world_size(); }
  void Abort(const absl::Status& reason) override { mailbox_->Abort(reason); }

 protected:
  const std::shared_ptr<Mailbox<Comm>> mailbox_;
  const int rank_;
};

class InProcessCommunicator final : public RankOf<Communicator> {
 public:
  using RankOf::RankOf;
  MemorySpace memory_space() const override { return MemorySpace::kHost; }
  absl::Status Start(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs) override {
    bool in_flight = false;
    return mailbox_->Start(rank_, sends, recvs, HostCopy::Batch{}, &in_flight);
  }
  absl::Status Wait() override { return mailbox_->Wait(rank_); }
  const std::atomic<bool>& aborted() const override { return mailbox_->aborted(); }
};

std::unique_ptr<Communicator> MakeFace(std::shared_ptr<Mailbox<Communicator>> mailbox, int rank) {
  return std::make_unique<InProcessCommunicator>(std::move(mailbox), rank);
}

#if RINGATTN_HAVE_CUDA
class InProcessDeviceCommunicator final : public RankOf<DeviceCommunicator> {
 public:
  using RankOf::RankOf;
  absl::Duration timeout() const override { return absl::FromChrono(mailbox_->timeout()); }
  // Posts, then blocks until every operation is matched and its copy enqueued.
  absl::Status Enqueue(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs,
                       cudaStream_t stream) override {
    bool in_flight = false;
    const absl::Status started =
        mailbox_->Start(rank_, sends, recvs, DeviceCopy::Batch{stream}, &in_flight);
    if (!in_flight) return started;
    return mailbox_->Wait(rank_);  // after a failed post: the reason, once what was posted is out
  }
  absl::Status CheckHealth() override { return mailbox_->status(); }
};

std::unique_ptr<DeviceCommunicator> MakeFace(std::shared_ptr<Mailbox<DeviceCommunicator>> mailbox,
                                             int rank) {
  return std::make_unique<InProcessDeviceCommunicator>(std::move(mailbox), rank);
}
#endif  // RINGATTN_HAVE_CUDA

}  // namespace
}  // namespace inprocess_internal

// ---- The group ------------------------------------------------------------------------------

template <typename Comm>
BasicInProcessGroup<Comm>::BasicInProcessGroup(
    std::shared_ptr<inprocess_internal::Mailbox<Comm>> mailbox)
    : mailbox_(std::move(mailbox)) {}

template <typename Comm>
BasicInProcessGroup<Comm>::~BasicInProcessGroup() = default;

template <typename Comm>
absl::StatusOr<std::shared_ptr<BasicInProcessGroup<Comm>>> BasicInProcessGroup<Comm>::Create(
    int world_size, std::chrono::milliseconds timeout) {
  RA_ASSIGN_OR_RETURN(std::shared_ptr<inprocess_internal::Mailbox<Comm>> mailbox,
                      inprocess_internal::Mailbox<Comm>::Create(world_size, timeout));
  // The constructor is private, so make_shared cannot reach it.
  return std::shared_ptr<BasicInProcessGroup>(new BasicInProcessGroup(std::move(mailbox)));
}

template <typename Comm>
absl::StatusOr<std::vector<std::unique_ptr<Comm>>> BasicInProcessGroup<Comm>::CreateCommunicators(
    int world_size, std::chrono::milliseconds timeout) {
  RA_ASSIGN_OR_RETURN(std::shared_ptr<BasicInProcessGroup> group, Create(world_size, timeout));
  std::vector<std::unique_ptr<Comm>> comms;
  for (int r = 0; r < world_size; ++r) {
    RA_ASSIGN_OR_RETURN(std::unique_ptr<Comm> comm, group->MakeCommunicator(r));
    comms.push_back(std::move(comm));
  }
  return comms;
}

template <typename Comm>
absl::StatusOr<std::unique_ptr<Comm>> BasicInProcessGroup<Comm>::MakeCommunicator(int rank) {
  RA_RETURN_IF_ERROR(mailbox_->Take(rank));
  return inprocess_internal::MakeFace(mailbox_, rank);
}

template <typename Comm>
void BasicInProcessGroup<Comm>::Abort(const absl::Status& reason) {
  mailbox_->Abort(reason);
}

template <typename Comm>
absl::Status BasicInProcessGroup<Comm>::status() const {
  return mailbox_->status();
}

template <typename Comm>
int BasicInProcessGroup<Comm>::world_size() const {
  return mailbox_->world_size();
}

template <typename Comm>
std::chrono::milliseconds BasicInProcessGroup<Comm>::timeout() const {
  return mailbox_->timeout();
}

template class BasicInProcessGroup<Communicator>;
#if RINGATTN_HAVE_CUDA
template class BasicInProcessGroup<DeviceCommunicator>;
#endif

}  // namespace ringattn
