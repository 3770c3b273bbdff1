// `ringattn bench` against a fake AttentionService on loopback: counts, failures by code,
// percentiles, the server phases and the JSON file.
#include "cli/bench_command.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cli/exit_codes.h"
#include "cli/loopback_server_test_util.h"
#include "cli/shared_memory_test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ringattn/v1/attention.grpc.pb.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// Answers Attend with out = q and fixed Timings; every `fail_every`-th call (1-based; 0: none)
// fails with `fail_code`, and every call first sleeps `delay`. Tensors may come and go
// through registered shared memory.
class FakeAttentionService final : public FakeServiceWithSharedMemory {
 public:
  int fail_every = 0;
  grpc::StatusCode fail_code = grpc::StatusCode::RESOURCE_EXHAUSTED;
  absl::Duration delay = absl::ZeroDuration();

  int calls() const { return calls_; }

  grpc::Status Attend(grpc::ServerContext*, const v1::AttendRequest* request,
                      v1::AttendResponse* response) override {
    const int call = ++calls_;
    absl::SleepFor(delay);
    if (fail_every > 0 && call % fail_every == 0) {
      return grpc::Status(fail_code, "queue full");
    }
    v1::AttendRequest resolved = *request;
    if (grpc::Status s = shm.ReadInputs(AttendRpc(), &resolved); !s.ok()) return s;
    *response->mutable_out() = resolved.q();
    v1::Timings* t = response->mutable_timings();
    t->set_queue_seconds(0.001);
    t->set_receive_seconds(0.002);
    t->set_scatter_seconds(0.003);
    t->set_workers_seconds(0.008);
    t->set_gather_seconds(0.004);
    t->set_send_seconds(0.005);
    t->set_total_seconds(0.020);
    for (int r = 0; r < 2; ++r) {
      v1::WorkerTiming* w = t->add_workers();
      w->set_rank(r);
      w->set_compute_seconds(0.006 + 0.001 * r);    // max 7 ms
      w->set_comm_wait_seconds(0.002 - 0.001 * r);  // max 2 ms
      w->set_ring_seconds(0.010);
    }
    return shm.WriteOutputs(request->output_shm(), response);
  }

  grpc::Status GetInfo(grpc::ServerContext*, const v1::InfoRequest*,
                       v1::InfoResponse* response) override {
    response->set_version("fake");
    response->set_world_size(2);
    response->set_ready(true);
    response->set_max_unary_bytes(int64_t{1} << 30);
    return grpc::Status::OK;
  }

 private:
  std::atomic<int> calls_{0};
};

using FakeServer = LoopbackServer<FakeAttentionService>;

BenchOptions SmallBench(const std::string& target) {
  BenchOptions o;
  o.target = target;
  o.concurrency = 3;
  o.requests = 12;
  o.seqlen = 64;
  o.heads = 2;
  o.head_dim = 16;
  o.dtype = "fp32";
  o.causal = true;
  o.timeout_seconds = 20;
  o.connect_timeout_seconds = 10;
  return o;
}

std::string ReadFile(const std::string& path) {
  std::ifstream file(path);
  std::stringstream s;
  s << file.rdbuf();
  return s.str();
}

// A number following `"key": ` in `text` (the first occurrence); NaN when absent.
double NumberAfter(const std::string& text, const std::string& key) {
  const size_t at = text.find(absl::StrCat("\"", key, "\": "));
  if (at == std::string::npos) return std::nan("");
  return std::strtod(text.c_str() + at + key.size() + 4, nullptr);
}

TEST(BenchCommandTest, AllSucceed) {
  FakeServer server;
  ASSERT_TRUE(server.started());
  std::ostringstream out;
  EXPECT_EQ(RunBenchCommand(SmallBench(server.target()), out), 0) << out.str();
  EXPECT_EQ(server.service().calls(), 12);
  EXPECT_THAT(out.str(), HasSubstr("12 sent, 12 ok, 0 failed\n"));
  EXPECT_THAT(out.str(), HasSubstr("requests/s"));
  EXPECT_THAT(out.str(), HasSubstr("latency ms"));
  // Server phase means: the fixed timings; compute and comm wait are the worst worker's.
  EXPECT_THAT(out.str(), HasSubstr("  queue             1.000\n"));
  EXPECT_THAT(out.str(), HasSubstr("  compute           7.000\n"));
  EXPECT_THAT(out.str(), HasSubstr("  comm_wait         2.000\n"));
  EXPECT_THAT(out.str(), HasSubstr("  workers           8.000\n"));
  EXPECT_THAT(out.str(), HasSubstr("  total            20.000\n"));
  EXPECT_THAT(out.str(), HasSubstr("TFLOP/s over the mean ring"));
  EXPECT_THAT(out.str(), HasSubstr("host memcpy on this machine: "));
}

// Warm-up calls go out before the clock and are not counted: 2 per thread, then 12 timed.
TEST(BenchCommandTest, WarmupCallsAreMadeAndNotCounted) {
  FakeServer server;
  ASSERT_TRUE(server.started());
  BenchOptions o = SmallBench(server.target());
  o.warmup = 2;
  o.json_path = ::testing::TempDir() + "/bench_command_warmup.json";
  std::ostringstream out;
  EXPECT_EQ(RunBenchCommand(o, out), 0) << out.str();
  EXPECT_EQ(server.service().calls(), 12 + 2 * 3);
  EXPECT_THAT(out.str(), HasSubstr("12 sent, 12 ok, 0 failed\n"));
  EXPECT_THAT(out.str(), HasSubstr("warm-up: 6 calls before the clock (0 failed), slowest "));
  const std::string json = ReadFile(o.json_path);
  EXPECT_THAT(json, HasSubstr("\"warmup\": {\"calls\": 6, \"failed\": 0, \"max_seconds\": "));
  EXPECT_GT(NumberAfter(json, "max_seconds"), 0);
  EXPECT_THAT(json, HasSubstr("\"sent\": 12"));

  o.warmup = -1;
  std::ostringstream refused;
  EXPECT_NE(RunBenchCommand(o, refused), 0);
  EXPECT_THAT(refused.str(), HasSubstr("--warmup must be >= 0"));
}

TEST(BenchCommandTest, FailuresCountedByCodeAndJson) {
  FakeServer server;
  ASSERT_TRUE(server.started());
  server.service().fail_every = 4;                  // calls 4, 8, 12 of 12
  server.service().delay = absl::Milliseconds(20);  // > the 7 ms of compute
  BenchOptions o = SmallBench(server.target());
  o.json_path = ::testing::TempDir() + "/bench_command_test.json";
  std::remove(o.json_path.c_str());
  std::ostringstream out;
  EXPECT_EQ(RunBenchCommand(o, out), kExitRpcFailed) << out.str();
  EXPECT_EQ(server.service().calls(), 12);
  EXPECT_THAT(out.str(), HasSubstr("12 sent, 9 ok, 3 failed (RESOURCE_EXHAUSTED 3)"));
  EXPECT_THAT(out.str(), HasSubstr("wrote " + o.json_path));

  const std::string json = ReadFile(o.json_path);
  ASSERT_FALSE(json.empty());
  EXPECT_EQ(json.front(), '{');
  EXPECT_EQ(json[json.find_last_not_of('\n')], '}');
  EXPECT_EQ(std::count(json.begin(), json.end(), '{'), std::count(json.begin(), json.end(), '}'));
  EXPECT_THAT(json, Not(HasSubstr("nan")));
  for (const char* key : {"\"target\"",
                          "\"concurrency\": 3",
                          "\"sent\": 12",
                          "\"ok\": 9",
                          "\"failed\": 3",
                          "\"failed_by_code\": {\"RESOURCE_EXHAUSTED\": 3}",
                          "\"requests_per_second\"",
                          "\"latency_seconds\"",
                          "\"p50\"",
                          "\"p90\"",
                          "\"p99\"",
                          "\"max\"",
                          "\"payload_bytes\"",
                          "\"payload_gb_per_second\"",
                          "\"memcpy_gb_per_second\"",
                          "\"server_mean_seconds\"",
                          "\"queue\"",
                          "\"receive\"",
                          "\"scatter\"",
                          "\"validate\"",
                          "\"ring_wait\"",
                          "\"workers\"",
                          "\"respond\"",
                          "\"client_wire\"",
                          "\"compute\"",
                          "\"comm_wait\"",
                          "\"gather\"",
                          "\"send\"",
                          "\"total\"",
                          "\"outside_compute_share\"",
                          "\"tflops_ring\"",
                          "\"tflops_delivered\""}) {
    EXPECT_THAT(json, HasSubstr(key));
  }
  // The machine's memcpy rate is measured in the same run: a real, positive rate.
  EXPECT_GT(NumberAfter(json, "memcpy_gb_per_second"), 0.01);
  const double p50 = NumberAfter(json, "p50");
  const double p90 = NumberAfter(json, "p90");
  const double p99 = NumberAfter(json, "p99");
  const double max = NumberAfter(json, "max");
  EXPECT_GE(p50, 0.02);  // every call sleeps 20 ms on the server
  EXPECT_LE(p50, p90);
  EXPECT_LE(p90, p99);
  EXPECT_LE(p99, max);
  // 9 ok calls, each q, k and v in (64 * 2 * 16 fp32 = 8 KiB each) and out back.
  EXPECT_EQ(NumberAfter(json, "payload_bytes"), 9.0 * 4 * 8192);
  EXPECT_NEAR(NumberAfter(json, "compute"), 0.007, 1e-12);
  const double share = NumberAfter(json, "outside_compute_share");
  EXPECT_GT(share, 0);
  EXPECT_LT(share, 1);
}

// Failures that only say "not now" (UNAVAILABLE, DEADLINE_EXCEEDED) exit as an unreachable
// server does; any other code among them exits 4.
TEST(BenchCommandTest, ExitCodeFollowsTheFailuresCodes) {
  FakeServer server;
  ASSERT_TRUE(server.started());
  server.service().fail_every = 3;
  server.service().fail_code = grpc::StatusCode::UNAVAILABLE;
  std::ostringstream out;
  EXPECT_EQ(RunBenchCommand(SmallBench(server.target()), out), kExitUnavailable) << out.str();
  EXPECT_THAT(out.str(), HasSubstr("4 failed (UNAVAILABLE 4)"));
}

TEST(BenchCommandTest, ByDuration) {
  FakeServer server;
  ASSERT_TRUE(server.started());
  server.service().delay = absl::Milliseconds(20);
  BenchOptions o = SmallBench(server.target());
  o.requests = 0;  // ignored with a duration
  o.duration_seconds = 0.3;
  o.concurrency = 2;
  std::ostringstream out;
  const absl::Time start = absl::Now();
  EXPECT_EQ(RunBenchCommand(o, out), 0) << out.str();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  // About 0.3 s / 20 ms per call on each of 2 threads.
  EXPECT_GE(server.service().calls(), 2);
  EXPECT_LE(server.service().calls(), 2 * (300 / 20 + 1));
  EXPECT_THAT(out.str(), HasSubstr(absl::StrCat(server.service().calls(), " ok, 0 failed")));
}

TEST(BenchCommandTest, BadOptionsAndNoServer) {
  std::ostringstream out;
  BenchOptions o = SmallBench("127.0.0.1:1");
  o.concurrency = 0;
  EXPECT_EQ(RunBenchCommand(o, out), 2);
  EXPECT_THAT(out.str(), HasSubstr("--concurrency must be >= 1"));
  o = SmallBench("127.0.0.1:1");
  o.dtype = "fp8";
  EXPECT_EQ(RunBenchCommand(o, out), 2);
  o = SmallBench("127.0.0.1:1");
  o.requests = 0;
  EXPECT_EQ(RunBenchCommand(o, out), 2);
  o = SmallBench("127.0.0.1:1");
  o.connect_timeout_seconds = 0.3;
  std::ostringstream unreachable;
  EXPECT_EQ(RunBenchCommand(o, unreachable), kExitUnavailable);
  EXPECT_THAT(unreachable.str(), HasSubstr("error: UNAVAILABLE"));
}

TEST(BenchCommandTest, SharedMemoryRegionPerThreadReusedAcrossCalls) {
  FakeServer server;
  ASSERT_TRUE(server.started());
  BenchOptions o = SmallBench(server.target());
  o.shm = true;
  o.json_path = ::testing::TempDir() + "/bench_command_test_shm.json";
  std::ostringstream out;
  EXPECT_EQ(RunBenchCommand(o, out), 0) << out.str();
  EXPECT_EQ(server.service().calls(), 12);
  // Three threads, a region each, every call through one.
  EXPECT_EQ(server.service().shm.registrations(), 3);
  EXPECT_EQ(server.service().shm.calls_with_shm(), 12);
  EXPECT_EQ(server.service().shm.registered(), 0);
  EXPECT_THAT(OurSharedMemoryObjects(), ::testing::IsEmpty());
  EXPECT_THAT(out.str(), HasSubstr("via Attend (unary, system shared memory)"));
  EXPECT_THAT(out.str(), HasSubstr("shared memory: 3 regions of "));
  EXPECT_THAT(out.str(), HasSubstr("12 sent, 12 ok, 0 failed\n"));
  EXPECT_THAT(out.str(), HasSubstr("\n  shm_in "));
  EXPECT_THAT(out.str(), HasSubstr("\n  shm_out "));
  const std::string json = ReadFile(o.json_path);
  EXPECT_THAT(json, HasSubstr("\"shm\": true"));
  // The same tensor bytes as without shared memory: q, k, v in and out back, 8 KiB each.
  EXPECT_EQ(NumberAfter(json, "payload_bytes"), 12.0 * 4 * 8192);
  EXPECT_GT(NumberAfter(json, "shm_in"), 0);
  EXPECT_GT(NumberAfter(json, "shm_out"), 0);
}

TEST(BenchCommandTest, ResidentTensorsArePlacedOnceAndLeftInTheRegion) {
  FakeServer server;
  ASSERT_TRUE(server.started());
  BenchOptions o = SmallBench(server.target());
  o.shm = true;
  o.shm_resident = true;
  o.json_path = ::testing::TempDir() + "/bench_command_test_resident.json";
  std::ostringstream out;
  EXPECT_EQ(RunBenchCommand(o, out), 0) << out.str();
  EXPECT_EQ(server.service().calls(), 12);
  EXPECT_EQ(server.service().shm.registrations(), 3);
  EXPECT_EQ(server.service().shm.calls_with_shm(), 12);
  EXPECT_THAT(out.str(), HasSubstr("registered, the tensors resident in them"));
  const std::string json = ReadFile(o.json_path);
  // No copies on the client's side during the load.
  EXPECT_EQ(NumberAfter(json, "shm_in"), 0);
  EXPECT_EQ(NumberAfter(json, "shm_out"), 0);
  EXPECT_THAT(OurSharedMemoryObjects(), ::testing::IsEmpty());

  o.shm = false;
  std::ostringstream alone;
  EXPECT_EQ(RunBenchCommand(o, alone), 2);
  EXPECT_THAT(alone.str(), HasSubstr("--shm_resident needs --shm"));
}

TEST(BenchCommandTest, SharedMemoryRefusedOrWithStream) {
  FakeServer server;
  ASSERT_TRUE(server.started());
  server.service().shm.refuse = true;
  BenchOptions o = SmallBench(server.target());
  o.shm = true;
  std::ostringstream refused;
  EXPECT_EQ(RunBenchCommand(o, refused), kExitRpcFailed) << refused.str();
  EXPECT_THAT(refused.str(), HasSubstr("error: PERMISSION_DENIED"));
  EXPECT_EQ(server.service().calls(), 0);
  EXPECT_THAT(OurSharedMemoryObjects(), ::testing::IsEmpty());

  o.streaming = true;
  std::ostringstream both;
  EXPECT_EQ(RunBenchCommand(o, both), 2);
  EXPECT_THAT(both.str(), HasSubstr("--shm and --stream exclude each other"));
  // Without --shm the report has no shared-memory rows.
  o = SmallBench(server.target());
  std::ostringstream plain;
  EXPECT_EQ(RunBenchCommand(o, plain), 0) << plain.str();
  EXPECT_THAT(plain.str(), Not(HasSubstr("shm_in")));
}

}  // namespace
}  // namespace ringattn
