#include "ring/transport/gloo_communicator.h"

#include <signal.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <filesystem>
#include <mutex>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "gloo/common/error.h"
#include "gloo/common/logging.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/file_store.h"
#include "gloo/rendezvous/prefix_store.h"
#include "gloo/transport/tcp/attr.h"
#include "gloo/transport/tcp/device.h"
#include "gloo/transport/unbound_buffer.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Gloo slot layout. A Gloo send matches the receive with the same slot between the same pair,
// first in first out, so both sides must compute the same slot for a transfer from what they
// both know:
//   bits 62-63  kind: the payload, or the byte count one side sends the other
//   bit  61     direction: 1 when the sender has the lower rank, so that A->B and B->A
//               transfers never share a slot
//   bits 40-60  the transfer's index among those from sender to receiver (wraps around; FIFO
//               order within a slot keeps a wrapped index correct)
//   bits 0-39   payload slots only: the byte count. A mismatched receive then never matches
//               at the Gloo level, so Gloo never writes past the receiver's buffer (its TCP
//               thread would die on the check); the byte-count messages report the mismatch.
enum class SlotKind : uint64_t { kPayload = 0, kCountFromSender = 1, kCountFromReceiver = 2 };
constexpr int kIndexShift = 40;
constexpr uint64_t kIndexMask = (uint64_t{1} << 21) - 1;
constexpr uint64_t kMaxBytes = (uint64_t{1} << kIndexShift) - 1;

uint64_t Slot(SlotKind kind, int sender, int receiver, uint64_t index, size_t bytes) {
  const uint64_t direction = sender < receiver ? 1 : 0;
  return (static_cast<uint64_t>(kind) << 62) | (direction << 61) |
         ((index & kIndexMask) << kIndexShift) |
         (kind == SlotKind::kPayload ? static_cast<uint64_t>(bytes) : 0);
}

// Runs `fn`, turning whatever Gloo throws into a status prefixed with `what`. Gloo reports
// broken or closed connections and its own timeouts as IoException.
template <typename Fn>
absl::Status CallGloo(const std::string& what, Fn&& fn) {
  try {
    fn();
    return absl::OkStatus();
  } catch (const gloo::IoException& e) {
    return absl::UnavailableError(absl::StrCat(what, ": ", e.what()));
  } catch (const gloo::EnforceNotMet& e) {
    return absl::InternalError(absl::StrCat(what, ": Gloo check failed: ", e.what()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what()));
  } catch (...) {
    return absl::InternalError(absl::StrCat(what, ": unknown exception from Gloo"));
  }
}

// Gloo signals a store or connect timeout as an IoException like any other I/O error: a failure
// once `timeout` has passed since `start` is that timeout.
absl::Status TimeoutIfLate(const absl::Status& status, Clock::time_point start,
                           milliseconds timeout) {
  if (status.ok() || Clock::now() - start < timeout) return status;
  return absl::DeadlineExceededError(
      absl::StrCat(status.message(), " (gave up after ", timeout.count(), " ms)"));
}

// Gloo's waits take a relative timeout; -1 would mean "the context default", so never go
// below zero. Rounded up so that a wait that times out has really reached the deadline.
milliseconds TimeLeft(Clock::time_point deadline) {
  const auto left = std::chrono::ceil<milliseconds>(deadline - Clock::now());
  return std::max(left, milliseconds::zero());
}

// Beyond CheckBatch: the byte count must fit a payload slot.
absl::Status CheckFitsSlot(int rank, size_t bytes, const char* kind, size_t i) {
  if (bytes <= kMaxBytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("rank ", rank, ": ", kind, " ", i, " of ", bytes,
                                                 " bytes exceeds the Gloo transport's ", kMaxBytes,
                                                 "-byte limit per transfer"));
}

// Meets the other ranks in `store` and connects to each of them. Throws what Gloo throws; call
// it through CallGloo.
std::shared_ptr<gloo::Context> ConnectMesh(int rank, int world, gloo::rendezvous::Store& store,
                                           const GlooOptions& options) {
  gloo::rendezvous::PrefixStore prefixed(options.key_prefix, store);
  // Gloo's own rendezvous reads some keys with the store's fixed 30 s default timeout, so
  // first wait, under our timeout, until every rank has arrived.
  prefixed.set(absl::StrCat("joined_", rank), {'1'});
  std::vector<std::string> everyone;
  for (int r = 0; r < world; ++r) everyone.push_back(absl::StrCat("joined_", r));
  prefixed.wait(everyone, options.timeout);

  gloo::transport::tcp::attr attr;
  if (options.interface.empty()) {
    attr.hostname = options.hostname;
  } else {
    attr.iface = options.interface;
  }
  std::shared_ptr<gloo::transport::Device> device = gloo::transport::tcp::CreateDevice(attr);
  auto context = std::make_shared<gloo::rendezvous::Context>(rank, world);
  context->setTimeout(options.timeout);
  context->connectFullMesh(prefixed, device);
  return context;
}

}  // namespace

// One transfer between this rank and another, as this rank sees it.
struct GlooCommunicator::Transfer {
  bool is_send = false;
  int peer = 0;
  uint64_t index = 0;
  size_t bytes = 0;
  void* data = nullptr;     // a send's buffer too: Gloo takes void* but only reads it for sends
  uint64_t my_count = 0;    // `bytes`, sent to the peer
  uint64_t peer_count = 0;  // the peer's byte count for this transfer
  std::unique_ptr<gloo::transport::UnboundBuffer> my_count_buf;
  std::unique_ptr<gloo::transport::UnboundBuffer> peer_count_buf;
  std::unique_ptr<gloo::transport::UnboundBuffer> payload_buf;

  std::string Describe(int rank) const {
    return is_send ? absl::StrCat("rank ", rank, "'s send #", index, " (", bytes,
                                  " bytes) to rank ", peer)
                   : absl::StrCat("rank ", rank, "'s receive #", index, " (", bytes,
                                  " bytes) from rank ", peer);
  }
};

struct GlooCommunicator::Batch {
  // unique_ptr: the byte-count words must stay put while Gloo holds their addresses.
  std::vector<std::unique_ptr<Transfer>> transfers;
};

absl::StatusOr<std::shared_ptr<gloo::rendezvous::Store>> MakeFileStore(const std::string& path) {
  std::error_code ec;
  if (path.empty() || !std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("file store path '", path, "' is not an existing directory"));
  }
  std::shared_ptr<gloo::rendezvous::Store> store;
  RA_RETURN_IF_ERROR(CallGloo(absl::StrCat("opening file store '", path, "'"), [&] {
    store = std::make_shared<gloo::rendezvous::FileStore>(path);
  }));
  return store;
}

absl::Status StoreSet(gloo::rendezvous::Store& store, const std::string& key,
                      const std::vector<char>& value) {
  return CallGloo(absl::StrCat("setting '", key, "' in the store"), [&] { store.set(key, value); });
}

absl::StatusOr<std::vector<char>> StoreGet(gloo::rendezvous::Store& store, const std::string& key,
                                           milliseconds timeout) {
  const Clock::time_point start = Clock::now();
  std::vector<char> value;
  const absl::Status got = CallGloo(absl::StrCat("getting '", key, "' from the store"), [&] {
    store.wait({key}, timeout);
    value = store.get(key);
  });
  RA_RETURN_IF_ERROR(TimeoutIfLate(got, start, timeout));
  return value;
}

absl::StatusOr<std::unique_ptr<GlooCommunicator>> GlooCommunicator::Create(
    int rank, int world, std::shared_ptr<gloo::rendezvous::Store> store,
    const GlooOptions& options) {
  // Gloo's TCP pairs write with plain writev, so a peer that closed its connection (an aborted
  // or dead rank) raises SIGPIPE, which would kill this process instead of failing the write;
  // seen once as a worker_test death under load. Ignore it process-wide, once.
  static std::once_flag sigpipe_once;
  std::call_once(sigpipe_once, [] { signal(SIGPIPE, SIG_IGN); });
  if (world < 1 || rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(
        absl::StrCat("Gloo ring needs 0 <= rank < world, got rank ", rank, " of ", world));
  }
  if (store == nullptr) return absl::InvalidArgumentError("Gloo ring needs a store, got null");
  if (options.timeout <= milliseconds::zero()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Gloo ring needs a positive timeout, got ", options.timeout.count(), " ms"));
  }
  const std::string what =
      absl::StrCat("rank ", rank, " of ", world, " joining Gloo ring '", options.key_prefix, "'");
  const Clock::time_point start = Clock::now();
  std::shared_ptr<gloo::Context> context;
  absl::Status joined =
      CallGloo(what, [&] { context = ConnectMesh(rank, world, *store, options); });
  RA_RETURN_IF_ERROR(TimeoutIfLate(joined, start, options.timeout));
  return std::unique_ptr<GlooCommunicator>(
      new GlooCommunicator(rank, world, options.timeout, std::move(context)));
}

GlooCommunicator::GlooCommunicator(int rank, int world, milliseconds timeout,
                                   std::shared_ptr<gloo::Context> context)
    : rank_(rank),
      world_(world),
      timeout_(timeout),
      context_(std::move(context)),
      sends_posted_(world, 0),
      recvs_posted_(world, 0) {}

GlooCommunicator::~GlooCommunicator() {
  std::lock_guard<std::mutex> lock(mu_);
  if (batch_ == nullptr) return;
  // The caller's buffers go with us; closing the connections stops Gloo from touching them
  // and tells the peers at once.
  AbortLocked(absl::CancelledError(
      absl::StrCat("rank ", rank_, "'s communicator was destroyed with a batch in flight")));
  batch_.reset();
}

absl::Status GlooCommunicator::ValidateBatch(absl::Span<const SendOp> sends,
                                             absl::Span<const RecvOp> recvs) const {
  RA_RETURN_IF_ERROR(CheckBatch(rank_, world_, sends, recvs));
  std::vector<size_t> self_sends;
  std::vector<size_t> self_recvs;
  for (size_t i = 0; i < sends.size(); ++i) {
    RA_RETURN_IF_ERROR(CheckFitsSlot(rank_, sends[i].bytes, "send", i));
    if (sends[i].peer == rank_) self_sends.push_back(sends[i].bytes);
  }
  for (size_t i = 0; i < recvs.size(); ++i) {
    RA_RETURN_IF_ERROR(CheckFitsSlot(rank_, recvs[i].bytes, "receive", i));
    if (recvs[i].peer == rank_) self_recvs.push_back(recvs[i].bytes);
  }
  // Gloo has no connection to self; such transfers are copied here, within the batch.
  if (self_sends.size() != self_recvs.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank_, ": a batch must pair its transfers to self (",
                     self_sends.size(), " sends, ", self_recvs.size(), " receives)"));
  }
  for (size_t k = 0; k < self_sends.size(); ++k) {
    if (self_sends[k] != self_recvs[k]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "byte count mismatch: rank ", rank_, "'s send #", k, " to itself is ", self_sends[k],
          " bytes but its receive #", k, " from itself is ", self_recvs[k], " bytes"));
    }
  }
  return absl::OkStatus();
}

void GlooCommunicator::CopySelfTransfers(absl::Span<const SendOp> sends,
                                         absl::Span<const RecvOp> recvs) const {
  auto next_recv = recvs.begin();
  for (const SendOp& s : sends) {
    if (s.peer != rank_) continue;
    while (next_recv->peer != rank_) ++next_recv;  // ValidateBatch paired them
    if (s.bytes > 0) std::memcpy(next_recv->data, s.data, s.bytes);
    ++next_recv;
  }
}

absl::Status GlooCommunicator::Start(absl::Span<const SendOp> sends,
                                     absl::Span<const RecvOp> recvs) {
  RA_RETURN_IF_ERROR(ValidateBatch(sends, recvs));
  std::lock_guard<std::mutex> lock(mu_);
  if (!abort_status_.ok()) return abort_status_;
  if (batch_ != nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("rank ", rank_, ": Start called while a batch is in flight; Wait first"));
  }
  CopySelfTransfers(sends, recvs);
  auto batch = std::make_shared<Batch>();
  const absl::Status posted = PostLocked(sends, recvs, *batch);
  batch_ = std::move(batch);  // even if posting failed: Abort must see what was posted
  if (!posted.ok()) {
    AbortLocked(posted);
    return abort_status_;
  }
  return absl::OkStatus();
}

absl::Status GlooCommunicator::PostLocked(absl::Span<const SendOp> sends,
                                          absl::Span<const RecvOp> recvs, Batch& batch) {
  auto post = [&](bool is_send, int peer, size_t bytes, void* data) -> absl::Status {
    if (peer == rank_) return absl::OkStatus();  // copied by CopySelfTransfers
    const uint64_t index = is_send ? sends_posted_[peer]++ : recvs_posted_[peer]++;
    if (bytes == 0) return absl::OkStatus();  // both sides skip it, so it carries nothing
    auto owned = std::make_unique<Transfer>();
    Transfer& t = *owned;
    batch.transfers.push_back(std::move(owned));
    t.is_send = is_send;
    t.peer = peer;
    t.index = index;
    t.bytes = bytes;
    t.data = data;
    t.my_count = bytes;
    const int sender = is_send ? rank_ : peer;
    const int receiver = is_send ? peer : rank_;
    const SlotKind mine = is_send ? SlotKind::kCountFromSender : SlotKind::kCountFromReceiver;
    const SlotKind theirs = is_send ? SlotKind::kCountFromReceiver : SlotKind::kCountFromSender;
    return CallGloo(absl::StrCat("posting ", t.Describe(rank_)), [&] {
      t.my_count_buf = context_->createUnboundBuffer(&t.my_count, sizeof(t.my_count));
      t.my_count_buf->send(peer, Slot(mine, sender, receiver, index, 0));
      t.peer_count_buf = context_->createUnboundBuffer(&t.peer_count, sizeof(t.peer_count));
      t.peer_count_buf->recv(peer, Slot(theirs, sender, receiver, index, 0));
      t.payload_buf = context_->createUnboundBuffer(data, bytes);
      const uint64_t slot = Slot(SlotKind::kPayload, sender, receiver, index, bytes);
      if (is_send) {
        t.payload_buf->send(peer, slot);
      } else {
        t.payload_buf->recv(peer, slot);
      }
    });
  };
  for (const SendOp& s : sends) {
    RA_RETURN_IF_ERROR(post(true, s.peer, s.bytes, const_cast<void*>(s.data)));
  }
  for (const RecvOp& r : recvs) RA_RETURN_IF_ERROR(post(false, r.peer, r.bytes, r.data));
  return absl::OkStatus();
}

namespace {

// Waits for one Gloo operation. A wait that Abort woke returns `aborted` (the abort reason,
// read only then).
template <typename AbortStatusFn>
absl::Status WaitForOp(gloo::transport::UnboundBuffer& buf, bool is_send,
                       Clock::time_point deadline, const std::string& what, milliseconds timeout,
                       AbortStatusFn aborted) {
  bool completed = false;
  absl::Status status = CallGloo(what, [&] {
    completed = is_send ? buf.waitSend(TimeLeft(deadline)) : buf.waitRecv(TimeLeft(deadline));
  });
  if (!status.ok()) {
    // Gloo reports its timeout as an IoException too (and closes every connection of this
    // rank, which releases the peers); tell it apart by the clock.
    if (Clock::now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat(what, ": timed out after ", timeout.count(), " ms"));
    }
    if (status.code() == absl::StatusCode::kUnavailable) {
      return absl::UnavailableError(absl::StrCat(
          status.message(), " (the connection was lost: the peer aborted, failed or exited)"));
    }
    return status;
  }
  if (!completed) return aborted();
  return absl::OkStatus();
}

}  // namespace

absl::Status GlooCommunicator::WaitForByteCounts(const Batch& batch, Clock::time_point deadline) {
  auto aborted = [this] { return abort_status(); };
  for (const auto& t : batch.transfers) {
    const std::string what =
        absl::StrCat(t->Describe(rank_), ": waiting for rank ", t->peer, " to post its side");
    RA_RETURN_IF_ERROR(WaitForOp(*t->my_count_buf, true, deadline, what, timeout_, aborted));
    RA_RETURN_IF_ERROR(WaitForOp(*t->peer_count_buf, false, deadline, what, timeout_, aborted));
  }
  return absl::OkStatus();
}

absl::Status GlooCommunicator::CheckByteCounts(const Batch& batch) const {
  for (const auto& t : batch.transfers) {
    if (t->peer_count == t->bytes) continue;
    // The same words on both sides of the pair.
    const int sender = t->is_send ? rank_ : t->peer;
    const int receiver = t->is_send ? t->peer : rank_;
    const uint64_t send_bytes = t->is_send ? t->bytes : t->peer_count;
    const uint64_t recv_bytes = t->is_send ? t->peer_count : t->bytes;
    return absl::InvalidArgumentError(
        absl::StrCat("byte count mismatch: rank ", sender, "'s send #", t->index, " to rank ",
                     receiver, " is ", send_bytes, " bytes but rank ", receiver, "'s receive #",
                     t->index, " from rank ", sender, " is ", recv_bytes, " bytes"));
  }
  return absl::OkStatus();
}

absl::Status GlooCommunicator::WaitForPayloads(const Batch& batch, Clock::time_point deadline) {
  auto aborted = [this] { return abort_status(); };
  for (const auto& t : batch.transfers) {
    RA_RETURN_IF_ERROR(
        WaitForOp(*t->payload_buf, t->is_send, deadline, t->Describe(rank_), timeout_, aborted));
  }
  return absl::OkStatus();
}

absl::Status GlooCommunicator::Wait() {
  std::shared_ptr<const Batch> batch;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!abort_status_.ok()) return abort_status_;
    batch = batch_;
  }
  if (batch == nullptr) return absl::OkStatus();
  const Clock::time_point deadline = Clock::now() + timeout_;
  // Every byte count is in before any is judged: on a mismatch both sides of the pair then
  // have what they need to report it before this rank's abort closes the connection.
  absl::Status status = WaitForByteCounts(*batch, deadline);
  if (status.ok()) status = CheckByteCounts(*batch);
  if (status.ok()) status = WaitForPayloads(*batch, deadline);
  std::lock_guard<std::mutex> lock(mu_);
  // Aborting also closes the connections, so no transfer still in progress for the batch can
  // touch the caller's buffers after this returns.
  if (!status.ok()) AbortLocked(status);
  batch_.reset();
  return abort_status_;
}

void GlooCommunicator::Abort(const absl::Status& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  AbortLocked(reason);
}

void GlooCommunicator::AbortLocked(const absl::Status& reason) {
  if (!abort_status_.ok()) return;  // the first reason sticks
  abort_status_ =
      reason.ok() ? absl::AbortedError(absl::StrCat("rank ", rank_, " aborted (with an OK reason)"))
                  : reason;
  aborted_.store(true, std::memory_order_release);
  // Close first: once a woken Wait returns, Gloo's thread must no longer write into or read
  // from the batch's buffers. Peers blocked on this rank see the connection drop.
  CallGloo("closing connections", [&] { context_->closeConnections(); }).IgnoreError();
  if (batch_ == nullptr) return;
  // Wake this rank's Wait, wherever it is blocked; a wait not yet begun returns at once.
  for (const auto& t : batch_->transfers) {
    if (t->my_count_buf) t->my_count_buf->abortWaitSend();
    if (t->peer_count_buf) t->peer_count_buf->abortWaitRecv();
    if (t->payload_buf) {
      if (t->is_send) {
        t->payload_buf->abortWaitSend();
      } else {
        t->payload_buf->abortWaitRecv();
      }
    }
  }
}

absl::Status GlooCommunicator::abort_status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return abort_status_;
}

}  // namespace ringattn
