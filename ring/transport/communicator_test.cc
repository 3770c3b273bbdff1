// Tests of the ring transports.
//
// TransportConformance holds every registered transport, host and device, to the contract of
// communicator.h and device_communicator.h, within the latitude its TransportTraits declare: a
// transport registered in transport_registry.cc runs here with no further code. A device
// transport is driven through host buffers staged on its rank's stream; its cases skip
// without a GPU (and NCCL's where there are fewer GPUs than ranks). Then come the tests of what
// is one transport's own (the in-process group's arguments; Gloo across processes, over file
// stores, through connection loss) and of the registry itself.
#include "ring/transport/communicator.h"

#include <atomic>
#include <signal.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "ring/transport/gloo_communicator.h"
#include "ring/transport/inprocess.h"
#include "ring/transport/transport_registry.h"
#include "ringattn_config.h"

#if RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "ring/transport/device_communicator.h"
#endif

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr milliseconds kLongTimeout(30000);

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Runs fn(rank) on one thread per rank and returns each rank's status.
std::vector<absl::Status> RunRanks(int world, const std::function<absl::Status(int)>& fn) {
  std::vector<absl::Status> results(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] { results[r] = fn(r); });
  }
  for (std::thread& t : threads) t.join();
  return results;
}

// A deterministic byte pattern per message, so a misrouted or misordered message shows.
std::vector<uint8_t> Pattern(int seed, size_t bytes) {
  std::vector<uint8_t> v(bytes);
  for (size_t i = 0; i < bytes; ++i) v[i] = static_cast<uint8_t>(seed * 131 + i * 7 + 13);
  return v;
}

// ---- The ranks under test -------------------------------------------------------------------

// One rank of the transport under test as the suite drives it: host buffers in and out,
// whatever memory the transport carries.
class Rank {
 public:
  virtual ~Rank() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // Posts a batch of host buffers.
  virtual absl::Status Start(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs) = 0;
  // Ends it: the received bytes are in the buffers given to Start once it returns OK.
  virtual absl::Status Wait() = 0;
  virtual void Abort(const absl::Status& reason) = 0;
  // Communicator::aborted() of a host transport; null for a device one (it has none).
  virtual const std::atomic<bool>* aborted() const = 0;
};
using Ranks = std::vector<std::unique_ptr<Rank>>;

absl::Status Exchange(Rank& rank, absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs) {
  absl::Status s = rank.Start(sends, recvs);
  if (!s.ok()) return s;
  return rank.Wait();
}

class HostRank final : public Rank {
 public:
  explicit HostRank(std::unique_ptr<Communicator> comm) : comm_(std::move(comm)) {}
  int rank() const override { return comm_->rank(); }
  int world_size() const override { return comm_->world_size(); }
  absl::Status Start(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs) override {
    EXPECT_EQ(comm_->memory_space(), MemorySpace::kHost);
    return comm_->Start(sends, recvs);
  }
  absl::Status Wait() override { return comm_->Wait(); }
  void Abort(const absl::Status& reason) override { comm_->Abort(reason); }
  const std::atomic<bool>* aborted() const override { return &comm_->aborted(); }

 private:
  std::unique_ptr<Communicator> comm_;
};

#if RINGATTN_HAVE_CUDA
// Start stages the sends into device memory and enqueues the batch on the rank's stream (the
// in-process device transport blocks there until the batch is matched); Wait is WaitStream,
// then the received bytes go back to the host. Device buffers are stream-ordered allocations,
// freed on the stream behind the transfers.
class DeviceRank final : public Rank {
 public:
  static absl::StatusOr<std::unique_ptr<Rank>> Create(std::unique_ptr<DeviceCommunicator> comm,
                                                      int device) {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    cudaStream_t stream = nullptr;
    RA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    return std::unique_ptr<Rank>(new DeviceRank(std::move(comm), device, stream));
  }
  ~DeviceRank() override {
    EXPECT_EQ(cudaSetDevice(device_), cudaSuccess);
    (void)comm_->WaitStream(stream_, comm_->timeout());  // drained, whatever the group's state
    FreeStaged();
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    EXPECT_EQ(cudaStreamDestroy(stream_), cudaSuccess);
  }

  int rank() const override { return comm_->rank(); }
  int world_size() const override { return comm_->world_size(); }

  absl::Status Start(absl::Span<const SendOp> sends, absl::Span<const RecvOp> recvs) override {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    std::vector<SendOp> device_sends;
    std::vector<RecvOp> device_recvs;
    for (const SendOp& s : sends) {
      void* d = nullptr;
      RA_RETURN_IF_ERROR(Stage(s.data, s.bytes, &d));
      if (d != nullptr) {
        RA_CUDA_RETURN_IF_ERROR(
            cudaMemcpyAsync(d, s.data, s.bytes, cudaMemcpyHostToDevice, stream_));
      }
      device_sends.push_back({s.peer, d, s.bytes});
    }
    for (const RecvOp& r : recvs) {
      void* d = nullptr;
      RA_RETURN_IF_ERROR(Stage(r.data, r.bytes, &d));
      if (d != nullptr) landing_.push_back({r.data, d, r.bytes});
      device_recvs.push_back({r.peer, d, r.bytes});
    }
    absl::Status s = comm_->Enqueue(device_sends, device_recvs, stream_);
    if (!s.ok()) {
      landing_.clear();
      FreeStaged();
    }
    return s;
  }

  absl::Status Wait() override {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    absl::Status s = comm_->WaitStream(stream_, comm_->timeout());
    for (const Landing& l : landing_) {
      if (!s.ok()) break;
      s = CudaCall(cudaMemcpyAsync(l.host, l.device, l.bytes, cudaMemcpyDeviceToHost, stream_));
    }
    landing_.clear();
    FreeStaged();
    if (s.ok()) s = CudaCall(cudaStreamSynchronize(stream_));
    return s;
  }

  void Abort(const absl::Status& reason) override { comm_->Abort(reason); }
  const std::atomic<bool>* aborted() const override { return nullptr; }

 private:
  struct Landing {
    void* host;
    const void* device;
    size_t bytes;
  };

  DeviceRank(std::unique_ptr<DeviceCommunicator> comm, int device, cudaStream_t stream)
      : comm_(std::move(comm)), device_(device), stream_(stream) {}

  static absl::Status CudaCall(cudaError_t e) {
    RA_CUDA_RETURN_IF_ERROR(e);
    return absl::OkStatus();
  }

  // A device buffer for `bytes` on the stream; null where the host buffer is null or empty, so
  // that malformed and zero-byte operations reach the transport as they came.
  absl::Status Stage(const void* host, size_t bytes, void** device) {
    *device = nullptr;
    if (host == nullptr || bytes == 0) return absl::OkStatus();
    RA_CUDA_RETURN_IF_ERROR(cudaMallocAsync(device, bytes, stream_));
    staged_.push_back(*device);
    return absl::OkStatus();
  }

  void FreeStaged() {
    for (void* d : staged_) EXPECT_EQ(cudaFreeAsync(d, stream_), cudaSuccess);
    staged_.clear();
  }

  std::unique_ptr<DeviceCommunicator> comm_;
  const int device_;
  const cudaStream_t stream_;
  std::vector<void*> staged_;     // device buffers of the batch in flight
  std::vector<Landing> landing_;  // where its receives go on the host
};

int CudaDevices() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}
#endif  // RINGATTN_HAVE_CUDA

// ---- The conformance suite ------------------------------------------------------------------

struct TransportCase {
  std::string name;
  bool device = false;
};

std::vector<TransportCase> RegisteredTransports() {
  std::vector<TransportCase> cases;
  for (const std::string& name : HostTransports().names()) cases.push_back({name, false});
#if RINGATTN_HAVE_CUDA
  for (const std::string& name : DeviceTransports().names()) cases.push_back({name, true});
#endif
  return cases;
}

class TransportConformance : public ::testing::TestWithParam<TransportCase> {
 protected:
  void TearDown() override { Destroy(); }

  const TransportTraits& traits() const { return traits_; }
  bool device() const { return GetParam().device; }

  // Makes ranks_, a new local group of `world` ranks; false when the test was skipped (a
  // device transport without the GPUs it needs) or failed.
  bool Make(int world, milliseconds timeout) {
    Destroy();
    const std::string& name = GetParam().name;
    if (!device()) {
      absl::StatusOr<const Transport<Communicator>*> t = HostTransports().Find(name);
      if (!t.ok()) return Fail(t.status());
      traits_ = (*t)->traits;
      absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> comms =
          (*t)->make_local_group(world, timeout);
      if (!comms.ok()) return Fail(comms.status());
      for (auto& c : *comms) ranks_.push_back(std::make_unique<HostRank>(std::move(c)));
      return true;
    }
#if RINGATTN_HAVE_CUDA
    absl::StatusOr<const Transport<DeviceCommunicator>*> t = DeviceTransports().Find(name);
    if (!t.ok()) return Fail(t.status());
    traits_ = (*t)->traits;
    const int gpus = CudaDevices();
    if (gpus == 0) return Skip("no CUDA device");
    if (traits_.gpu_per_rank && gpus < world) {
      return Skip(absl::StrCat(world, " ranks need ", world, " GPUs, found ", gpus));
    }
    absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> comms =
        (*t)->make_local_group(world, timeout);
    if (!comms.ok()) return Fail(comms.status());
    for (int r = 0; r < world; ++r) {
      absl::StatusOr<std::unique_ptr<Rank>> rank =
          DeviceRank::Create(std::move((*comms)[r]), traits_.gpu_per_rank ? r : 0);
      if (!rank.ok()) return Fail(rank.status());
      ranks_.push_back(*std::move(rank));
    }
    return true;
#else
    return Fail(absl::InternalError("a device transport in a build without CUDA"));
#endif
  }

  // Destroys the ranks concurrently, each in its own thread (see make_local_group).
  void Destroy() {
    RunRanks(static_cast<int>(ranks_.size()), [&](int r) {
      ranks_[r].reset();
      return absl::OkStatus();
    });
    ranks_.clear();
  }

  // Each rank sends its block to rank + 1 and receives rank - 1's, `rounds` times; block sizes
  // differ per rank.
  absl::Status RingRounds(int r, int rounds);

  Ranks ranks_;

 private:
  bool Skip(const std::string& why) {
    SkipTest(why);
    return false;
  }
  static void SkipTest(const std::string& why) { GTEST_SKIP() << why; }
  bool Fail(const absl::Status& s) {
    ADD_FAILURE() << "making a local " << GetParam().name << " group: " << s;
    return false;
  }

  TransportTraits traits_;
};

// Each rank sends its block to rank + 1 and receives rank - 1's, `rounds` times; block sizes
// differ per rank. Comm: Rank, or Communicator for the Gloo tests below.
template <typename Comm>
absl::Status RingRounds(Comm& comm, int rounds) {
  const int world = comm.world_size();
  const int rank = comm.rank();
  const int next = (rank + 1) % world;
  const int prev = (rank + world - 1) % world;
  auto block_bytes = [](int r) { return static_cast<size_t>(1 + 1000 * r + 7 * (r % 2)); };
  for (int round = 0; round < rounds; ++round) {
    const std::vector<uint8_t> mine = Pattern(round * 16 + rank, block_bytes(rank));
    std::vector<uint8_t> got(block_bytes(prev), 0);
    const SendOp sends[] = {{next, mine.data(), mine.size()}};
    const RecvOp recvs[] = {{prev, got.data(), got.size()}};
    absl::Status s = Exchange(comm, sends, recvs);
    if (!s.ok()) return s;
    if (got != Pattern(round * 16 + prev, block_bytes(prev))) {
      return absl::DataLossError(
          absl::StrCat("rank ", rank, " round ", round, ": wrong bytes from rank ", prev));
    }
  }
  return absl::OkStatus();
}

absl::Status TransportConformance::RingRounds(int r, int rounds) {
  return ringattn::RingRounds(*ranks_[r], rounds);
}

TEST_P(TransportConformance, RingExchangeForWorldOneToFour) {
  for (int world = 1; world <= 4; ++world) {
    SCOPED_TRACE(absl::StrCat("world ", world));
    if (!Make(world, kLongTimeout)) return;
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(ranks_[r]->rank(), r);
      EXPECT_EQ(ranks_[r]->world_size(), world);
    }
    std::vector<absl::Status> results = RunRanks(world, [&](int r) { return RingRounds(r, 4); });
    for (int r = 0; r < world; ++r) EXPECT_TRUE(results[r].ok()) << results[r];
  }
}

// All-to-all in one batch, self included, with uneven and zero sizes (zero-byte ops with null
// buffers) that differ per direction.
TEST_P(TransportConformance, UnevenAndZeroByteSizes) {
  constexpr int kWorld = 3;
  auto size = [](int src, int dst) -> size_t {
    return (src * 3 + dst) % 4 == 0 ? 0 : static_cast<size_t>(100 * (src + 1) + 37 * dst);
  };
  if (!Make(kWorld, kLongTimeout)) return;
  std::vector<absl::Status> results = RunRanks(kWorld, [&](int r) -> absl::Status {
    std::vector<std::vector<uint8_t>> out(kWorld);
    std::vector<std::vector<uint8_t>> in(kWorld);
    std::vector<SendOp> sends;
    std::vector<RecvOp> recvs;
    for (int p = 0; p < kWorld; ++p) {
      out[p] = Pattern(r * kWorld + p, size(r, p));
      in[p].assign(size(p, r), 0);
      sends.push_back({p, out[p].empty() ? nullptr : out[p].data(), out[p].size()});
      recvs.push_back({p, in[p].empty() ? nullptr : in[p].data(), in[p].size()});
    }
    absl::Status s = Exchange(*ranks_[r], sends, recvs);
    if (!s.ok()) return s;
    for (int p = 0; p < kWorld; ++p) {
      if (in[p] != Pattern(p * kWorld + r, size(p, r))) {
        return absl::DataLossError(absl::StrCat("rank ", r, ": wrong bytes from rank ", p));
      }
    }
    return absl::OkStatus();
  });
  for (int r = 0; r < kWorld; ++r) EXPECT_TRUE(results[r].ok()) << results[r];
}

// Several messages between one pair in one batch match in posting order, both ways at once,
// and a batch of only zero-byte operations completes.
TEST_P(TransportConformance, MessagesBetweenOnePairMatchInOrder) {
  const std::vector<size_t> sizes_0to1 = {5, 0, 3000, 17, 17};
  const std::vector<size_t> sizes_1to0 = {64, 1};
  if (!Make(2, kLongTimeout)) return;
  std::vector<absl::Status> results = RunRanks(2, [&](int r) -> absl::Status {
    const std::vector<size_t>& out_sizes = r == 0 ? sizes_0to1 : sizes_1to0;
    const std::vector<size_t>& in_sizes = r == 0 ? sizes_1to0 : sizes_0to1;
    std::vector<std::vector<uint8_t>> out;
    std::vector<std::vector<uint8_t>> in;
    std::vector<SendOp> sends;
    std::vector<RecvOp> recvs;
    for (size_t i = 0; i < out_sizes.size(); ++i)
      out.push_back(Pattern(r * 10 + static_cast<int>(i), out_sizes[i]));
    for (size_t i = 0; i < in_sizes.size(); ++i) in.emplace_back(in_sizes[i], 0);
    for (auto& o : out) sends.push_back({1 - r, o.data(), o.size()});
    for (auto& i : in) recvs.push_back({1 - r, i.data(), i.size()});
    absl::Status s = Exchange(*ranks_[r], sends, recvs);
    if (!s.ok()) return s;
    for (size_t i = 0; i < in.size(); ++i) {
      if (in[i] != Pattern((1 - r) * 10 + static_cast<int>(i), in_sizes[i])) {
        return absl::DataLossError(absl::StrCat("rank ", r, ": message ", i, " out of order"));
      }
    }
    const SendOp empty_send[] = {{1 - r, nullptr, 0}};
    const RecvOp empty_recv[] = {{1 - r, nullptr, 0}};
    return Exchange(*ranks_[r], empty_send, empty_recv);
  });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(results[r].ok()) << results[r];
}

// A receive smaller than its send fails on both sides at once, and the ranks stay failed.
TEST_P(TransportConformance, ByteMismatchIsInvalidArgumentOnBothSides) {
  if (!Make(2, kLongTimeout)) return;
  if (!traits().detects_size_mismatch) GTEST_SKIP() << "the transport cannot detect a mismatch";
  const Clock::time_point t0 = Clock::now();
  std::vector<absl::Status> results = RunRanks(2, [&](int r) -> absl::Status {
    std::vector<uint8_t> buf(r == 0 ? 100 : 64, 1);
    const SendOp sends[] = {{1, buf.data(), buf.size()}};
    const RecvOp recvs[] = {{0, buf.data(), buf.size()}};
    return r == 0 ? Exchange(*ranks_[0], sends, {}) : Exchange(*ranks_[1], {}, recvs);
  });
  EXPECT_LT(SecondsSince(t0), 2.0);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(results[r].code(), absl::StatusCode::kInvalidArgument) << results[r];
    EXPECT_NE(results[r].message().find("100"), std::string::npos) << results[r];
    EXPECT_NE(results[r].message().find("64"), std::string::npos) << results[r];
    EXPECT_FALSE(Exchange(*ranks_[r], {}, {}).ok()) << "rank " << r << " is not aborted";
  }
}

// A second Start before Wait is refused without harming the batch in flight. Host
// communicators only: a device communicator has no Start/Wait split.
TEST_P(TransportConformance, StartTwiceIsFailedPrecondition) {
  if (device()) GTEST_SKIP() << "device communicators enqueue; they have no Start/Wait split";
  if (!Make(2, kLongTimeout)) return;
  std::vector<absl::Status> results = RunRanks(2, [&](int r) -> absl::Status {
    std::vector<uint8_t> out = Pattern(r, 256);
    std::vector<uint8_t> in(256, 0);
    const SendOp sends[] = {{1 - r, out.data(), out.size()}};
    const RecvOp recvs[] = {{1 - r, in.data(), in.size()}};
    absl::Status s = ranks_[r]->Start(sends, recvs);
    if (!s.ok()) return s;
    absl::Status again = ranks_[r]->Start(sends, recvs);
    if (again.code() != absl::StatusCode::kFailedPrecondition) {
      return absl::InternalError(absl::StrCat("second Start gave ", again.ToString()));
    }
    s = ranks_[r]->Wait();
    if (!s.ok()) return s;
    if (in != Pattern(1 - r, 256)) return absl::DataLossError("wrong bytes");
    return ranks_[r]->Wait();  // nothing posted: OK
  });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(results[r].ok()) << results[r];
}

// Rank 0 waits on a receive that never comes; another thread aborts it. Rank 0's Wait and
// ranks 1 and 2, waiting on rank 0, all fail well before the 30 s timeout: with the reason,
// or Unavailable naming rank 0 where the transport cannot pass the reason on. The first reason
// sticks, and later calls fail at once.
TEST_P(TransportConformance, AbortReleasesPeersWaitingOnTheRank) {
  constexpr int kWorld = 3;
  if (!Make(kWorld, kLongTimeout)) return;
  if (!traits().abort_releases_peers) GTEST_SKIP() << "peers learn of an abort at their timeout";
  std::vector<double> seconds(kWorld, 0.0);
  for (int r = 0; r < kWorld; ++r) {
    if (ranks_[r]->aborted() != nullptr) EXPECT_FALSE(ranks_[r]->aborted()->load()) << r;
  }
  std::thread aborter([&] {
    std::this_thread::sleep_for(milliseconds(200));
    ranks_[0]->Abort(absl::CancelledError("test abort"));
  });
  std::vector<absl::Status> results = RunRanks(kWorld, [&](int r) -> absl::Status {
    std::vector<uint8_t> buf(128, 0);
    const RecvOp recvs[] = {{r == 0 ? 1 : 0, buf.data(), buf.size()}};
    const Clock::time_point t0 = Clock::now();
    absl::Status s = Exchange(*ranks_[r], {}, recvs);
    seconds[r] = SecondsSince(t0);
    return s;
  });
  aborter.join();
  EXPECT_EQ(results[0], absl::CancelledError("test abort"));
  // aborted() is set on the aborted rank, and on its peers once they failed (a failed Wait
  // aborts) or, in-process, at once with the group.
  for (int r = 0; r < kWorld; ++r) {
    if (ranks_[r]->aborted() != nullptr) EXPECT_TRUE(ranks_[r]->aborted()->load()) << r;
  }
  for (int r = 0; r < kWorld; ++r) EXPECT_LT(seconds[r], 2.0) << "rank " << r << ": " << results[r];
  for (int r = 1; r < kWorld; ++r) {
    if (traits().group_fails_as_a_whole) {
      EXPECT_EQ(results[r], absl::CancelledError("test abort")) << "rank " << r;
    } else {
      EXPECT_EQ(results[r].code(), absl::StatusCode::kUnavailable) << results[r];
      EXPECT_NE(results[r].message().find("from rank 0"), std::string::npos) << results[r];
    }
  }
  ranks_[0]->Abort(absl::InternalError("second abort"));
  EXPECT_EQ(ranks_[0]->Wait().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(ranks_[0]->Start({}, {}).code(), absl::StatusCode::kCancelled);
  if (traits().group_fails_as_a_whole) {
    EXPECT_EQ(ranks_[2]->Wait(), absl::CancelledError("test abort"));
  }
}

// Rank 1 never posts: rank 0 gives up after the short timeout with DeadlineExceeded, and stays
// failed.
TEST_P(TransportConformance, MissingPeerIsDeadlineExceeded) {
  if (!Make(2, milliseconds(300))) return;
  std::vector<uint8_t> buf(64, 0);
  const RecvOp recvs[] = {{1, buf.data(), buf.size()}};
  const Clock::time_point t0 = Clock::now();
  absl::Status s = Exchange(*ranks_[0], {}, recvs);  // rank 1 stays connected but silent
  const double seconds = SecondsSince(t0);
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  if (traits().timeout_names_peer) {
    EXPECT_NE(s.message().find("rank 1"), std::string::npos) << s;
  }
  EXPECT_GE(seconds, 0.25);
  EXPECT_LT(seconds, 3.0);
  if (ranks_[0]->aborted() != nullptr) EXPECT_TRUE(ranks_[0]->aborted()->load());
  EXPECT_EQ(ranks_[0]->Start({}, {}).code(), absl::StatusCode::kDeadlineExceeded);
}

// Rank 0 times out; rank 1, posting later, fails at once with rank 0's reason instead of
// waiting out its own timeout.
TEST_P(TransportConformance, TimeoutFailsTheWholeGroup) {
  if (!Make(2, milliseconds(200))) return;
  if (!traits().group_fails_as_a_whole) GTEST_SKIP() << "a later post may wait its own timeout";
  uint8_t byte = 0;
  const RecvOp recvs[] = {{1, &byte, 1}};
  EXPECT_EQ(Exchange(*ranks_[0], {}, recvs).code(), absl::StatusCode::kDeadlineExceeded);
  const SendOp sends[] = {{0, &byte, 1}};
  const Clock::time_point t0 = Clock::now();
  absl::Status s = Exchange(*ranks_[1], sends, {});
  EXPECT_LT(SecondsSince(t0), 0.15) << s;
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(s.message().find("rank 0 timed out"), std::string::npos) << s;
}

// Out-of-range peers and null buffers are refused before anything is posted; the rank keeps
// working.
TEST_P(TransportConformance, BadBatchIsRejectedWithoutSideEffects) {
  if (!Make(2, kLongTimeout)) return;
  uint8_t byte = 7;
  const SendOp bad_peer[] = {{2, &byte, 1}};
  const RecvOp negative_peer[] = {{-1, &byte, 1}};
  const SendOp null_data[] = {{1, nullptr, 4}};
  EXPECT_EQ(ranks_[0]->Start(bad_peer, {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ranks_[0]->Start({}, negative_peer).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ranks_[0]->Start(null_data, {}).code(), absl::StatusCode::kInvalidArgument);
  std::vector<absl::Status> results = RunRanks(2, [&](int r) { return RingRounds(r, 1); });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(results[r].ok()) << results[r];
}

// A rank destroyed with a batch in flight releases the peer waiting on it. Host communicators
// only: a device communicator's Enqueue leaves nothing in flight on the host.
TEST_P(TransportConformance, DestroyingARankWithABatchInFlightReleasesItsPeers) {
  if (device()) GTEST_SKIP() << "device communicators leave no batch in flight on the host";
  if (!Make(2, kLongTimeout)) return;
  std::vector<uint8_t> buf(32, 0);
  const SendOp sends[] = {{0, buf.data(), buf.size()}};
  ASSERT_TRUE(ranks_[1]->Start(sends, {}).ok());  // rank 0 has not posted
  ranks_[1].reset();
  const RecvOp recvs[] = {{1, buf.data(), buf.size()}};
  const Clock::time_point t0 = Clock::now();
  absl::Status s = Exchange(*ranks_[0], {}, recvs);
  EXPECT_LT(SecondsSince(t0), 2.0) << s;
  EXPECT_EQ(s.code(), traits().group_fails_as_a_whole ? absl::StatusCode::kCancelled
                                                      : absl::StatusCode::kUnavailable)
      << s;
}

TEST_P(TransportConformance, LargeTransfers) {
  if (!Make(2, kLongTimeout)) return;
  constexpr size_t kBytes = size_t{24} << 20;
  std::vector<absl::Status> results = RunRanks(2, [&](int r) -> absl::Status {
    const std::vector<uint8_t> out = Pattern(r, kBytes);
    std::vector<uint8_t> in(kBytes, 0);
    const SendOp sends[] = {{1 - r, out.data(), out.size()}};
    const RecvOp recvs[] = {{1 - r, in.data(), in.size()}};
    absl::Status s = Exchange(*ranks_[r], sends, recvs);
    if (!s.ok()) return s;
    return in == Pattern(1 - r, kBytes) ? absl::OkStatus() : absl::DataLossError("wrong bytes");
  });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(results[r].ok()) << results[r];
}

INSTANTIATE_TEST_SUITE_P(Registered, TransportConformance,
                         ::testing::ValuesIn(RegisteredTransports()),
                         [](const ::testing::TestParamInfo<TransportCase>& info) {
                           return info.param.name;
                         });

// ---- The registry ---------------------------------------------------------------------------

TEST(TransportRegistryTest, BuiltInsAreRegistered) {
  EXPECT_EQ(HostTransports().names(), (std::vector<std::string>{"inprocess", "gloo"}));
#if RINGATTN_HAVE_CUDA
  std::vector<std::string> device = {"inprocess_device"};
#if RINGATTN_HAVE_NCCL
  device.push_back("nccl");
#endif
  EXPECT_EQ(DeviceTransports().names(), device);
#endif
}

TEST(TransportRegistryTest, UnknownNameIsNotFoundNamingTheKnownOnes) {
  absl::StatusOr<const Transport<Communicator>*> t = HostTransports().Find("carrier pigeon");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(t.status().message().find("inprocess, gloo"), std::string::npos) << t.status();
  EXPECT_EQ(HostTransports().MakeLocalGroup("carrier pigeon", 2, kLongTimeout).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(TransportRegistryTest, InProcessTransportsCannotBeJoinedAcrossProcesses) {
  EXPECT_EQ(HostTransports().Join("inprocess", TransportJoin{}).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(TransportRegistryTest, RegisterRefusesTakenNamesAndIncompleteTransports) {
  TransportRegistry<Communicator> registry;
  EXPECT_TRUE(
      registry.Register({.name = "mine", .make_local_group = &InProcessGroup::CreateCommunicators})
          .ok());
  EXPECT_EQ(
      registry.Register({.name = "mine", .make_local_group = &InProcessGroup::CreateCommunicators})
          .code(),
      absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.Register({.name = "no group"}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.names(), std::vector<std::string>{"mine"});
  absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> group =
      registry.MakeLocalGroup("mine", 2, kLongTimeout);
  ASSERT_TRUE(group.ok()) << group.status();
  EXPECT_EQ(group->size(), 2u);
}

// ---- The in-process groups ------------------------------------------------------------------

template <typename Group>
void CheckGroupValidatesArguments() {
  EXPECT_EQ(Group::Create(0, kLongTimeout).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Group::Create(2, milliseconds(0)).status().code(), absl::StatusCode::kInvalidArgument);
  auto group = Group::Create(2, kLongTimeout);
  ASSERT_TRUE(group.ok()) << group.status();
  EXPECT_EQ((*group)->MakeCommunicator(2).status().code(), absl::StatusCode::kInvalidArgument);
  auto first = (*group)->MakeCommunicator(1);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ((*group)->MakeCommunicator(1).status().code(), absl::StatusCode::kFailedPrecondition);
  (*group)->Abort(absl::CancelledError("group abort"));
  EXPECT_EQ((*group)->status(), absl::CancelledError("group abort"));
}

TEST(InProcessGroupTest, ValidatesArguments) { CheckGroupValidatesArguments<InProcessGroup>(); }

#if RINGATTN_HAVE_CUDA
// No CUDA call happens before a communicator's first Enqueue, so this runs without a GPU.
TEST(InProcessGroupTest, DeviceGroupValidatesArguments) {
  CheckGroupValidatesArguments<InProcessDeviceGroup>();
}
#endif

// ---- Gloo: file stores, processes, connection loss ------------------------------------------

using Comms = std::vector<std::unique_ptr<Communicator>>;

// A fresh directory for a file store, removed with its contents at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "ringcomm_XXXXXX").string();
    path_ = mkdtemp(tmpl.data()) != nullptr ? tmpl : "";
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

absl::StatusOr<std::unique_ptr<GlooCommunicator>> JoinGloo(int rank, int world,
                                                           const std::string& dir,
                                                           milliseconds timeout,
                                                           const std::string& prefix = "ring") {
  absl::StatusOr<std::shared_ptr<gloo::rendezvous::Store>> store = MakeFileStore(dir);
  if (!store.ok()) return store.status();
  GlooOptions options;
  options.timeout = timeout;
  options.key_prefix = prefix;
  return GlooCommunicator::Create(rank, world, *std::move(store), options);
}

// W Gloo ranks as threads of this process, over a file store in `dir`.
Comms MakeGloo(int world, milliseconds timeout, const std::string& dir, const std::string& prefix) {
  Comms comms(world);
  std::vector<absl::Status> created = RunRanks(world, [&](int r) -> absl::Status {
    absl::StatusOr<std::unique_ptr<GlooCommunicator>> c = JoinGloo(r, world, dir, timeout, prefix);
    if (!c.ok()) return c.status();
    comms[r] = *std::move(c);
    return absl::OkStatus();
  });
  for (int r = 0; r < world; ++r) {
    EXPECT_TRUE(created[r].ok()) << "rank " << r << ": " << created[r];
    if (!created[r].ok()) return Comms();
  }
  return comms;
}

TEST(GlooCommunicatorTest, UnpairedSelfTransferIsRejected) {
  TempDir dir;
  Comms comms = MakeGloo(1, kLongTimeout, dir.path(), "ring");
  ASSERT_EQ(comms.size(), 1u);
  std::vector<uint8_t> a(8, 1), b(4, 0);
  const SendOp sends[] = {{0, a.data(), a.size()}};
  const RecvOp recvs[] = {{0, b.data(), b.size()}};
  EXPECT_EQ(comms[0]->Start(sends, {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(comms[0]->Start(sends, recvs).code(), absl::StatusCode::kInvalidArgument);
}

TEST(GlooCommunicatorTest, DestroyedPeerReleasesWaitersAtOnce) {
  TempDir dir;
  Comms comms = MakeGloo(2, kLongTimeout, dir.path(), "ring");
  ASSERT_EQ(comms.size(), 2u);
  std::thread leaver([&] {
    std::this_thread::sleep_for(milliseconds(200));
    comms[1].reset();  // like a process exiting: no Abort, just gone
  });
  std::vector<uint8_t> buf(16, 0);
  const RecvOp recvs[] = {{1, buf.data(), buf.size()}};
  const Clock::time_point t0 = Clock::now();
  absl::Status s = Exchange(*comms[0], {}, recvs);
  const double seconds = SecondsSince(t0);
  leaver.join();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_LT(seconds, 2.0);
}

TEST(GlooCommunicatorTest, TwoRingsShareOneStoreUnderDifferentPrefixes) {
  TempDir dir;
  Comms a = MakeGloo(2, kLongTimeout, dir.path(), "a");
  Comms b = MakeGloo(2, kLongTimeout, dir.path(), "b");
  ASSERT_EQ(a.size(), 2u);
  ASSERT_EQ(b.size(), 2u);
  std::vector<absl::Status> results =
      RunRanks(4, [&](int i) { return RingRounds(i < 2 ? *a[i] : *b[i - 2], /*rounds=*/2); });
  for (const absl::Status& s : results) EXPECT_TRUE(s.ok()) << s;
}

TEST(GlooCommunicatorTest, CreateValidatesArguments) {
  TempDir dir;
  EXPECT_EQ(MakeFileStore(dir.path() + "/missing").status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::shared_ptr<gloo::rendezvous::Store>> store = MakeFileStore(dir.path());
  ASSERT_TRUE(store.ok()) << store.status();
  GlooOptions options;
  EXPECT_EQ(GlooCommunicator::Create(2, 2, *store, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GlooCommunicator::Create(0, 1, nullptr, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.timeout = milliseconds(0);
  EXPECT_EQ(GlooCommunicator::Create(0, 1, *store, options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GlooCommunicatorTest, CreateGivesUpWhenPeersNeverJoin) {
  TempDir dir;
  const Clock::time_point t0 = Clock::now();
  absl::StatusOr<std::unique_ptr<GlooCommunicator>> comm =
      JoinGloo(0, 2, dir.path(), milliseconds(300));
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kDeadlineExceeded) << comm.status();
  // The file store polls its deadline in whole seconds.
  EXPECT_LT(SecondsSince(t0), 3.0);
}

TEST(GlooCommunicatorTest, StoreGetGivesUpOnAMissingKey) {
  TempDir dir;
  absl::StatusOr<std::shared_ptr<gloo::rendezvous::Store>> store = MakeFileStore(dir.path());
  ASSERT_TRUE(store.ok()) << store.status();
  ASSERT_TRUE(StoreSet(**store, "here", {'h', 'i'}).ok());
  absl::StatusOr<std::vector<char>> here = StoreGet(**store, "here", milliseconds(300));
  ASSERT_TRUE(here.ok()) << here.status();
  EXPECT_EQ(*here, (std::vector<char>{'h', 'i'}));
  EXPECT_EQ(StoreGet(**store, "missing", milliseconds(300)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

// Runs one rank of a Gloo ring in a forked child; the exit status is the verdict.
[[noreturn]] void RunChildRank(int rank, int world, const std::string& dir) {
  absl::Status s;
  {
    absl::StatusOr<std::unique_ptr<GlooCommunicator>> comm =
        JoinGloo(rank, world, dir, milliseconds(10000));
    s = comm.ok() ? RingRounds(**comm, /*rounds=*/5) : comm.status();
  }
  if (!s.ok()) fprintf(stderr, "child rank %d: %s\n", rank, s.ToString().c_str());
  _exit(s.ok() ? 0 : 1);
}

TEST(GlooCommunicatorTest, RingExchangeAcrossProcesses) {
  constexpr int kWorld = 3;
  // Fork first, while this process has no threads of its own.
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  std::vector<pid_t> children;
  for (int r = 0; r < kWorld; ++r) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0) << "fork failed";
    if (pid == 0) RunChildRank(r, kWorld, dir.path());
    children.push_back(pid);
  }
  const Clock::time_point deadline = Clock::now() + std::chrono::seconds(20);
  std::vector<int> statuses(kWorld, -1);
  size_t running = children.size();
  while (running > 0 && Clock::now() < deadline) {
    for (int r = 0; r < kWorld; ++r) {
      if (statuses[r] != -1) continue;
      int status = 0;
      if (waitpid(children[r], &status, WNOHANG) == children[r]) {
        statuses[r] = status;
        --running;
      }
    }
    std::this_thread::sleep_for(milliseconds(10));
  }
  for (int r = 0; r < kWorld; ++r) {
    if (statuses[r] == -1) {  // past the deadline: don't leave it behind
      kill(children[r], SIGKILL);
      waitpid(children[r], nullptr, 0);
      ADD_FAILURE() << "child rank " << r << " did not finish in time";
      continue;
    }
    EXPECT_TRUE(WIFEXITED(statuses[r]) && WEXITSTATUS(statuses[r]) == 0)
        << "child rank " << r << " ended with status " << statuses[r];
  }
}

}  // namespace
}  // namespace ringattn
