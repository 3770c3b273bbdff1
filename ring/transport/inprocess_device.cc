#include "ring/transport/inprocess_device.h"

#include <cstdio>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

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

// For destructors, which cannot return the error.
void ReportIfError(cudaError_t e) {
  if (e == cudaSuccess) return;
  std::fprintf(stderr, "InProcessDeviceGroup: cudaEventDestroy failed: %s (%s)\n",
               cudaGetErrorName(e), cudaGetErrorString(e));
}

}  // namespace

// The per-rank face of an InProcessDeviceGroup. Everything lives in the group, under its lock,
// so that matching and aborting see every rank at once.
class InProcessDeviceCommunicator final : public DeviceCommunicator {
 public:
  InProcessDeviceCommunicator(std::shared_ptr<InProcessDeviceGroup> group, int rank)
      : group_(std::move(group)), rank_(rank) {}
  ~InProcessDeviceCommunicator() override { group_->Release(rank_); }

  int rank() const override { return rank_; }
  int world_size() const override { return group_->world_size(); }
  absl::Duration timeout() const override { return absl::FromChrono(group_->timeout()); }

  absl::Status Enqueue(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs,
                       cudaStream_t stream) override {
    return group_->Enqueue(rank_, sends, recvs, stream);
  }
  absl::Status CheckHealth() override { return group_->status(); }
  void Abort(const absl::Status& reason) override { group_->Abort(reason); }

 private:
  const std::shared_ptr<InProcessDeviceGroup> group_;
  const int rank_;
};

InProcessDeviceGroup::InProcessDeviceGroup(int world_size, std::chrono::milliseconds timeout)
    : world_size_(world_size),
      timeout_(timeout),
      ranks_(world_size),
      queues_(static_cast<size_t>(world_size) * world_size) {
  for (RankState& r : ranks_) {
    r.sends_posted.assign(world_size, 0);
    r.recvs_posted.assign(world_size, 0);
  }
}

InProcessDeviceGroup::~InProcessDeviceGroup() {
  // Every communicator released its events already (each holds the group alive); this only
  // catches what a failed MakeCommunicator might have left.
  for (int r = 0; r < world_size_; ++r) Release(r);
}

absl::StatusOr<std::shared_ptr<InProcessDeviceGroup>> InProcessDeviceGroup::Create(
    int world_size, std::chrono::milliseconds timeout) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("in-process device group needs world_size >= 1, got ", world_size));
  }
  if (timeout <= std::chrono::milliseconds::zero()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "in-process device group needs a positive timeout, got ", timeout.count(), " ms"));
  }
  // The constructor is private, so make_shared cannot reach it.
  return std::shared_ptr<InProcessDeviceGroup>(new InProcessDeviceGroup(world_size, timeout));
}

absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>>
InProcessDeviceGroup::CreateCommunicators(int world_size, std::chrono::milliseconds timeout) {
  RA_ASSIGN_OR_RETURN(std::shared_ptr<InProcessDeviceGroup> group, Create(world_size, timeout));
  std::vector<std::unique_ptr<DeviceCommunicator>> comms;
  for (int r = 0; r < world_size; ++r) {
    RA_ASSIGN_OR_RETURN(std::unique_ptr<DeviceCommunicator> comm, group->MakeCommunicator(r));
    comms.push_back(std::move(comm));
  }
  return comms;
}

absl::StatusOr<std::unique_ptr<DeviceCommunicator>> InProcessDeviceGroup::MakeCommunicator(
    int rank) {
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
  return std::unique_ptr<DeviceCommunicator>(
      new InProcessDeviceCommunicator(shared_from_this(), rank));
}

void InProcessDeviceGroup::Abort(const absl::Status& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  AbortLocked(reason);
}

absl::Status InProcessDeviceGroup::status() {
  std::lock_guard<std::mutex> lock(mu_);
  return abort_status_;
}

void InProcessDeviceGroup::AbortLocked(const absl::Status& reason) {
  if (!abort_status_.ok()) return;  // the first reason sticks
  abort_status_ = reason.ok()
                      ? absl::AbortedError("in-process device group aborted (with an OK reason)")
                      : reason;
  // Nothing queued may match from now on. Copies already enqueued stay: they are finite, and
  // their owners drain their streams before releasing the buffers.
  for (PairQueue& q : queues_) {
    q.sends.clear();
    q.recvs.clear();
  }
  changed_.notify_all();
}

absl::Status InProcessDeviceGroup::ValidateBatch(int rank, absl::Span<const SendOp> sends,
                                                 absl::Span<const RecvOp> recvs) const {
  for (size_t i = 0; i < sends.size(); ++i) {
    const SendOp& s = sends[i];
    RA_RETURN_IF_ERROR(CheckPeer(rank, world_size_, s.peer, s.bytes, s.data, "send", i));
  }
  for (size_t i = 0; i < recvs.size(); ++i) {
    const RecvOp& r = recvs[i];
    RA_RETURN_IF_ERROR(CheckPeer(rank, world_size_, r.peer, r.bytes, r.data, "receive", i));
  }
  return absl::OkStatus();
}

absl::Status InProcessDeviceGroup::EnsureEvents(int rank, size_t sends) {
  RankState& state = ranks_[rank];
  // Timing off: these events only order streams, and timing events cost more to record.
  if (state.post_event == nullptr) {
    RA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&state.post_event, cudaEventDisableTiming));
  }
  while (state.done_events.size() < sends) {
    cudaEvent_t e = nullptr;
    RA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    state.done_events.push_back(e);
  }
  return absl::OkStatus();
}

absl::Status InProcessDeviceGroup::Enqueue(int rank, absl::Span<const SendOp> sends,
                                           absl::Span<const RecvOp> recvs, cudaStream_t stream) {
  // A malformed batch is rejected before anything is posted, so it changes nothing.
  RA_RETURN_IF_ERROR(ValidateBatch(rank, sends, recvs));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!abort_status_.ok()) return abort_status_;
    if (ranks_[rank].in_flight) {
      return absl::FailedPreconditionError(absl::StrCat(
          "rank ", rank, ": Enqueue called from two threads at once; one rank, one thread"));
    }
  }
  // Outside the lock: this rank has nothing queued, so no other thread touches its events.
  size_t nonempty_sends = 0;
  for (const SendOp& s : sends) nonempty_sends += s.bytes > 0 ? 1 : 0;
  if (absl::Status s = EnsureEvents(rank, nonempty_sends); !s.ok()) {
    Abort(s);
    return s;
  }
  RankState& state = ranks_[rank];
  // The point on this rank's stream after which its send data is ready and its receive
  // buffers are free: everything enqueued on `stream` so far.
  if (const cudaError_t e = cudaEventRecord(state.post_event, stream); e != cudaSuccess) {
    const absl::Status s =
        CudaErrorStatus(e, "cudaEventRecord(post_event, stream)", __FILE__, __LINE__);
    Abort(s);
    return s;
  }

  const Clock::time_point deadline = Clock::now() + timeout_;
  std::unique_lock<std::mutex> lock(mu_);
  if (!abort_status_.ok()) return abort_status_;
  state.in_flight = true;
  size_t send_slot = 0;
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
    op->stream = stream;
    if (is_send) op->done_event = state.done_events[send_slot++];
    Op* raw = op.get();
    state.ops.push_back(std::move(op));
    ++state.unfinished;
    return PostLocked(raw);
  };
  absl::Status posted;
  for (const SendOp& s : sends) {
    if (posted.ok()) posted = post(true, s.peer, s.bytes, s.data, nullptr);
  }
  for (const RecvOp& r : recvs) {
    if (posted.ok()) posted = post(false, r.peer, r.bytes, nullptr, r.data);
  }
  if (!posted.ok()) {
    // The group is aborted already (PostLocked aborts on every failure). Copies of sends
    // matched before it still read this rank's buffers: its stream waits for them too.
    (void)WaitForSendsLocked(state);
    ClearBatchLocked(state);
    return posted;
  }
  for (;;) {
    if (!abort_status_.ok() || state.unfinished == 0) {
      // Last, after every copy into this rank's buffers is on its stream: see the header.
      const absl::Status waits = WaitForSendsLocked(state);
      ClearBatchLocked(state);
      if (!abort_status_.ok()) return abort_status_;
      return waits;
    }
    if (Clock::now() >= deadline) {
      // Aborting releases the peers too: whatever they wait for from this rank won't come.
      AbortLocked(TimeoutStatusLocked(rank));
      continue;
    }
    changed_.wait_until(lock, deadline);
  }
}

absl::Status InProcessDeviceGroup::WaitForSendsLocked(RankState& state) {
  for (const auto& op : state.ops) {
    if (!op->is_send || !op->copied || op->copy_stream == op->stream) continue;
    if (const cudaError_t e = cudaStreamWaitEvent(op->stream, op->done_event, 0);
        e != cudaSuccess) {
      const absl::Status error = CudaErrorStatus(
          e, "cudaStreamWaitEvent(send_stream, send_done_event, 0)", __FILE__, __LINE__);
      AbortLocked(error);
      return error;
    }
  }
  return absl::OkStatus();
}

absl::Status InProcessDeviceGroup::PostLocked(Op* op) {
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
  absl::Status status;
  if (send->bytes != recv->bytes) {
    status = absl::InvalidArgumentError(
        absl::StrCat("byte count mismatch: rank ", src, "'s ", DescribeOp(true, send->index, dst),
                     " is ", send->bytes, " bytes but rank ", dst, "'s ",
                     DescribeOp(false, recv->index, src), " is ", recv->bytes, " bytes"));
  } else {
    status = EnqueueCopyLocked(send, recv);
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

absl::Status InProcessDeviceGroup::EnqueueCopyLocked(Op* send, Op* recv) {
  // Both owners are blocked in Enqueue until their operations are matched, so neither enqueues
  // on its stream meanwhile. The sender's post event was recorded before it posted, and it
  // records it again only in its next Enqueue, after this wait was issued.
  cudaEvent_t sender_posted = ranks_[send->owner].post_event;
  RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(recv->stream, sender_posted, 0));
  // Same device (see the header), so this is a device-local copy; under UVA it would also be
  // a peer copy between two devices.
  RA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(recv->recv_data, send->send_data, send->bytes,
                                          cudaMemcpyDeviceToDevice, recv->stream));
  send->copied = true;  // from here the copy may read the sender's buffer
  send->copy_stream = recv->stream;
  RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(send->done_event, recv->stream));
  return absl::OkStatus();
}

void InProcessDeviceGroup::FinishLocked(Op* op) {
  if (op->finished) return;
  op->finished = true;
  --ranks_[op->owner].unfinished;
}

void InProcessDeviceGroup::ClearBatchLocked(RankState& state) {
  state.ops.clear();
  state.unfinished = 0;
  state.in_flight = false;
}

absl::Status InProcessDeviceGroup::TimeoutStatusLocked(int rank) const {
  for (const auto& op : ranks_[rank].ops) {
    if (op->finished) continue;
    return absl::DeadlineExceededError(absl::StrCat(
        "rank ", rank, " timed out after ", timeout_.count(), " ms waiting for its ",
        DescribeOp(op->is_send, op->index, op->peer), " (", op->bytes, " bytes) to match; rank ",
        op->peer, " has not posted the matching ", op->is_send ? "receive" : "send"));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("rank ", rank, " timed out after ", timeout_.count(), " ms in Enqueue"));
}

void InProcessDeviceGroup::Release(int rank) {
  RankState& state = ranks_[rank];
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Enqueue returns only with nothing of this rank queued, so no other thread can reach its
    // events any more. An event still pending in a stream is released by the runtime once
    // the stream passes it.
    if (state.in_flight) {
      AbortLocked(absl::CancelledError(
          absl::StrCat("rank ", rank, "'s communicator was destroyed with a batch in flight")));
    }
  }
  if (state.post_event != nullptr) ReportIfError(cudaEventDestroy(state.post_event));
  state.post_event = nullptr;
  for (cudaEvent_t e : state.done_events) ReportIfError(cudaEventDestroy(e));
  state.done_events.clear();
}

}  // namespace ringattn
