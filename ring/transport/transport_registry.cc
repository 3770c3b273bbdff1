#include "ring/transport/transport_registry.h"

#include <cstdio>
#include <cstdlib>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "gloo/rendezvous/hash_store.h"
#include "ring/transport/gloo_communicator.h"
#include "ring/transport/inprocess.h"
#include "ringattn_config.h"

#if RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "base/cuda_check.h"
#include "ring/transport/device_communicator.h"
#endif
#if RINGATTN_HAVE_NCCL
#include "absl/time/time.h"
#include "ring/transport/nccl_communicator.h"
#endif

namespace ringattn {
namespace {

template <typename Comm>
using MadeRank = absl::StatusOr<std::unique_ptr<Comm>>;

// Runs join_rank(r) for every rank in a thread of its own (a join returns once every rank has
// joined) and returns the communicators, rank r at index r, or the first error by rank order.
template <typename Comm>
absl::StatusOr<std::vector<std::unique_ptr<Comm>>> JoinInThreads(
    int world, const std::function<MadeRank<Comm>(int rank)>& join_rank) {
  if (world < 1) {
    return absl::InvalidArgumentError(absl::StrCat("a ring needs world >= 1, got ", world));
  }
  std::vector<MadeRank<Comm>> made;
  for (int r = 0; r < world; ++r) made.emplace_back(absl::UnknownError("rank did not run"));
  std::vector<std::thread> threads;
  threads.reserve(world);
  for (int r = 0; r < world; ++r) threads.emplace_back([&, r] { made[r] = join_rank(r); });
  for (std::thread& t : threads) t.join();
  std::vector<std::unique_ptr<Comm>> comms;
  for (MadeRank<Comm>& m : made) {
    if (!m.ok()) return m.status();
    comms.push_back(*std::move(m));
  }
  return comms;
}

// ---- gloo ------------------------------------------------------------------------------------

MadeRank<Communicator> JoinGloo(const TransportJoin& join) {
  GlooOptions options;
  options.hostname = join.hostname;
  options.interface = join.interface;
  options.timeout = join.timeout;
  options.key_prefix = "gloo";  // the store confines its keys to this ring
  RA_ASSIGN_OR_RETURN(std::unique_ptr<GlooCommunicator> comm,
                      GlooCommunicator::Create(join.rank, join.world, join.store, options));
  return std::unique_ptr<Communicator>(std::move(comm));
}

// Ranks as threads over loopback TCP, meeting in a store of their own.
absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> LocalGlooGroup(
    int world, std::chrono::milliseconds timeout) {
  auto store = std::make_shared<gloo::rendezvous::HashStore>();
  return JoinInThreads<Communicator>(world, [&](int rank) {
    return JoinGloo({.rank = rank, .world = world, .timeout = timeout, .store = store});
  });
}

// ---- nccl ------------------------------------------------------------------------------------

#if RINGATTN_HAVE_NCCL
// Rank 0 makes the unique id (NCCL's bootstrap root runs in its process) and passes it on
// through the store.
MadeRank<DeviceCommunicator> JoinNccl(const TransportJoin& join) {
  static constexpr char kIdKey[] = "nccl_unique_id";
  if (join.store == nullptr) {
    return absl::InvalidArgumentError("nccl needs a store to pass its unique id through");
  }
  std::string id;
  if (join.rank == 0) {
    RA_ASSIGN_OR_RETURN(id, NcclCommunicator::GetUniqueId());
    RA_RETURN_IF_ERROR(StoreSet(*join.store, kIdKey, std::vector<char>(id.begin(), id.end())));
  } else {
    RA_ASSIGN_OR_RETURN(const std::vector<char> bytes, StoreGet(*join.store, kIdKey, join.timeout));
    id.assign(bytes.begin(), bytes.end());
  }
  RA_ASSIGN_OR_RETURN(
      std::unique_ptr<NcclCommunicator> comm,
      NcclCommunicator::Create(join.rank, join.world, id, absl::FromChrono(join.timeout)));
  return std::unique_ptr<DeviceCommunicator>(std::move(comm));
}

// Rank r on GPU r, as threads of this process.
absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> LocalNcclGroup(
    int world, std::chrono::milliseconds timeout) {
  int devices = 0;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&devices));
  if (devices < world) {
    return absl::UnavailableError(absl::StrCat("a local nccl group of ", world, " ranks needs ",
                                               world, " GPUs (one rank per GPU), found ", devices));
  }
  auto store = std::make_shared<gloo::rendezvous::HashStore>();
  return JoinInThreads<DeviceCommunicator>(world, [&](int rank) -> MadeRank<DeviceCommunicator> {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(rank));
    return JoinNccl({.rank = rank, .world = world, .timeout = timeout, .store = store});
  });
}
#endif  // RINGATTN_HAVE_NCCL

// Registers a built-in transport; a failure is a bug in this file.
template <typename Comm>
void RegisterBuiltIn(TransportRegistry<Comm>& registry, Transport<Comm> transport) {
  const std::string name = transport.name;
  if (absl::Status s = registry.Register(std::move(transport)); !s.ok()) {
    std::fprintf(stderr, "registering the built-in transport '%s': %s\n", name.c_str(),
                 s.ToString().c_str());
    std::abort();
  }
}

}  // namespace

// ---- The registry ----------------------------------------------------------------------------

template <typename Comm>
absl::StatusOr<const Transport<Comm>*> TransportRegistry<Comm>::Find(std::string_view name) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> known;
  for (const Transport<Comm>& t : transports_) {
    if (t.name == name) return &t;
    known.push_back(t.name);
  }
  return absl::NotFoundError(absl::StrCat("no transport '", std::string(name),
                                          "' in this build; there are ",
                                          absl::StrJoin(known, ", ")));
}

template <typename Comm>
std::vector<std::string> TransportRegistry<Comm>::names() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> names;
  for (const Transport<Comm>& t : transports_) names.push_back(t.name);
  return names;
}

template <typename Comm>
absl::Status TransportRegistry<Comm>::Register(Transport<Comm> transport) {
  if (transport.name.empty() || !transport.make_local_group) {
    return absl::InvalidArgumentError(
        absl::StrCat("transport '", transport.name, "' needs a name and a make_local_group"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (const Transport<Comm>& t : transports_) {
    if (t.name == transport.name) {
      return absl::AlreadyExistsError(
          absl::StrCat("transport '", transport.name, "' is registered already"));
    }
  }
  transports_.push_back(std::move(transport));
  return absl::OkStatus();
}

template <typename Comm>
absl::StatusOr<std::unique_ptr<Comm>> TransportRegistry<Comm>::Join(
    std::string_view name, const TransportJoin& join) const {
  RA_ASSIGN_OR_RETURN(const Transport<Comm>* transport, Find(name));
  if (!transport->join) {
    return absl::FailedPreconditionError(
        absl::StrCat("transport '", std::string(name),
                     "' has its ranks as threads of one process: use MakeLocalGroup"));
  }
  return transport->join(join);
}

template <typename Comm>
absl::StatusOr<std::vector<std::unique_ptr<Comm>>> TransportRegistry<Comm>::MakeLocalGroup(
    std::string_view name, int world, std::chrono::milliseconds timeout) const {
  RA_ASSIGN_OR_RETURN(const Transport<Comm>* transport, Find(name));
  return transport->make_local_group(world, timeout);
}

template class TransportRegistry<Communicator>;

TransportRegistry<Communicator>& HostTransports() {
  static TransportRegistry<Communicator>* const registry = [] {
    auto* r = new TransportRegistry<Communicator>();
    RegisterBuiltIn<Communicator>(
        *r, {.name = "inprocess", .make_local_group = &InProcessGroup::CreateCommunicators});
    RegisterBuiltIn<Communicator>(*r, {.name = "gloo",
                                       .traits = {.group_fails_as_a_whole = false},
                                       .join = &JoinGloo,
                                       .make_local_group = &LocalGlooGroup});
    return r;
  }();
  return *registry;
}

#if RINGATTN_HAVE_CUDA
template class TransportRegistry<DeviceCommunicator>;

TransportRegistry<DeviceCommunicator>& DeviceTransports() {
  static TransportRegistry<DeviceCommunicator>* const registry = [] {
    auto* r = new TransportRegistry<DeviceCommunicator>();
    RegisterBuiltIn<DeviceCommunicator>(
        *r, {.name = "inprocess_device",
             .make_local_group = &InProcessDeviceGroup::CreateCommunicators});
#if RINGATTN_HAVE_NCCL
    RegisterBuiltIn<DeviceCommunicator>(*r, {.name = "nccl",
                                             .traits = {.abort_releases_peers = false,
                                                        .group_fails_as_a_whole = false,
                                                        .detects_size_mismatch = false,
                                                        .timeout_names_peer = false,
                                                        .gpu_per_rank = true},
                                             .join = &JoinNccl,
                                             .make_local_group = &LocalNcclGroup});
#endif
    return r;
  }();
  return *registry;
}
#endif  // RINGATTN_HAVE_CUDA

}  // namespace ringattn
