// A Communicator over Gloo's TCP transport, for ranks in separate processes (or hosts).
//
// Ranks meet through a gloo::rendezvous::Store (a shared directory with MakeFileStore, or any
// other store), then talk over a full mesh of TCP connections. Each transfer is a pair of Gloo
// unbound-buffer operations on a slot that both sides derive from the same numbers: the
// direction, the transfer's position among those between the pair, and its byte count. On top
// of that the two sides trade their byte counts in two 8-byte messages, so that a mismatch is
// reported as InvalidArgument on both sides instead of a timeout, and a sender never writes
// more than its receiver's buffer holds.
//
// Gloo has no communicator abort: Abort here closes every connection of this rank (peers
// blocked on it fail at once with Unavailable naming it) and wakes this rank's own Wait. A
// peer's abort, crash or exit therefore shows up as Unavailable, not as its abort reason.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "gloo/context.h"
#include "gloo/rendezvous/store.h"
#include "ring/transport/communicator.h"

namespace ringattn {

struct GlooOptions {
  // Address this rank listens on: a hostname or IP that peers can reach. Ignored when
  // `interface` is set.
  std::string hostname = "127.0.0.1";
  // Network interface to listen on (e.g. "eth0"); empty means use `hostname`.
  std::string interface;
  // Bounds the rendezvous and each Wait; past it Wait returns DeadlineExceeded.
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
  // Namespace for this ring's keys in the store, so that several rings (or several runs with
  // different prefixes) can share one store. Every rank of a ring must use the same prefix.
  std::string key_prefix = "ringattn";
};

// A gloo::rendezvous::FileStore over the directory `path`, which must exist and be visible to
// every rank (a local temp dir for one host, a shared file system across hosts). FileStore is
// not thread-safe: make one per rank, even when the ranks are threads of one process. A key can
// be written only once, so reuse a directory only with a fresh GlooOptions::key_prefix.
absl::StatusOr<std::shared_ptr<gloo::rendezvous::Store>> MakeFileStore(const std::string& path);

// A store's calls without exceptions (gloo::rendezvous::Store throws), for whatever else ranks
// trade through it (the NCCL unique id). Unavailable for a failed call; StoreGet waits up to
// `timeout` for the key (DeadlineExceeded past it).
absl::Status StoreSet(gloo::rendezvous::Store& store, const std::string& key,
                      const std::vector<char>& value);
absl::StatusOr<std::vector<char>> StoreGet(gloo::rendezvous::Store& store, const std::string& key,
                                           std::chrono::milliseconds timeout);

class GlooCommunicator final : public Communicator {
 public:
  // Joins ring `options.key_prefix` as `rank` of `world` and connects to every other rank;
  // blocks until all `world` ranks have joined or `options.timeout` passes. The store is used
  // only during Create. Errors: InvalidArgument for bad arguments, DeadlineExceeded when the
  // others don't show up in time, Unavailable for other rendezvous or connection failures.
  static absl::StatusOr<std::unique_ptr<GlooCommunicator>> Create(
      int rank, int world, std::shared_ptr<gloo::rendezvous::Store> store,
      const GlooOptions& options);

  // Aborts a batch still in flight (peers waiting on it fail at once), then disconnects.
  ~GlooCommunicator() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }

  // Transfers to or from this rank itself are copied locally; in one batch, the k-th such
  // send pairs with the k-th such receive, and their counts must match (InvalidArgument
  // otherwise). A malformed batch (bad peer, null buffer, unpaired self-transfer) is rejected
  // before anything is posted and changes nothing; a transport failure aborts.
  absl::Status Start(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs) override;
  // The timeout counts from the call. Unavailable when a connection fails (the peer aborted,
  // died or closed); every failure aborts this communicator.
  absl::Status Wait() override;
  void Abort(const absl::Status& reason) override;
  const std::atomic<bool>& aborted() const override { return aborted_; }

 private:
  struct Transfer;
  struct Batch;

  GlooCommunicator(int rank, int world, std::chrono::milliseconds timeout,
                   std::shared_ptr<gloo::Context> context);

  absl::Status ValidateBatch(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs) const;
  // Copies the transfers to self, which ValidateBatch has paired up.
  void CopySelfTransfers(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs) const;
  // Numbers the batch's transfers and posts them to Gloo.
  absl::Status PostLocked(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs,
                          Batch& batch);
  // The three phases of Wait: trade byte counts, compare them, move the payloads.
  absl::Status WaitForByteCounts(const Batch& batch,
                                 std::chrono::steady_clock::time_point deadline);
  absl::Status CheckByteCounts(const Batch& batch) const;
  absl::Status WaitForPayloads(const Batch& batch, std::chrono::steady_clock::time_point deadline);
  void AbortLocked(const absl::Status& reason);
  absl::Status abort_status() const;  // takes mu_

  const int rank_;
  const int world_;
  const std::chrono::milliseconds timeout_;
  // Declared before batch_: the batch's Gloo buffers go first.
  const std::shared_ptr<gloo::Context> context_;
  // Transfers posted so far per peer, in each direction (zero-byte ones included), which
  // number the next transfer identically on both sides.
  std::vector<uint64_t> sends_posted_;
  std::vector<uint64_t> recvs_posted_;

  // The *Locked functions need mu_ held. std::mutex rather than absl::Mutex: the prebuilt
  // Abseil is invisible to ThreadSanitizer, pthread-based locks are not.
  mutable std::mutex mu_;
  // Guarded by mu_:
  absl::Status abort_status_;
  // Set with abort_status_; read without the lock.
  std::atomic<bool> aborted_{false};
  // The batch in flight, if any. Shared so that Wait can use it without the lock while Abort,
  // from another thread, wakes its buffers.
  std::shared_ptr<const Batch> batch_;
};

}  // namespace ringattn
