#include "server/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;
using ::testing::Not;

// The coordinator's labels.
ServiceMetrics MakeMetrics() {
  return ServiceMetrics({"Attend", "AttendStream", "AttendBackward", "AttendBackwardStream"});
}

v1::Timings MakeTimings(int workers, int steps) {
  v1::Timings t;
  t.set_queue_seconds(0.001);
  t.set_receive_seconds(0.002);
  t.set_scatter_seconds(0.003);
  t.set_gather_seconds(0.004);
  t.set_send_seconds(0.005);
  t.set_total_seconds(0.5);
  for (int r = 0; r < workers; ++r) {
    v1::WorkerTiming* w = t.add_workers();
    w->set_rank(r);
    w->set_compute_seconds(0.1 * (r + 1));
    w->set_comm_wait_seconds(0.01);
    w->set_ring_seconds(0.1 * (r + 2));
    for (int s = 0; s < steps; ++s) w->add_steps()->set_source_rank(s);
  }
  return t;
}

TEST(ServiceMetricsTest, SerializeHasEveryFamilyAndLabel) {
  ServiceMetrics m(
      {"Attend", "AttendStream", "AttendBackward", "AttendBackwardStream"},
      ServiceMetrics::Limits{.world_size = 3, .max_queue = 16, .max_queued_bytes = 1 << 20,
                             .pipeline_depth = 2});
  m.RecordRequest("Attend", absl::StatusCode::kOk, MakeTimings(/*workers=*/3, /*steps=*/3), 3000,
                  1000, RequestWork{.tokens = 7, .flops = 1e9});
  m.RecordRequest("AttendStream", grpc::StatusCode::INVALID_ARGUMENT, v1::Timings(), 0, 0,
                  RequestWork{.tokens = 5, .flops = 5});  // refused: its work is not counted
  m.RecordRequest("AttendBackward", absl::StatusCode::kUnavailable, MakeTimings(2, 0), 10, 0);
  m.SampleLoad([] {
    return ServiceMetrics::Load{.queued = 4, .running = 2, .held_bytes = 900, .ring_ready = true};
  });
  m.SetWorkersUp(3);
  const std::string text = m.Serialize();

  EXPECT_THAT(text, HasSubstr("ringattn_requests_total{code=\"OK\",rpc=\"Attend\"} 1"));
  EXPECT_THAT(
      text, HasSubstr("ringattn_requests_total{code=\"INVALID_ARGUMENT\",rpc=\"AttendStream\"} 1"));
  EXPECT_THAT(text,
              HasSubstr("ringattn_requests_total{code=\"UNAVAILABLE\",rpc=\"AttendBackward\"} 1"));
  EXPECT_THAT(text, HasSubstr("ringattn_requests_total{code=\"OK\",rpc=\"AttendBackward\"} 0"));
  EXPECT_THAT(
      text,
      HasSubstr(
          "ringattn_requests_total{code=\"RESOURCE_EXHAUSTED\",rpc=\"AttendBackwardStream\"} 0"));
  for (const char* phase : {"queue", "receive", "validate", "ring_wait", "scatter", "workers",
                            "compute", "comm_wait", "ring", "gather", "respond", "send"}) {
    // Only the OK request is broken down by phase, under its own RPC: forward and backward
    // are not mixed.
    EXPECT_THAT(text, HasSubstr(std::string("ringattn_request_phase_seconds_count{phase=\"") +
                                phase + "\",rpc=\"Attend\"} 1"))
        << phase;
    EXPECT_THAT(text, HasSubstr(std::string("ringattn_request_phase_seconds_count{phase=\"") +
                                phase + "\",rpc=\"AttendBackward\"} 0"))
        << phase;
  }
  // total is observed for every request, under its own RPC.
  for (const char* rpc : {"Attend", "AttendStream", "AttendBackward"}) {
    EXPECT_THAT(text, HasSubstr(std::string("ringattn_request_phase_seconds_count{phase=\"total\","
                                            "rpc=\"") +
                                rpc + "\"} 1"))
        << rpc;
  }
  EXPECT_THAT(text, HasSubstr("ringattn_request_phase_seconds_count{phase=\"total\","
                              "rpc=\"AttendBackwardStream\"} 0"));
  // compute and ring are the slowest worker's (0.3 s, 0.4 s); total 0.5 for Attend, 0.5 for
  // AttendBackward.
  EXPECT_THAT(
      text, HasSubstr("ringattn_request_phase_seconds_sum{phase=\"compute\",rpc=\"Attend\"} 0.3"));
  EXPECT_THAT(text,
              HasSubstr("ringattn_request_phase_seconds_sum{phase=\"ring\",rpc=\"Attend\"} 0.4"));
  EXPECT_THAT(text,
              HasSubstr("ringattn_request_phase_seconds_sum{phase=\"total\",rpc=\"Attend\"} 0.5"));
  EXPECT_THAT(
      text,
      HasSubstr("ringattn_request_phase_seconds_sum{phase=\"total\",rpc=\"AttendBackward\"} 0.5"));
  EXPECT_THAT(text,
              HasSubstr("ringattn_request_phase_seconds_bucket{phase=\"queue\",rpc=\"Attend\","
                        "le=\"0.001\"} 1"));
  EXPECT_THAT(text, HasSubstr("ringattn_request_bytes_total{direction=\"in\"} 3010"));
  EXPECT_THAT(text, HasSubstr("ringattn_request_bytes_total{direction=\"out\"} 1000"));
  EXPECT_THAT(text, HasSubstr("ringattn_tokens_total{rpc=\"Attend\"} 7"));
  EXPECT_THAT(text, HasSubstr("ringattn_flops_total{rpc=\"Attend\"} 1000000000"));
  EXPECT_THAT(text, HasSubstr("ringattn_tokens_total{rpc=\"AttendStream\"} 0"));
  EXPECT_THAT(text, HasSubstr("ringattn_flops_total{rpc=\"AttendBackward\"} 0"));
  EXPECT_THAT(text, HasSubstr("ringattn_queue_depth 4"));
  EXPECT_THAT(text, HasSubstr("ringattn_running_requests 2"));
  EXPECT_THAT(text, HasSubstr("ringattn_held_bytes 900"));
  EXPECT_THAT(text, HasSubstr("ringattn_ring_ready 1"));
  EXPECT_THAT(text, HasSubstr("ringattn_workers_up 3"));
  EXPECT_THAT(text, HasSubstr("ringattn_world_size 3"));
  EXPECT_THAT(text, HasSubstr("ringattn_max_queue 16"));
  EXPECT_THAT(text, HasSubstr("ringattn_max_queued_bytes 1048576"));
  EXPECT_THAT(text, HasSubstr("ringattn_pipeline_depth 2"));
  // 3 steps from the first request, 2 (one per worker, none listed) from the third.
  EXPECT_THAT(text, HasSubstr("ringattn_ring_steps_total 5"));
  EXPECT_THAT(text, MatchesRegex("(.|\n)*ringattn_build_info\\{component=\"coordinator\","
                                 "cuda=\"(true|false)\",cudnn=\"(true|false)\",nccl=\"(true|"
                                 "false)\",version=\"[0-9]+\\.[0-9]+\\.[0-9]+\"\\} 1\n(.|\n)*"));
  EXPECT_THAT(text, HasSubstr("# TYPE ringattn_request_phase_seconds histogram"));
  EXPECT_THAT(text, HasSubstr("# TYPE ringattn_requests_total counter"));
  EXPECT_THAT(text, HasSubstr("# TYPE ringattn_queue_depth gauge"));
}

// The first ring is a formation, not a re-form.
TEST(ServiceMetricsTest, ReformsCountRingsAfterTheFirst) {
  ServiceMetrics m = MakeMetrics();
  EXPECT_THAT(m.Serialize(), HasSubstr("ringattn_ring_formations_total 0"));
  m.RecordRingFormed();
  EXPECT_THAT(m.Serialize(), HasSubstr("ringattn_ring_formations_total 1"));
  EXPECT_THAT(m.Serialize(), HasSubstr("ringattn_ring_reforms_total 0"));
  m.RecordRingFormed();
  m.RecordRingFormed();
  EXPECT_THAT(m.Serialize(), HasSubstr("ringattn_ring_formations_total 3"));
  EXPECT_THAT(m.Serialize(), HasSubstr("ringattn_ring_reforms_total 2"));
}

// The load gauges are read at each collection, not when they last changed.
TEST(ServiceMetricsTest, LoadIsSampledAtEachCollection) {
  ServiceMetrics m = MakeMetrics();
  int64_t queued = 1;
  m.SampleLoad([&queued] { return ServiceMetrics::Load{.queued = queued}; });
  EXPECT_THAT(m.Serialize(), HasSubstr("ringattn_queue_depth 1\n"));
  queued = 9;
  EXPECT_THAT(m.Serialize(), HasSubstr("ringattn_queue_depth 9\n"));
  EXPECT_THAT(m.Serialize(), HasSubstr("ringattn_ring_ready 0\n"));
}

// FlashAttention's count, against the formula written out: 4 b h s^2 d, halved when causal.
TEST(ServiceMetricsTest, WorkOfAShape) {
  const AttentionShape shape = AttentionShape::Self(DType::kBF16, /*batch=*/2, /*rows=*/3816,
                                                    /*heads=*/5, /*heads_k=*/1, /*head_dim=*/64);
  const RequestWork dense = WorkOf(shape, /*causal=*/false, 1.0);
  EXPECT_EQ(dense.tokens, 2 * 3816);
  EXPECT_DOUBLE_EQ(dense.flops, 4.0 * 2 * 5 * 3816.0 * 3816.0 * 64);
  EXPECT_DOUBLE_EQ(WorkOf(shape, /*causal=*/true, 1.0).flops, dense.flops / 2);
  EXPECT_DOUBLE_EQ(WorkOf(shape, /*causal=*/false, 2.5).flops, dense.flops * 2.5);
  EXPECT_EQ(WorkOf(shape, true, 2.5).tokens, 2 * 3816);
}

TEST(ServiceMetricsTest, PhaseNames) {
  EXPECT_STREQ(ServiceMetrics::PhaseName(ServiceMetrics::Phase::kCommWait), "comm_wait");
  EXPECT_STREQ(ServiceMetrics::PhaseName(ServiceMetrics::Phase::kTotal), "total");
}

// Sends `request` to 127.0.0.1:port and returns everything read until the server closes.
std::string HttpExchange(int port, const std::string& request) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "socket failed";
  timeval timeout{.tv_sec = 10, .tv_usec = 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    response = "connect failed";
  } else if (send(fd, request.data(), request.size(), 0) != static_cast<ssize_t>(request.size())) {
    response = "send failed";
  } else {
    char buf[4096];
    ssize_t n;
    while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) response.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return response;
}

TEST(ServiceMetricsTest, AnRpcOutsideTheLabelsIsNotCounted) {
  ServiceMetrics m({"Attend"});
  m.RecordRequest("Attend", absl::StatusCode::kOk, MakeTimings(1, 1), 4, 4);
  m.RecordRequest("Other", absl::StatusCode::kOk, MakeTimings(1, 1), 4, 4);
  const std::string text = m.Serialize();
  EXPECT_THAT(text, HasSubstr("ringattn_requests_total{code=\"OK\",rpc=\"Attend\"} 1"));
  EXPECT_THAT(text, Not(HasSubstr("Other")));
  EXPECT_THAT(text, HasSubstr("ringattn_request_bytes_total{direction=\"in\"} 8"));
}

TEST(ServiceMetricsTest, ExposerAnswersHttpGetOnAnEphemeralPort) {
  ServiceMetrics m = MakeMetrics();
  EXPECT_EQ(m.exposer_port(), 0);
  ASSERT_TRUE(m.StartExposer("127.0.0.1:0").ok());
  const int port = m.exposer_port();
  ASSERT_GT(port, 0);
  m.RecordRequest("Attend", absl::StatusCode::kOk, MakeTimings(1, 1), 1, 1);
  const std::string response = HttpExchange(port, "GET /metrics HTTP/1.0\r\n\r\n");
  EXPECT_THAT(response, HasSubstr("200 OK"));
  EXPECT_THAT(response, HasSubstr("ringattn_requests_total{code=\"OK\",rpc=\"Attend\"} 1"));
  EXPECT_THAT(response, HasSubstr("ringattn_request_phase_seconds"));

  const absl::Status again = m.StartExposer("127.0.0.1:0");
  EXPECT_EQ(again.code(), absl::StatusCode::kFailedPrecondition) << again;
  EXPECT_EQ(m.exposer_port(), port);
}

TEST(ServiceMetricsTest, ExposerOnABusyPortIsUnavailable) {
  ServiceMetrics first = MakeMetrics();
  ASSERT_TRUE(first.StartExposer("127.0.0.1:0").ok());
  ServiceMetrics second = MakeMetrics();
  const absl::Status s = second.StartExposer("127.0.0.1:" + std::to_string(first.exposer_port()));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("cannot serve metrics on '127.0.0.1:"));
  EXPECT_EQ(second.exposer_port(), 0);
  // The failed one did not disturb the first.
  EXPECT_THAT(HttpExchange(first.exposer_port(), "GET /metrics HTTP/1.0\r\n\r\n"),
              HasSubstr("ringattn_workers_up"));
  EXPECT_THAT(second.Serialize(), Not(HasSubstr("ringattn_requests_total{code=\"OK\"} 1")));
}

}  // namespace
}  // namespace ringattn
