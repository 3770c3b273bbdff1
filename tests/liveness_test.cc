// Liveness that heals, end to end on CPU workers (`ringattn worker` processes): a worker paused
// past the coordinator's ping timeout is dropped and, once resumed, registers again by itself; a
// coordinator restarted on the same internal address gets its workers back. Each recovery is
// timed against a bound and checked with a correct answer.
#include <signal.h>

#include <climits>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/cpu/reference_attention.h"
#include "ringattn/v1/attention.grpc.pb.h"
#include "server/coordinator.h"
#include "server/local_workers.h"
#include "tests/service_fixture.h"

namespace ringattn {
namespace {

using test::MakeRequest;
using test::Shape;
using test::WorkerBinary;

// A request through `address` answered and matching the fp64 reference's output.
void ExpectAnsweredCorrectly(const std::string& address) {
  auto stub = test::UnlimitedStub(address);
  Shape s{1, 37, 5, 1, 64, v1::DTYPE_FP32};
  v1::AttendRequest req = MakeRequest(s);
  req.mutable_options()->set_causal(true);
  v1::AttendResponse resp;
  const grpc::Status st = test::CallAttend(*stub, req, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  const absl::StatusOr<ReferenceResult> ref = test::ReferenceOf(req);
  ASSERT_TRUE(ref.ok());
  const ErrorStats e = CompareTensor(resp.out().data().data(), DType::kF32, ref->o.data(),
                                     static_cast<int64_t>(ref->o.size()));
  EXPECT_TRUE(e.Within(1e-5, 1.0)) << e.ToString();
}

// How long until the ring is formed, waiting up to `bound`.
absl::Duration TimeUntilReady(Coordinator& c, absl::Duration bound) {
  const absl::Time t0 = absl::Now();
  c.WaitUntilReady(bound);
  return absl::Now() - t0;
}

TEST(Liveness, APausedWorkerRegistersAgainAndTheRingReforms) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Coordinator::Options o;
  o.ring.ping_timeout = absl::Milliseconds(800);
  test::LocalService svc(2, o, "cpu");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  const pid_t victim = svc.workers().pids()[1];
  ASSERT_GT(victim, 0);
  kill(victim, SIGSTOP);  // a GC or VM stall, well past the ping timeout
  absl::SleepFor(absl::Seconds(3));
  // The coordinator noticed: the ring is down while the worker is.
  EXPECT_FALSE(svc.coordinator().WaitUntilReady(absl::ZeroDuration()));
  kill(victim, SIGCONT);
  const absl::Duration took = TimeUntilReady(svc.coordinator(), absl::Seconds(10));
  EXPECT_LT(took, absl::Seconds(10)) << "no ring 10 s after the worker resumed";
  std::fprintf(stderr, "ring re-formed %.2f s after the paused worker resumed\n",
               absl::ToDoubleSeconds(took));
  EXPECT_EQ(svc.workers().restarts(), 0);  // the same process came back, not a new one
  ExpectAnsweredCorrectly(svc.address());
}

// A worker that hangs mid-request (SIGSTOP) fails that request within the ping timeout plus a
// ping interval, not the transport's timeout (20 s here, 60 s by default): the coordinator stops
// the request when the member stops answering, and the other workers leave the ring at once.
TEST(Liveness, AHungWorkerFailsTheRequestWithinTheBound) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Coordinator::Options o;
  o.ring.ping_timeout = absl::Milliseconds(800);
  test::LocalService svc(2, o, "cpu");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(INT_MAX);
  auto stub = v1::AttentionService::NewStub(
      grpc::CreateCustomChannel(svc.address(), grpc::InsecureChannelCredentials(), args));
  Shape big{1, 12288, 8, 8, 128, v1::DTYPE_BF16};  // seconds of CPU work, still at 0.7 s
  const v1::AttendRequest req = MakeRequest(big);
  v1::AttendResponse resp;
  grpc::Status st;
  absl::Time hung_at, failed_at;
  std::thread caller([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(120)));
    st = stub->Attend(&ctx, req, &resp);
    failed_at = absl::Now();
  });
  absl::SleepFor(absl::Milliseconds(700));
  const pid_t victim = svc.workers().pids()[1];
  hung_at = absl::Now();
  kill(victim, SIGSTOP);
  caller.join();
  kill(victim, SIGCONT);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  EXPECT_NE(st.error_message().find("stopped answering"), std::string::npos)
      << st.error_message();
  const absl::Duration took = failed_at - hung_at;
  EXPECT_LT(took, absl::Seconds(5)) << "the request waited for the transport's timeout";
  std::fprintf(stderr, "request failed %.2f s after its worker hung\n", absl::ToDoubleSeconds(took));
  ASSERT_TRUE(svc.coordinator().WaitUntilReady(absl::Seconds(15)));
  ExpectAnsweredCorrectly(svc.address());
}

TEST(Liveness, ARestartedCoordinatorGetsItsWorkersBack) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Coordinator::Options o;
  o.world_size = 2;
  o.ring.ping_interval = absl::Milliseconds(200);
  o.ring.ring_timeout_seconds = 20;
  o.cluster_secret = "liveness-test-secret-0123456789";
  auto first = std::make_unique<Coordinator>(o);
  ASSERT_TRUE(first->BuildAndStart().ok());
  // The second coordinator must listen where the first did.
  o.listen_address = absl::StrCat("127.0.0.1:", first->port());
  o.internal_listen_address = first->internal_address();
  LocalWorkerPool::Options w;
  w.binary = WorkerBinary();
  w.count = 2;
  w.coordinator_address = first->internal_address();
  w.cluster_secret = o.cluster_secret;
  w.kernel = "cpu";
  LocalWorkerPool workers(w);
  ASSERT_TRUE(workers.Start().ok());
  ASSERT_TRUE(first->WaitUntilReady(absl::Seconds(60)));
  ExpectAnsweredCorrectly(o.listen_address);

  first->Shutdown();
  first.reset();
  std::unique_ptr<Coordinator> second;
  absl::Status started;
  for (int i = 0; i < 50; ++i) {  // the old ports may linger a moment
    second = std::make_unique<Coordinator>(o);
    started = second->BuildAndStart();
    if (started.ok()) break;
    second.reset();
    absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_TRUE(started.ok()) << started;
  const absl::Duration took = TimeUntilReady(*second, absl::Seconds(10));
  EXPECT_LT(took, absl::Seconds(10)) << "the workers did not come back within 10 s";
  std::fprintf(stderr, "ring re-formed %.2f s after the coordinator restarted\n",
               absl::ToDoubleSeconds(took));
  EXPECT_EQ(workers.restarts(), 0);
  ExpectAnsweredCorrectly(o.listen_address);
  workers.Stop();
  second->Shutdown();
}

}  // namespace
}  // namespace ringattn
