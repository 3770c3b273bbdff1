// The ring's transport interface: batched, non-blocking point-to-point transfers between the
// ranks of a fixed group. Implementations: in-process (ranks as threads), Gloo TCP (CPU
// processes), NCCL (GPUs). Nothing here knows about gRPC or attention.
#pragma once

#include <atomic>
#include <cstddef>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "base/memory_space.h"

namespace ringattn {

struct SendOp {
  int peer;
  const void* data;
  size_t bytes;
};

struct RecvOp {
  int peer;
  void* data;
  size_t bytes;
};

// One rank of a fixed group of ranks that trade bytes: what the host interface (Communicator,
// below) and the device one (DeviceCommunicator, device_communicator.h) share.
class GroupRank {
 public:
  virtual ~GroupRank() = default;
  GroupRank() = default;
  GroupRank(const GroupRank&) = delete;
  GroupRank& operator=(const GroupRank&) = delete;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;

  // Fails pending and later operations with `reason` and releases peers blocked on this rank
  // where the transport can. Idempotent; the first reason sticks. Any thread may call it.
  virtual void Abort(const absl::Status& reason) = 0;
};

// Transfers the host waits for (Start, then Wait), of buffers in memory_space().
class Communicator : public GroupRank {
 public:
  // Where the buffers handed to Start must live.
  virtual MemorySpace memory_space() const = 0;

  // Posts a batch of sends and receives and returns without waiting for them. Transfers
  // between one pair of ranks match in the order they were posted, and a receive's byte count
  // must equal its matching send's (InvalidArgument otherwise). Zero-byte operations carry
  // nothing and complete at once; both sides must agree on sizes, which the ring does because
  // every rank knows every shard's size. Buffers must stay untouched until Wait returns. One
  // batch in flight at a time: a second Start before Wait is FailedPrecondition.
  virtual absl::Status Start(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs) = 0;

  // Waits for the batch posted by Start. DeadlineExceeded past the communicator's timeout,
  // Aborted (or the abort reason) when the group was aborted; after any failure the
  // communicator is aborted and every later call fails at once. Waiting with nothing posted
  // returns OK, or the abort reason once aborted.
  virtual absl::Status Wait() = 0;

  // Set once this rank is aborted (Abort, a failed Wait; in-process, any rank of the group) and
  // never cleared: work between transfers, a ring step's kernel, polls it to stop early (Wait
  // then gives the reason). Lives as long as the communicator; any thread may read it.
  virtual const std::atomic<bool>& aborted() const = 0;
};

// InvalidArgument unless every operation names a peer in [0, world) and has a buffer when it
// carries bytes: what every transport checks before posting anything, so that a malformed batch
// changes nothing.
absl::Status CheckBatch(int rank, int world, absl::Span<const SendOp> sends,
                        absl::Span<const RecvOp> recvs);

// Start followed by Wait.
inline absl::Status Exchange(Communicator& comm, absl::Span<const SendOp> sends,
                             absl::Span<const RecvOp> recvs) {
  absl::Status s = comm.Start(sends, recvs);
  if (!s.ok()) return s;
  return comm.Wait();
}

}  // namespace ringattn
