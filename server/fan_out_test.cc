// FanOut against an in-process WorkerService whose Ping answers, fails or blocks as each call's
// metadata says: every status comes back, a failure or a raised Cancellation cancels the calls
// still running (which the server sees), and the deadline reaches every call.
#include "server/fan_out.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ringattn/v1/worker.grpc.pb.h"

namespace ringattn {
namespace {

// Ping by the call's "mode": "ok" answers, "fail" answers UNAVAILABLE, "block" waits until its
// call is cancelled or past its deadline (and counts the calls it saw stopped).
class FakeWorker final : public v1::WorkerService::Service {
 public:
  grpc::Status Ping(grpc::ServerContext* ctx, const v1::PingRequest*,
                    v1::PingResponse* response) override {
    const auto mode = ctx->client_metadata().find("mode");
    const std::string m = mode == ctx->client_metadata().end()
                              ? "ok"
                              : std::string(mode->second.data(), mode->second.size());
    if (m == "fail") return grpc::Status(grpc::UNAVAILABLE, "fails on purpose");
    if (m == "block") {
      const auto give_up = std::chrono::system_clock::now() + std::chrono::seconds(20);
      while (!ctx->IsCancelled() && std::chrono::system_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      ++stopped;
      return grpc::Status(grpc::CANCELLED, "stopped");
    }
    response->set_generation(7);
    return grpc::Status::OK;
  }
  std::atomic<int> stopped{0};
};

class FanOutTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&worker_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::WorkerService::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override { server_->Shutdown(std::chrono::system_clock::now()); }

  // Pings once per mode; the statuses in order.
  std::vector<grpc::Status> Run(const std::vector<std::string>& modes,
                                const FanOutOptions& options) {
    const v1::PingRequest request;
    responses_.assign(modes.size(), v1::PingResponse());
    return FanOut(static_cast<int>(modes.size()), options,
                  [&](int i, grpc::ClientContext* ctx, std::function<void(grpc::Status)> done) {
                    ctx->AddMetadata("mode", modes[i]);
                    stub_->async()->Ping(ctx, &request, &responses_[i], std::move(done));
                  });
  }

  FakeWorker worker_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
  std::vector<v1::PingResponse> responses_;
};

TEST_F(FanOutTest, EveryCallAnswers) {
  const std::vector<grpc::Status> s = Run({"ok", "ok", "ok"}, {});
  ASSERT_EQ(s.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(s[i].ok()) << i << ": " << s[i].error_message();
    EXPECT_EQ(responses_[i].generation(), 7);
  }
  EXPECT_TRUE(Run({}, {}).empty());
}

TEST_F(FanOutTest, AFailureIsKeptAndTheOthersRunOnWhenNotAsked) {
  const std::vector<grpc::Status> s = Run({"ok", "fail", "ok"}, {});
  EXPECT_TRUE(s[0].ok());
  EXPECT_EQ(s[1].error_code(), grpc::UNAVAILABLE);
  EXPECT_EQ(s[1].error_message(), "fails on purpose");
  EXPECT_TRUE(s[2].ok());
}

TEST_F(FanOutTest, AFailureCancelsTheCallsStillRunning) {
  FanOutOptions options;
  options.cancel_all_on_failure = true;
  const absl::Time t0 = absl::Now();
  const std::vector<grpc::Status> s = Run({"block", "fail", "block"}, options);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  EXPECT_EQ(s[0].error_code(), grpc::CANCELLED);
  EXPECT_EQ(s[1].error_code(), grpc::UNAVAILABLE);
  EXPECT_EQ(s[2].error_code(), grpc::CANCELLED);
  // The worker saw both blocked calls stop.
  for (int i = 0; i < 200 && worker_.stopped < 2; ++i) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(worker_.stopped, 2);
}

TEST_F(FanOutTest, ACancellationStopsEveryCall) {
  Cancellation cancellation;
  FanOutOptions options;
  options.cancellation = &cancellation;
  std::thread canceller([&] {
    absl::SleepFor(absl::Milliseconds(200));
    cancellation.Cancel(absl::CancelledError("client gone"));
  });
  const absl::Time t0 = absl::Now();
  const std::vector<grpc::Status> s = Run({"block", "block"}, options);
  canceller.join();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  for (const grpc::Status& st : s) EXPECT_EQ(st.error_code(), grpc::CANCELLED);
  EXPECT_TRUE(absl::IsCancelled(cancellation.reason()));

  // Raised before: the calls are cancelled as they start.
  const std::vector<grpc::Status> again = Run({"block", "ok"}, options);
  EXPECT_EQ(again[0].error_code(), grpc::CANCELLED);
}

TEST_F(FanOutTest, TheDeadlineReachesEveryCall) {
  FanOutOptions options;
  options.deadline = absl::Now() + absl::Milliseconds(300);
  const absl::Time t0 = absl::Now();
  const std::vector<grpc::Status> s = Run({"block", "block"}, options);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  for (const grpc::Status& st : s) EXPECT_EQ(st.error_code(), grpc::DEADLINE_EXCEEDED);
}

TEST(CancellationTest, FirstReasonWinsAndTheListenerHearsIt) {
  Cancellation c;
  EXPECT_TRUE(c.reason().ok());
  int heard = 0;
  c.Listen([&] { ++heard; });
  c.Cancel(absl::DeadlineExceededError("late"));
  c.Cancel(absl::CancelledError("gone"));
  EXPECT_EQ(heard, 1);
  EXPECT_TRUE(absl::IsDeadlineExceeded(c.reason()));
  c.Listen(nullptr);
  // Listening after the fact hears it at once.
  c.Listen([&] { ++heard; });
  EXPECT_EQ(heard, 2);
}

}  // namespace
}  // namespace ringattn
