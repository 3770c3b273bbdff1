// The ring's transports by name, so that callers pick one with a string (a flag, a request, a
// config) and make its communicators here, without laddering over names or testing the build's
// options. Host transports (Communicator, host memory): "inprocess", "gloo". Device transports
// (DeviceCommunicator, CUDA builds): "inprocess_device", and "nccl" in builds with NCCL.
//
// A transport registered here runs through the conformance suite (communicator_test.cc) with
// no further code: registering is how a new transport inherits the tests.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gloo/rendezvous/store.h"
#include "ring/transport/communicator.h"
#include "ringattn_config.h"

namespace ringattn {

class DeviceCommunicator;  // device_communicator.h

// What one rank needs to join a ring whose ranks are separate processes.
struct TransportJoin {
  int rank = 0;
  int world = 1;
  // Bounds the rendezvous and every later transfer or wait of the communicator.
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
  // Shared by every rank of the ring, its keys confined to this ring (the worker's coordinator
  // store, MakeFileStore over a fresh directory, a PrefixStore); used only while joining.
  std::shared_ptr<gloo::rendezvous::Store> store;
  // gloo: where this rank listens (GlooOptions::hostname, GlooOptions::interface).
  std::string hostname = "127.0.0.1";
  std::string interface;
};

// Where a transport's behaviour may vary within the contract of communicator.h and
// device_communicator.h; the conformance suite holds each transport to its own.
struct TransportTraits {
  // Peers blocked on an aborted or failed rank are released at once; otherwise they fail at
  // their own timeout (NCCL: a remote rank learns of it from its watchdog).
  bool abort_releases_peers = true;
  // The group fails as a whole: every rank's pending and later calls fail with the first
  // failure's status. Otherwise a peer sees only the lost connection (Unavailable, naming the
  // rank; gloo), and a rank that posts after the failure may wait out its own timeout.
  bool group_fails_as_a_whole = true;
  // A receive whose byte count differs from its send's fails with InvalidArgument on both
  // sides; otherwise the mismatch goes undetected (NCCL) and is the caller's bug.
  bool detects_size_mismatch = true;
  // A timeout names the peer that never posted its side.
  bool timeout_names_peer = true;
  // Device transports: rank r of a local group runs on GPU r (NCCL refuses two ranks on one
  // GPU); otherwise every rank runs on the GPU current at MakeLocalGroup.
  bool gpu_per_rank = false;
};

template <typename Comm>
struct Transport {
  std::string name;
  TransportTraits traits;
  // Joins one rank of a ring of processes; null for transports whose ranks must be threads of
  // one process. A device transport joins on the GPU current on the calling thread.
  std::function<absl::StatusOr<std::unique_ptr<Comm>>(const TransportJoin&)> join;
  // Every rank of a new ring in this process, rank r at index r, each to be driven by a thread
  // of its own (with its GPU current, traits.gpu_per_rank). Destroy them concurrently too, each
  // in its own thread: a healthy NCCL communicator's finalize waits for its peers'.
  std::function<absl::StatusOr<std::vector<std::unique_ptr<Comm>>>(
      int world, std::chrono::milliseconds timeout)>
      make_local_group;
};

template <typename Comm>
class TransportRegistry {
 public:
  // The transport called `name`; NotFound, naming the registered ones, otherwise. The pointer
  // stays valid for the life of the process.
  absl::StatusOr<const Transport<Comm>*> Find(std::string_view name) const;
  // Registered names, in registration order.
  std::vector<std::string> names() const;
  // AlreadyExists for a taken name; InvalidArgument without a name or make_local_group.
  absl::Status Register(Transport<Comm> transport);

  // Find, then the transport's join (FailedPrecondition for an in-process transport).
  absl::StatusOr<std::unique_ptr<Comm>> Join(std::string_view name,
                                             const TransportJoin& join) const;
  // Find, then the transport's make_local_group.
  absl::StatusOr<std::vector<std::unique_ptr<Comm>>> MakeLocalGroup(
      std::string_view name, int world, std::chrono::milliseconds timeout) const;

 private:
  mutable std::mutex mu_;
  std::deque<Transport<Comm>> transports_;  // a deque: Find's pointers survive Register
};

extern template class TransportRegistry<Communicator>;
// "inprocess" and "gloo".
TransportRegistry<Communicator>& HostTransports();

#if RINGATTN_HAVE_CUDA
extern template class TransportRegistry<DeviceCommunicator>;
// "inprocess_device", and "nccl" where built.
TransportRegistry<DeviceCommunicator>& DeviceTransports();
#endif

}  // namespace ringattn
