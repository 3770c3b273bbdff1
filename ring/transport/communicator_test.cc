// Tests of the ring transports: the in-process group and Gloo over TCP on loopback. The
// behaviour both must share runs through the same Check* bodies; each transport then has tests
// of its own (Gloo across real processes, connection loss, rendezvous).
#include "ring/transport/communicator.h"

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

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using Comms = std::vector<std::unique_ptr<Communicator>>;
using MakeComms = std::function<Comms(int world, milliseconds timeout)>;

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

Comms MakeInProcess(int world, milliseconds timeout) {
  absl::StatusOr<Comms> comms = InProcessGroup::CreateCommunicators(world, timeout);
  EXPECT_TRUE(comms.ok()) << comms.status();
  return comms.ok() ? *std::move(comms) : Comms();
}

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

// W Gloo ranks as threads of this process, over a file store in a fresh directory.
Comms MakeGlooWithPrefix(int world, milliseconds timeout, const std::string& dir,
                         const std::string& prefix) {
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

Comms MakeGloo(int world, milliseconds timeout) {
  TempDir dir;  // the store is only read while connecting
  return MakeGlooWithPrefix(world, timeout, dir.path(), "ring");
}

// Each rank sends its block to rank + 1 and receives rank - 1's, `rounds` times; block sizes
// differ per rank.
absl::Status RingRounds(Communicator& comm, int rounds) {
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

void CheckRingExchange(const MakeComms& make) {
  for (int world = 1; world <= 4; ++world) {
    SCOPED_TRACE(absl::StrCat("world ", world));
    Comms comms = make(world, kLongTimeout);
    ASSERT_EQ(comms.size(), static_cast<size_t>(world));
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(comms[r]->rank(), r);
      EXPECT_EQ(comms[r]->world_size(), world);
      EXPECT_EQ(comms[r]->memory_space(), MemorySpace::kHost);
    }
    std::vector<absl::Status> results =
        RunRanks(world, [&](int r) { return RingRounds(*comms[r], /*rounds=*/4); });
    for (int r = 0; r < world; ++r) EXPECT_TRUE(results[r].ok()) << results[r];
  }
}

// All-to-all in one batch, self included, with uneven and zero sizes (zero-byte ops with null
// buffers) that differ per direction.
void CheckUnevenAndZeroByteSizes(const MakeComms& make) {
  constexpr int kWorld = 3;
  auto size = [](int src, int dst) -> size_t {
    return (src * 3 + dst) % 4 == 0 ? 0 : static_cast<size_t>(100 * (src + 1) + 37 * dst);
  };
  Comms comms = make(kWorld, kLongTimeout);
  ASSERT_EQ(comms.size(), static_cast<size_t>(kWorld));
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
    absl::Status s = Exchange(*comms[r], sends, recvs);
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
void CheckOrderedMatching(const MakeComms& make) {
  const std::vector<size_t> sizes_0to1 = {5, 0, 3000, 17, 17};
  const std::vector<size_t> sizes_1to0 = {64, 1};
  Comms comms = make(2, kLongTimeout);
  ASSERT_EQ(comms.size(), 2u);
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
    absl::Status s = Exchange(*comms[r], sends, recvs);
    if (!s.ok()) return s;
    for (size_t i = 0; i < in.size(); ++i) {
      if (in[i] != Pattern((1 - r) * 10 + static_cast<int>(i), in_sizes[i])) {
        return absl::DataLossError(absl::StrCat("rank ", r, ": message ", i, " out of order"));
      }
    }
    const SendOp empty_send[] = {{1 - r, nullptr, 0}};
    const RecvOp empty_recv[] = {{1 - r, nullptr, 0}};
    return Exchange(*comms[r], empty_send, empty_recv);
  });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(results[r].ok()) << results[r];
}

// A receive smaller than its send fails on both sides at once, and the communicators stay
// failed.
void CheckByteMismatch(const MakeComms& make) {
  Comms comms = make(2, kLongTimeout);
  ASSERT_EQ(comms.size(), 2u);
  const Clock::time_point t0 = Clock::now();
  std::vector<absl::Status> results = RunRanks(2, [&](int r) -> absl::Status {
    std::vector<uint8_t> buf(r == 0 ? 100 : 64, 1);
    const SendOp sends[] = {{1, buf.data(), buf.size()}};
    const RecvOp recvs[] = {{0, buf.data(), buf.size()}};
    return r == 0 ? Exchange(*comms[0], sends, {}) : Exchange(*comms[1], {}, recvs);
  });
  EXPECT_LT(SecondsSince(t0), 2.0);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(results[r].code(), absl::StatusCode::kInvalidArgument) << results[r];
    EXPECT_NE(results[r].message().find("100"), std::string::npos) << results[r];
    EXPECT_NE(results[r].message().find("64"), std::string::npos) << results[r];
    EXPECT_FALSE(Exchange(*comms[r], {}, {}).ok()) << "rank " << r << " is not aborted";
  }
}

// A second Start before Wait is refused without harming the batch in flight.
void CheckStartTwice(const MakeComms& make) {
  Comms comms = make(2, kLongTimeout);
  ASSERT_EQ(comms.size(), 2u);
  std::vector<absl::Status> results = RunRanks(2, [&](int r) -> absl::Status {
    std::vector<uint8_t> out = Pattern(r, 256);
    std::vector<uint8_t> in(256, 0);
    const SendOp sends[] = {{1 - r, out.data(), out.size()}};
    const RecvOp recvs[] = {{1 - r, in.data(), in.size()}};
    absl::Status s = comms[r]->Start(sends, recvs);
    if (!s.ok()) return s;
    absl::Status again = comms[r]->Start(sends, recvs);
    if (again.code() != absl::StatusCode::kFailedPrecondition) {
      return absl::InternalError(absl::StrCat("second Start gave ", again.ToString()));
    }
    s = comms[r]->Wait();
    if (!s.ok()) return s;
    if (in != Pattern(1 - r, 256)) return absl::DataLossError("wrong bytes");
    return comms[r]->Wait();  // nothing posted: OK
  });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(results[r].ok()) << results[r];
}

// Rank 0 waits on a receive that never comes; another thread aborts it. Rank 0's Wait and
// ranks 1 and 2, waiting on rank 0, all fail well before the 30 s timeout. Returns each
// rank's status.
std::vector<absl::Status> AbortWhileWaiting(Comms& comms, std::vector<double>* seconds) {
  constexpr int kWorld = 3;
  seconds->assign(kWorld, 0.0);
  std::thread aborter([&] {
    std::this_thread::sleep_for(milliseconds(200));
    comms[0]->Abort(absl::CancelledError("test abort"));
  });
  std::vector<absl::Status> results = RunRanks(kWorld, [&](int r) -> absl::Status {
    std::vector<uint8_t> buf(128, 0);
    const RecvOp recvs[] = {{r == 0 ? 1 : 0, buf.data(), buf.size()}};
    const Clock::time_point t0 = Clock::now();
    absl::Status s = Exchange(*comms[r], {}, recvs);
    (*seconds)[r] = SecondsSince(t0);
    return s;
  });
  aborter.join();
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_FALSE(results[r].ok()) << "rank " << r;
    EXPECT_LT((*seconds)[r], 2.0) << "rank " << r << ": " << results[r];
  }
  // The first reason sticks, and later calls fail at once.
  comms[0]->Abort(absl::InternalError("second abort"));
  EXPECT_EQ(comms[0]->Wait().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(comms[0]->Start({}, {}).code(), absl::StatusCode::kCancelled);
  return results;
}

// Rank 1 never posts: rank 0's Wait gives up after the short timeout with DeadlineExceeded.
void CheckMissingPeerTimesOut(const MakeComms& make) {
  const milliseconds timeout(300);
  Comms comms = make(2, timeout);
  ASSERT_EQ(comms.size(), 2u);
  std::vector<uint8_t> buf(64, 0);
  const RecvOp recvs[] = {{1, buf.data(), buf.size()}};
  const Clock::time_point t0 = Clock::now();
  absl::Status s = Exchange(*comms[0], {}, recvs);  // rank 1 stays connected but silent
  const double seconds = SecondsSince(t0);
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_NE(s.message().find("rank 1"), std::string::npos) << s;
  EXPECT_GE(seconds, 0.25);
  EXPECT_LT(seconds, 3.0);
  EXPECT_EQ(comms[0]->Start({}, {}).code(), absl::StatusCode::kDeadlineExceeded);
}

// Out-of-range peers and null buffers are refused before anything is posted; the
// communicator keeps working.
void CheckBadBatchIsRejected(const MakeComms& make) {
  Comms comms = make(2, kLongTimeout);
  ASSERT_EQ(comms.size(), 2u);
  uint8_t byte = 7;
  const SendOp bad_peer[] = {{2, &byte, 1}};
  const RecvOp negative_peer[] = {{-1, &byte, 1}};
  const SendOp null_data[] = {{1, nullptr, 4}};
  EXPECT_EQ(comms[0]->Start(bad_peer, {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(comms[0]->Start({}, negative_peer).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(comms[0]->Start(null_data, {}).code(), absl::StatusCode::kInvalidArgument);
  std::vector<absl::Status> results =
      RunRanks(2, [&](int r) { return RingRounds(*comms[r], /*rounds=*/1); });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(results[r].ok()) << results[r];
}

// ---------------------------------------------------------------------------------------------
// In-process transport.

TEST(InProcessCommunicatorTest, RingExchangeForWorldOneToFour) { CheckRingExchange(MakeInProcess); }

TEST(InProcessCommunicatorTest, UnevenAndZeroByteSizes) {
  CheckUnevenAndZeroByteSizes(MakeInProcess);
}

TEST(InProcessCommunicatorTest, MessagesBetweenOnePairMatchInOrder) {
  CheckOrderedMatching(MakeInProcess);
}

TEST(InProcessCommunicatorTest, ByteMismatchIsInvalidArgumentOnBothSides) {
  CheckByteMismatch(MakeInProcess);
}

TEST(InProcessCommunicatorTest, StartTwiceIsFailedPrecondition) { CheckStartTwice(MakeInProcess); }

TEST(InProcessCommunicatorTest, AbortReleasesEveryRankWithTheReason) {
  Comms comms = MakeInProcess(3, kLongTimeout);
  ASSERT_EQ(comms.size(), 3u);
  std::vector<double> seconds;
  std::vector<absl::Status> results = AbortWhileWaiting(comms, &seconds);
  // The whole group fails with the abort reason itself.
  for (const absl::Status& s : results) {
    EXPECT_EQ(s, absl::CancelledError("test abort"));
  }
  EXPECT_EQ(comms[2]->Wait(), absl::CancelledError("test abort"));
}

TEST(InProcessCommunicatorTest, MissingPeerIsDeadlineExceeded) {
  CheckMissingPeerTimesOut(MakeInProcess);
}

TEST(InProcessCommunicatorTest, TimeoutAbortsTheGroup) {
  Comms comms = MakeInProcess(2, milliseconds(200));
  ASSERT_EQ(comms.size(), 2u);
  uint8_t byte = 0;
  const RecvOp recvs[] = {{1, &byte, 1}};
  EXPECT_EQ(Exchange(*comms[0], {}, recvs).code(), absl::StatusCode::kDeadlineExceeded);
  // Rank 1 learns at once why the group failed instead of waiting out its own timeout.
  const SendOp sends[] = {{0, &byte, 1}};
  absl::Status s = Exchange(*comms[1], sends, {});
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(s.message().find("rank 0 timed out"), std::string::npos) << s;
}

TEST(InProcessCommunicatorTest, BadBatchIsRejectedWithoutSideEffects) {
  CheckBadBatchIsRejected(MakeInProcess);
}

TEST(InProcessCommunicatorTest, DestroyingARankWithABatchInFlightReleasesItsPeers) {
  Comms comms = MakeInProcess(2, kLongTimeout);
  ASSERT_EQ(comms.size(), 2u);
  std::vector<uint8_t> buf(32, 0);
  const SendOp sends[] = {{0, buf.data(), buf.size()}};
  ASSERT_TRUE(comms[1]->Start(sends, {}).ok());  // rank 0 has not posted; stays queued
  comms[1].reset();
  const RecvOp recvs[] = {{1, buf.data(), buf.size()}};
  EXPECT_EQ(Exchange(*comms[0], {}, recvs).code(), absl::StatusCode::kCancelled);
}

TEST(InProcessCommunicatorTest, GroupValidatesArguments) {
  EXPECT_EQ(InProcessGroup::Create(0, kLongTimeout).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(InProcessGroup::Create(2, milliseconds(0)).status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::shared_ptr<InProcessGroup>> group = InProcessGroup::Create(2, kLongTimeout);
  ASSERT_TRUE(group.ok()) << group.status();
  EXPECT_EQ((*group)->MakeCommunicator(2).status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::unique_ptr<Communicator>> first = (*group)->MakeCommunicator(1);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ((*group)->MakeCommunicator(1).status().code(), absl::StatusCode::kFailedPrecondition);
}

// ---------------------------------------------------------------------------------------------
// Gloo transport: ranks as threads over loopback TCP, except where noted.

TEST(GlooCommunicatorTest, RingExchangeForWorldOneToFour) { CheckRingExchange(MakeGloo); }

TEST(GlooCommunicatorTest, UnevenAndZeroByteSizes) { CheckUnevenAndZeroByteSizes(MakeGloo); }

TEST(GlooCommunicatorTest, MessagesBetweenOnePairMatchInOrder) { CheckOrderedMatching(MakeGloo); }

TEST(GlooCommunicatorTest, ByteMismatchIsInvalidArgumentOnBothSides) {
  CheckByteMismatch(MakeGloo);
}

TEST(GlooCommunicatorTest, StartTwiceIsFailedPrecondition) { CheckStartTwice(MakeGloo); }

TEST(GlooCommunicatorTest, AbortReleasesPeersWaitingOnTheRank) {
  Comms comms = MakeGloo(3, kLongTimeout);
  ASSERT_EQ(comms.size(), 3u);
  std::vector<double> seconds;
  std::vector<absl::Status> results = AbortWhileWaiting(comms, &seconds);
  EXPECT_EQ(results[0], absl::CancelledError("test abort"));
  // Peers only see the connection drop; the error names the rank they were waiting on.
  for (int r = 1; r < 3; ++r) {
    EXPECT_EQ(results[r].code(), absl::StatusCode::kUnavailable) << results[r];
    EXPECT_NE(results[r].message().find("from rank 0"), std::string::npos) << results[r];
  }
}

TEST(GlooCommunicatorTest, MissingPeerIsDeadlineExceeded) { CheckMissingPeerTimesOut(MakeGloo); }

TEST(GlooCommunicatorTest, BadBatchIsRejectedWithoutSideEffects) {
  CheckBadBatchIsRejected(MakeGloo);
}

TEST(GlooCommunicatorTest, UnpairedSelfTransferIsRejected) {
  Comms comms = MakeGloo(1, kLongTimeout);
  ASSERT_EQ(comms.size(), 1u);
  std::vector<uint8_t> a(8, 1), b(4, 0);
  const SendOp sends[] = {{0, a.data(), a.size()}};
  const RecvOp recvs[] = {{0, b.data(), b.size()}};
  EXPECT_EQ(comms[0]->Start(sends, {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(comms[0]->Start(sends, recvs).code(), absl::StatusCode::kInvalidArgument);
}

TEST(GlooCommunicatorTest, LargeTransfers) {
  Comms comms = MakeGloo(2, kLongTimeout);
  ASSERT_EQ(comms.size(), 2u);
  constexpr size_t kBytes = size_t{24} << 20;
  std::vector<absl::Status> results = RunRanks(2, [&](int r) -> absl::Status {
    const std::vector<uint8_t> out = Pattern(r, kBytes);
    std::vector<uint8_t> in(kBytes, 0);
    const SendOp sends[] = {{1 - r, out.data(), out.size()}};
    const RecvOp recvs[] = {{1 - r, in.data(), in.size()}};
    absl::Status s = Exchange(*comms[r], sends, recvs);
    if (!s.ok()) return s;
    return in == Pattern(1 - r, kBytes) ? absl::OkStatus() : absl::DataLossError("wrong bytes");
  });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(results[r].ok()) << results[r];
}

TEST(GlooCommunicatorTest, DestroyedPeerReleasesWaitersAtOnce) {
  Comms comms = MakeGloo(2, kLongTimeout);
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
  Comms a = MakeGlooWithPrefix(2, kLongTimeout, dir.path(), "a");
  Comms b = MakeGlooWithPrefix(2, kLongTimeout, dir.path(), "b");
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
