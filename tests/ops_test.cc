// Operations end to end on CPU workers (`ringattn worker` processes): the coordinator's log line
// per request (id, RPC, shape, code, client, phases; text and JSON), the caller's W3C trace
// context carried through the coordinator's span to every worker's shard line, and a
// coordinator refusing to start on a port in use.
#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/log.h"
#include "client/attention_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ringattn/v1/attention.grpc.pb.h"
#include "server/coordinator.h"
#include "tests/service_fixture.h"

namespace ringattn {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::SizeIs;

constexpr char kTraceId[] = "4bf92f3577b34da6a3ce929d0e0e4736";
constexpr char kCallerSpan[] = "00f067aa0ba902b7";

// The lines of `lines` that hold `needle`.
std::vector<std::string> With(const std::vector<std::string>& lines, const std::string& needle) {
  std::vector<std::string> out;
  for (const std::string& l : lines) {
    if (l.find(needle) != std::string::npos) out.push_back(l);
  }
  return out;
}

std::vector<std::string> FileLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// A coordinator and two CPU workers whose stderr (their log) goes to a file: they inherit this
// process's at their start.
class OpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(test::WorkerBinary().empty()) << "RINGATTN_BIN not set";
    worker_log_ = absl::StrCat(::testing::TempDir(), "/ops_test_workers_", getpid(), ".log");
    const int saved = dup(2);
    const int fd = open(worker_log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd, 0);
    dup2(fd, 2);
    close(fd);
    service_ = std::make_unique<test::LocalService>(2, Coordinator::Options{}, "cpu");
    dup2(saved, 2);
    close(saved);
    ASSERT_TRUE(service_->start_status().ok()) << service_->start_status();
  }
  void TearDown() override {
    service_.reset();
    ConfigureLog(LogFormat::kText, LogLevel::kInfo);
    unlink(worker_log_.c_str());
  }

  std::string worker_log_;
  std::unique_ptr<test::LocalService> service_;
};

TEST_F(OpsTest, ARequestsLineCarriesItsIdAndTheCallersTraceToEveryWorker) {
  ConfigureLog(LogFormat::kText, LogLevel::kInfo);
  LogCapture capture;
  auto stub = test::UnlimitedStub(service_->address());
  v1::AttendRequest request = test::MakeRequest(test::Shape{1, 37, 5, 1, 64, v1::DTYPE_FP32});
  request.set_request_id("ops-1");
  v1::AttendResponse response;
  grpc::ClientContext ctx;
  ctx.AddMetadata("traceparent", absl::StrCat("00-", kTraceId, "-", kCallerSpan, "-01"));
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  const grpc::Status status = stub->Attend(&ctx, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();

  const std::vector<std::string> mine = With(capture.lines(), "request_id=ops-1");
  ASSERT_THAT(mine, SizeIs(1));
  EXPECT_THAT(mine[0],
              AllOf(HasSubstr(" INFO request: request request_id=ops-1 rpc=Attend code=OK "
                              "client=peer:ipv4:127.0.0.1 "),
                    HasSubstr(absl::StrCat(" trace_id=", kTraceId, " ")),
                    HasSubstr(absl::StrCat(" parent_span_id=", kCallerSpan, " ")),
                    HasSubstr(" shape=1x37x5x64 heads_k=1 dtype=fp32 "), HasSubstr(" bytes_out="),
                    HasSubstr(" total_ms="), HasSubstr(" queue_ms="), HasSubstr(" workers_ms=")));
  std::smatch span;
  ASSERT_TRUE(std::regex_search(mine[0], span, std::regex(" span_id=([0-9a-f]{16}) ")));
  EXPECT_NE(span[1].str(), kCallerSpan);  // the coordinator's own span

  // Each worker logged its shard under the same trace, as a child of the coordinator's span.
  const std::vector<std::string> shards =
      With(FileLines(worker_log_), "worker: shard request_id=ops-1 ");
  ASSERT_THAT(shards, SizeIs(2));
  for (const std::string& line : shards) {
    EXPECT_THAT(line, AllOf(HasSubstr(" rpc=RunShard code=OK "),
                            HasSubstr(absl::StrCat(" trace_id=", kTraceId, " ")),
                            HasSubstr(absl::StrCat(" parent_span_id=", span[1].str(), " ")),
                            HasSubstr(" handler_ms=")));
  }
  EXPECT_THAT(With(shards, " rank=0 "), SizeIs(1));
  EXPECT_THAT(With(shards, " rank=1 "), SizeIs(1));
}

TEST_F(OpsTest, JsonLinesForStreamedAndRefusedRequestsAndNewTraces) {
  ConfigureLog(LogFormat::kJson, LogLevel::kInfo);
  LogCapture capture;
  absl::StatusOr<std::unique_ptr<AttentionClient>> client =
      AttentionClient::Connect(service_->address(), absl::Seconds(10));
  ASSERT_TRUE(client.ok()) << client.status();
  // Streamed, without an id or a traceparent: the coordinator makes both.
  const v1::AttendRequest streamed =
      test::MakeRequest(test::Shape{1, 20, 4, 2, 64, v1::DTYPE_FP32});
  absl::StatusOr<v1::AttendResponse> answer =
      (*client)->AttendStreaming(streamed, absl::Seconds(60), /*chunk_bytes=*/4096);
  ASSERT_TRUE(answer.ok()) << answer.status();
  // Refused at validation (head_dim 7): still one line, a warning with the error.
  v1::AttendRequest refused = test::MakeRequest(test::Shape{1, 20, 4, 2, 7, v1::DTYPE_FP32});
  refused.set_request_id("ops-refused");
  EXPECT_TRUE(absl::IsInvalidArgument((*client)->Attend(refused, absl::Seconds(60)).status()));

  const std::vector<std::string> lines = With(capture.lines(), "\"component\":\"request\"");
  ASSERT_THAT(lines, SizeIs(2));
  EXPECT_TRUE(std::regex_match(
      lines[0],
      std::regex("\\{\"ts\":\"[0-9-]+T[0-9:.]+Z\",\"level\":\"info\",\"component\":\"request\","
                 "\"msg\":\"request\",\"request_id\":\"" +
                 answer->request_id() +
                 "\",\"rpc\":\"AttendStream\",\"code\":\"OK\",\"client\":\"[^\"]+\","
                 "\"trace_id\":\"[0-9a-f]{32}\",\"span_id\":\"[0-9a-f]{16}\","
                 "\"shape\":\"1x20x4x64\",\"heads_k\":2,\"dtype\":\"fp32\",.*"
                 "\"receive_ms\":[0-9.e-]+,.*\"send_ms\":[0-9.e-]+\\}")))
      << lines[0];
  EXPECT_THAT(lines[0], testing::StartsWith("{"));
  EXPECT_THAT(
      lines[1],
      AllOf(HasSubstr("\"level\":\"warning\""), HasSubstr("\"request_id\":\"ops-refused\""),
            HasSubstr("\"code\":\"INVALID_ARGUMENT\""), HasSubstr("\"error\":\"q.shape[3]")));
}

TEST(OpsStartTest, ACoordinatorOnAPortInUseFailsToStart) {
  Coordinator::Options o;
  o.metrics_address = "";
  Coordinator first(o);
  ASSERT_TRUE(first.BuildAndStart().ok());
  // gRPC would share a port (SO_REUSEPORT) unless told not to: each plane must refuse.
  for (const int plane : {0, 1, 2}) {
    Coordinator::Options busy = o;
    const std::string taken =
        plane == 1 ? first.internal_address() : absl::StrCat("127.0.0.1:", first.port());
    if (plane == 0) busy.listen_address = taken;
    if (plane == 1) busy.internal_listen_address = taken;
    if (plane == 2) busy.health_listen_address = taken;
    Coordinator second(busy);
    const absl::Status s = second.BuildAndStart();
    EXPECT_TRUE(absl::IsUnavailable(s)) << plane << ": " << s;
    EXPECT_THAT(s.message(), HasSubstr(absl::StrCat("cannot listen on ", taken))) << plane;
  }
}

}  // namespace
}  // namespace ringattn
