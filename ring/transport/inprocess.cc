#include "ring/transport/inprocess.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

// The one place bytes move. A device-memory variant of this transport would issue a peer copy
// (cudaMemcpyAsync / cudaMemcpyPeerAsync on the receiver's stream) here and have Wait
// synchronize on an event recorded after it, instead of copying synchronously on the host.
void CopyBytes(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }

// "send #3 to rank 1" / "receive #0 from rank 2", for error messages.
std::string DescribeOp(bool is_send, uint64_t index, int peer) {
  return is_send ? absl::StrCat("send #", index, " to rank ", peer)
                 : absl::StrCat("receive #", index, " from rank ", peer);
}

absl::Status CheckPeer(int rank, int world, int peer, size_t bytes, const void* data,
                       const char* kind, size_t i) {
  if (peer < 0 || peer >= world) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", rank, ": ", kind, " ", i, " names peer ", peer, ", outside [0, ", world, ")"));
  }
  if (bytes > 0 && data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, ": ", kind, " ", i, " of ", bytes,
                                                   " bytes to/from rank ", peer,
                                                   " has a null buffer"));
  }
  return absl::OkStatus();
}

}  // namespace

// The per-rank face of an InProcessGroup. Everything lives in the group, under its lock, so
// that matching and aborting see every rank at once.
class InProcessCommunicator final : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<InProcessGroup> group, int rank)
      : group_(std::move(group)), rank_(rank) {}
  ~InProcessCommunicator() override { group_->Release(rank_); }

  int rank() const override { return rank_; }
  int world_size() const override { return group_->world_size(); }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }

  absl::Status Start(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs) override {
    return group_->Start(rank_, sends, recvs);
  }
  absl::Status Wait() override { return group_->Wait(rank_); }
  void Abort(const absl::Status& reason) override { group_->Abort(reason); }

 private:
  const std::shared_ptr<InProcessGroup> group_;
  const int rank_;
};

InProcessGroup::InProcessGroup(int world_size, std::chrono::milliseconds timeout)
    : world_size_(world_size),
      timeout_(timeout),
      ranks_(world_size),
      queues_(static_cast<size_t>(world_size) * world_size) {
  for (RankState& r : ranks_) {
    r.sends_posted.assign(world_size, 0);
    r.recvs_posted.assign(world_size, 0);
  }
}

absl::StatusOr<std::shared_ptr<InProcessGroup>> InProcessGroup::Create(
    int world_size, std::chrono::milliseconds timeout) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("in-process group needs world_size >= 1, got ", world_size));
  }
  if (timeout <= std::chrono::milliseconds::zero()) {
    return absl::InvalidArgumentError(
        absl::StrCat("in-process group needs a positive timeout, got ", timeout.count(), " ms"));
  }
  // The constructor is private, so make_shared cannot reach it.
  return std::shared_ptr<InProcessGroup>(new InProcessGroup(world_size, timeout));
}

absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> InProcessGroup::CreateCommunicators(
    int world_size, std::chrono::milliseconds timeout) {
  absl::StatusOr<std::shared_ptr<InProcessGroup>> group = Create(world_size, timeout);
  if (!group.ok()) return group.status();
  std::vector<std::unique_ptr<Communicator>> comms;
  for (int r = 0; r < world_size; ++r) {
    absl::StatusOr<std::unique_ptr<Communicator>> comm = (*group)->MakeCommunicator(r);
    if (!comm.ok()) return comm.status();
    comms.push_back(*std::move(comm));
  }
  return comms;
}

absl::StatusOr<std::unique_ptr<Communicator>> InProcessGroup::MakeCommunicator(int rank) {
  if (rank < 0 || rank >= world_size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, " is outside the group's [0, ", world_size_, ")"));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ranks_[rank].taken) {
      return absl::FailedPreconditionError(
          absl::StrCat("the communicator of rank ", rank, " was already made"));
    }
    ranks_[rank].taken = true;
  }
  return std::unique_ptr<Communicator>(new InProcessCommunicator(shared_from_this(), rank));
}

void InProcessGroup::Abort(const absl::Status& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  AbortLocked(reason);
}

void InProcessGroup::AbortLocked(const absl::Status& reason) {
  if (!abort_status_.ok()) return;  // the first reason sticks
  abort_status_ =
      reason.ok() ? absl::AbortedError("in-process group aborted (with an OK reason)") : reason;
  // Nothing queued may match from now on; transfers being copied finish, and their owners'
  // Waits hold until then so that no buffer is released while it is written.
  for (PairQueue& q : queues_) {
    q.sends.clear();
    q.recvs.clear();
  }
  changed_.notify_all();
}

absl::Status InProcessGroup::ValidateBatch(int rank, absl::Span<const SendOp> sends,
                                           absl::Span<const RecvOp> recvs) const {
  for (size_t i = 0; i < sends.size(); ++i) {
    const SendOp& s = sends[i];
    absl::Status st = CheckPeer(rank, world_size_, s.peer, s.bytes, s.data, "send", i);
    if (!st.ok()) return st;
  }
  for (size_t i = 0; i < recvs.size(); ++i) {
    const RecvOp& r = recvs[i];
    absl::Status st = CheckPeer(rank, world_size_, r.peer, r.bytes, r.data, "receive", i);
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::Status InProcessGroup::Start(int rank, absl::Span<const SendOp> sends,
                                   absl::Span<const RecvOp> recvs) {
  // A malformed batch is rejected before anything is posted, so it changes nothing.
  absl::Status valid = ValidateBatch(rank, sends, recvs);
  if (!valid.ok()) return valid;

  std::vector<Match> matches;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!abort_status_.ok()) return abort_status_;
    RankState& state = ranks_[rank];
    if (state.in_flight) {
      return absl::FailedPreconditionError(
          absl::StrCat("rank ", rank, ": Start called while a batch is in flight; Wait first"));
    }
    state.in_flight = true;
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
  CopyMatches(matches);
  return absl::OkStatus();
}

absl::Status InProcessGroup::PostLocked(Op* op, std::vector<Match>* matches) {
  const int src = op->is_send ? op->owner : op->peer;
  const int dst = op->is_send ? op->peer : op->owner;
  PairQueue& q = QueueLocked(src, dst);
  std::deque<Op*>& counterparts = op->is_send ? q.recvs : q.sends;
  if (counterparts.empty()) {
    (op->is_send ? q.sends : q.recvs).push_back(op);
    return absl::OkStatus();
  }
  Op* other = counterparts.front();
  counterparts.pop_front();
  Op* send = op->is_send ? op : other;
  Op* recv = op->is_send ? other : op;
  if (send->bytes != recv->bytes) {
    absl::Status mismatch = absl::InvalidArgumentError(
        absl::StrCat("byte count mismatch: rank ", src, "'s ", DescribeOp(true, send->index, dst),
                     " is ", send->bytes, " bytes but rank ", dst, "'s ",
                     DescribeOp(false, recv->index, src), " is ", recv->bytes, " bytes"));
    FinishLocked(send);
    FinishLocked(recv);
    AbortLocked(mismatch);
    return mismatch;
  }
  send->state = recv->state = Op::State::kCopying;
  matches->push_back({send, recv});
  return absl::OkStatus();
}

void InProcessGroup::CopyMatches(const std::vector<Match>& matches) {
  // Outside the lock, so that every rank's copies run in parallel. The buffers stay valid:
  // both owners' Waits hold while a transfer of theirs is being copied, even after an abort.
  for (const Match& m : matches) CopyBytes(m.recv->recv_data, m.send->send_data, m.send->bytes);
  if (matches.empty()) return;
  std::lock_guard<std::mutex> lock(mu_);
  for (const Match& m : matches) {
    FinishLocked(m.send);
    FinishLocked(m.recv);
  }
  changed_.notify_all();
}

void InProcessGroup::FinishLocked(Op* op) {
  if (op->state == Op::State::kFinished) return;
  op->state = Op::State::kFinished;
  --ranks_[op->owner].unfinished;
}

bool InProcessGroup::AnyCopyingLocked(const RankState& state) const {
  for (const auto& op : state.ops) {
    if (op->state == Op::State::kCopying) return true;
  }
  return false;
}

void InProcessGroup::ClearBatchLocked(RankState& state) {
  state.ops.clear();
  state.unfinished = 0;
  state.in_flight = false;
}

absl::Status InProcessGroup::TimeoutStatusLocked(int rank) const {
  for (const auto& op : ranks_[rank].ops) {
    if (op->state != Op::State::kQueued) continue;
    return absl::DeadlineExceededError(absl::StrCat(
        "rank ", rank, " timed out after ", timeout_.count(), " ms waiting for its ",
        DescribeOp(op->is_send, op->index, op->peer), " (", op->bytes, " bytes); rank ", op->peer,
        " has not posted the matching ", op->is_send ? "receive" : "send"));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("rank ", rank, " timed out after ", timeout_.count(), " ms in Wait"));
}

absl::Status InProcessGroup::Wait(int rank) {
  const Clock::time_point deadline = Clock::now() + timeout_;
  std::unique_lock<std::mutex> lock(mu_);
  RankState& state = ranks_[rank];
  if (!state.in_flight) return abort_status_;
  for (;;) {
    if (!abort_status_.ok()) {
      // Hold until no peer is still copying into or out of this rank's buffers.
      if (!AnyCopyingLocked(state)) {
        ClearBatchLocked(state);
        return abort_status_;
      }
      changed_.wait(lock);
      continue;
    }
    if (state.unfinished == 0) {
      ClearBatchLocked(state);
      return absl::OkStatus();
    }
    if (Clock::now() >= deadline) {
      // Aborting releases the peers too: whatever they wait for from this rank won't come.
      AbortLocked(TimeoutStatusLocked(rank));
      continue;
    }
    changed_.wait_until(lock, deadline);
  }
}

void InProcessGroup::Release(int rank) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!ranks_[rank].in_flight) return;
    // Its buffers are about to go away with the caller; no peer may touch them any more.
    AbortLocked(absl::CancelledError(
        absl::StrCat("rank ", rank, "'s communicator was destroyed with a batch in flight")));
  }
  // Returns once this rank's copies in progress are done.
  Wait(rank).IgnoreError();
}

}  // namespace ringattn
