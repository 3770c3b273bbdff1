// The service end to end through gRPC on loopback: an in-process coordinator and real worker
// processes (`ringattn worker`, Gloo ring), checked against the fp64 reference; bad input,
// deadlines, a killed worker, the streaming path, admission and the health/info endpoints.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <functional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/params_check.h"
#include "proto/cluster_auth.h"
#include "ringattn/v1/attention.grpc.pb.h"
#include "ringattn/v1/worker.grpc.pb.h"
#include "server/coordinator.h"
#include "server/local_workers.h"
#include "tests/service_fixture.h"

namespace ringattn {
namespace {

using test::ExpectMatchesReference;
using test::MakeRequest;
using test::ReferenceParams;
using test::Shape;
using test::WorkerBinary;

// The shared coordinator and workers, with /metrics on a free port, and a stub on a channel
// without message size limits.
class Service : public test::LocalService {
 public:
  explicit Service(int world, Coordinator::Options options = {})
      : LocalService(world, WithMetrics(std::move(options))) {
    if (!start_status().ok()) return;
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(INT_MAX);  // responses carry whole output tensors
    args.SetMaxSendMessageSize(INT_MAX);
    channel_ = grpc::CreateCustomChannel(address(), grpc::InsecureChannelCredentials(), args);
    stub_ = v1::AttentionService::NewStub(channel_);
  }
  ~Service() { Stop(); }
  v1::AttentionService::Stub& stub() { return *stub_; }
  std::shared_ptr<grpc::Channel> channel_ptr() { return channel_; }

 private:
  static Coordinator::Options WithMetrics(Coordinator::Options options) {
    options.metrics_address = "127.0.0.1:0";
    return options;
  }

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
};

grpc::Status Call(Service& svc, const v1::AttendRequest& req, v1::AttendResponse* resp,
                  absl::Duration timeout = absl::Seconds(60)) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  return svc.stub().Attend(&ctx, req, resp);
}

// Correctness through the service, world sizes 1 to 4, with awkward sizes and options.
class ServiceWorlds : public ::testing::TestWithParam<int> {};

TEST_P(ServiceWorlds, MatchesReference) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Service svc(GetParam());
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();

  struct Case {
    const char* name;
    Shape shape;
    bool causal;
    v1::Layout layout;
    int64_t window_left, window_right;
    bool alibi;
    float softcap;
  };
  const Case cases[] = {
      {"seq7_gqa_causal", {1, 7, 8, 2, 64, v1::DTYPE_FP32}, true, v1::LAYOUT_AUTO, -1, -1, false, 0},
      {"seq1", {1, 1, 5, 5, 64, v1::DTYPE_FP32}, true, v1::LAYOUT_AUTO, -1, -1, false, 0},
      {"heads5_noncausal", {2, 255, 5, 5, 64, v1::DTYPE_FP32}, false, v1::LAYOUT_AUTO, -1, -1,
       false, 0},
      {"stripe_window_alibi", {1, 100, 8, 1, 128, v1::DTYPE_FP32}, true, v1::LAYOUT_STRIPE, 20, -1,
       true, 0},
      {"zigzag_softcap_bf16", {1, 381, 8, 2, 128, v1::DTYPE_BF16}, true, v1::LAYOUT_ZIGZAG, -1,
       -1, false, 30},
      {"contiguous_fp16_window", {1, 200, 4, 2, 64, v1::DTYPE_FP16}, false,
       v1::LAYOUT_CONTIGUOUS, 16, 16, false, 0},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::AttendRequest req = MakeRequest(c.shape);
    req.set_request_id(c.name);
    req.set_layout(c.layout);
    req.mutable_options()->set_causal(c.causal);
    if (c.window_left >= 0) req.mutable_options()->set_window_left(c.window_left);
    if (c.window_right >= 0) req.mutable_options()->set_window_right(c.window_right);
    if (c.alibi) {
      for (int h = 0; h < c.shape.heads; ++h) req.mutable_options()->add_alibi_slopes(0.25f / (h + 1));
    }
    req.mutable_options()->set_softcap(c.softcap);
    v1::AttendResponse resp;
    grpc::Status s = Call(svc, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(resp.request_id(), c.name);
    EXPECT_EQ(resp.plan().world_size(), GetParam());
    EXPECT_NE(resp.plan().layout(), v1::LAYOUT_AUTO);
    ASSERT_EQ(resp.timings().workers_size(), GetParam());
    EXPECT_GT(resp.timings().total_seconds(), 0);
    for (const v1::WorkerTiming& w : resp.timings().workers()) {
      EXPECT_EQ(w.steps_size(), GetParam());
    }
    ExpectMatchesReference(req, resp);
  }
}

INSTANTIATE_TEST_SUITE_P(World, ServiceWorlds, ::testing::Values(1, 2, 3, 4));

// The coordinator's reported phases, which do not overlap: their sum is at most the total.
double CoordinatorPhaseSum(const v1::Timings& t) {
  return t.receive_seconds() + t.validate_seconds() + t.queue_seconds() +
         t.ring_wait_seconds() + t.scatter_seconds() + t.workers_seconds() +
         t.gather_seconds() + t.respond_seconds() + t.send_seconds();
}

// Every millisecond of the coordinator's total is in a reported phase (>= 95% of it), and each
// worker's phases lie within its handler, the handler within the coordinator's call to it, and
// the call within the fan-out. Accounting, not speed: on a loaded machine a preemption may land
// between two phases, so the coverage needs one of a few requests; the nesting holds for all.
TEST(ServiceTimings, PhasesCoverTheTotal) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  constexpr int kWorld = 2;
  Service svc(kWorld);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  const Shape shape{1, 1024, 4, 2, 64, v1::DTYPE_FP32};
  constexpr double kSlack = 1e-3;  // seconds; clock reads of two processes
  double best_coverage = 0;
  for (int attempt = 0; attempt < 5 && best_coverage < 0.95; ++attempt) {
    v1::AttendRequest req = MakeRequest(shape);
    req.mutable_options()->set_causal(true);
    v1::AttendResponse resp;
    const grpc::Status st = Call(svc, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    const v1::Timings& t = resp.timings();
    ASSERT_GT(t.total_seconds(), 0);
    EXPECT_GT(t.workers_seconds(), 0);
    const double sum = CoordinatorPhaseSum(t);
    EXPECT_LE(sum, t.total_seconds() + 1e-6) << t.DebugString();
    ASSERT_EQ(t.workers_size(), kWorld);
    for (const v1::WorkerTiming& w : t.workers()) {
      SCOPED_TRACE(absl::StrCat("rank ", w.rank()));
      EXPECT_EQ(w.host_to_device_seconds(), 0);  // CPU workers
      EXPECT_EQ(w.device_to_host_seconds(), 0);
      EXPECT_GT(w.handler_seconds(), 0);
      EXPECT_LE(w.receive_seconds() + w.ring_seconds() + w.send_seconds(),
                w.handler_seconds() + 1e-6);
      EXPECT_LE(w.handler_seconds(), w.call_seconds() + kSlack);
      EXPECT_LE(w.call_seconds(), t.workers_seconds() + 1e-6);
    }
    best_coverage = std::max(best_coverage, sum / t.total_seconds());
  }
  EXPECT_GE(best_coverage, 0.95);
}

// Every kind of bad input gets its status naming the field, and the service keeps serving.
TEST(ServiceErrors, BadInputThenGoodRequest) {
  Service svc(2);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  Shape s;
  struct Bad {
    const char* name;
    std::function<void(v1::AttendRequest*)> mutate;
    grpc::StatusCode code;
    const char* expect;
  };
  const std::vector<Bad> bad = {
      {"byte count", [](v1::AttendRequest* r) { r->mutable_k()->mutable_data()->resize(10); },
       grpc::StatusCode::INVALID_ARGUMENT, "k.data"},
      {"seq mismatch", [](v1::AttendRequest* r) { r->mutable_k()->set_shape(1, 63); },
       grpc::StatusCode::INVALID_ARGUMENT, "k.shape[1]"},
      {"dtype", [](v1::AttendRequest* r) { r->mutable_q()->set_dtype(v1::DTYPE_UNSPECIFIED); },
       grpc::StatusCode::INVALID_ARGUMENT, "q.dtype"},
      {"zero batch", [](v1::AttendRequest* r) { r->mutable_q()->set_shape(0, 0); },
       grpc::StatusCode::INVALID_ARGUMENT, "q.shape[0]"},
      {"negative", [](v1::AttendRequest* r) { r->mutable_v()->set_shape(3, -64); },
       grpc::StatusCode::INVALID_ARGUMENT, "v.shape[3]"},
      {"heads not divisible",
       [](v1::AttendRequest* r) {
         r->mutable_k()->set_shape(2, 3);
         r->mutable_v()->set_shape(2, 3);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "heads"},
      {"missing tensor", [](v1::AttendRequest* r) { r->clear_v(); }, grpc::StatusCode::INVALID_ARGUMENT,
       "v"},
      {"head_dim", [](v1::AttendRequest* r) {
         for (v1::Tensor* t : {r->mutable_q(), r->mutable_k(), r->mutable_v()}) t->set_shape(3, 96);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "head_dim 96"},
      {"dropout", [](v1::AttendRequest* r) { r->mutable_options()->set_dropout_p(1.0f); },
       grpc::StatusCode::INVALID_ARGUMENT, "dropout_p"},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.name);
    v1::AttendRequest req = MakeRequest(s);
    b.mutate(&req);
    v1::AttendResponse resp;
    grpc::Status st = Call(svc, req, &resp);
    EXPECT_EQ(st.error_code(), b.code) << st.error_message();
    EXPECT_NE(st.error_message().find(b.expect), std::string::npos) << st.error_message();
  }
  // NaN inputs are computed, not refused, and do not crash anything.
  v1::AttendRequest nan_req = MakeRequest(s);
  float* q = reinterpret_cast<float*>(nan_req.mutable_q()->mutable_data()->data());
  q[5] = std::nanf("");
  v1::AttendResponse nan_resp;
  ASSERT_TRUE(Call(svc, nan_req, &nan_resp).ok());
  // And the next request succeeds.
  v1::AttendRequest good = MakeRequest(s);
  v1::AttendResponse resp;
  grpc::Status st = Call(svc, good, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ExpectMatchesReference(good, resp);
}

// "" when the fp32 `resp.out` of `req` matches the fp64 reference, else what is wrong.
std::string OutMismatch(const v1::AttendRequest& req, const v1::AttendResponse& resp) {
  absl::StatusOr<ReferenceResult> ref = test::ReferenceOf(req);
  if (!ref.ok()) return ref.status().ToString();
  if (resp.out().data().size() != ref->o.size() * sizeof(float)) {
    return "out has " + std::to_string(resp.out().data().size()) + " bytes; ";
  }
  const ErrorStats e = CompareTensor(resp.out().data().data(), DType::kF32, ref->o.data(),
                                     static_cast<int64_t>(ref->o.size()));
  return e.Within(1e-5, 1.0) ? "" : "out vs fp64: " + e.ToString() + "; ";
}

// `threads` threads make `calls` calls each at once, call(t, c) returning what went wrong ("":
// nothing); every call must come back right.
void ExpectEachCallRight(int threads, int calls,
                         const std::function<std::string(int t, int c)>& call) {
  std::vector<std::thread> running;
  std::vector<std::string> failures(threads);
  for (int t = 0; t < threads; ++t) {
    running.emplace_back([&, t] {
      for (int c = 0; c < calls; ++c) failures[t] += call(t, c);
    });
  }
  for (auto& th : running) th.join();
  for (int t = 0; t < threads; ++t) EXPECT_EQ(failures[t], "") << "thread " << t;
}

// `req` through AttendStream in chunks of `chunk` bytes, the answer reassembled into `resp`;
// `chunks` gets the number of response chunks. A broken chunk protocol fails the test.
grpc::Status Streamed(Service& svc, const v1::AttendRequest& req, size_t chunk,
                      v1::AttendResponse* resp, int* chunks = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(120)));
  auto stream = svc.stub().AttendStream(&ctx);
  v1::AttendStreamRequest header;
  *header.mutable_header() = req;
  for (v1::Tensor* t : {header.mutable_header()->mutable_q(), header.mutable_header()->mutable_k(),
                        header.mutable_header()->mutable_v()}) {
    t->clear_data();
  }
  bool writing = stream->Write(header);
  const std::pair<v1::TensorChunk::Which, const std::string*> parts[] = {
      {v1::TensorChunk::WHICH_Q, &req.q().data()},
      {v1::TensorChunk::WHICH_K, &req.k().data()},
      {v1::TensorChunk::WHICH_V, &req.v().data()}};
  for (const auto& [which, bytes] : parts) {
    for (size_t off = 0; writing && off < bytes->size(); off += chunk) {
      v1::AttendStreamRequest m;
      m.mutable_chunk()->set_tensor(which);
      m.mutable_chunk()->set_offset(static_cast<int64_t>(off));
      m.mutable_chunk()->set_data(bytes->substr(off, chunk));
      writing = stream->Write(m);
    }
  }
  if (writing) stream->WritesDone();
  v1::AttendStreamResponse m;
  int n = 0;
  bool header_seen = false;
  while (stream->Read(&m)) {
    if (!header_seen) {
      EXPECT_TRUE(m.has_header());
      *resp = m.header();
      header_seen = true;
      continue;
    }
    EXPECT_TRUE(m.has_chunk());
    std::string* dst = m.chunk().tensor() == v1::TensorChunk::WHICH_OUT
                           ? resp->mutable_out()->mutable_data()
                           : resp->mutable_lse()->mutable_data();
    EXPECT_EQ(m.chunk().offset(), static_cast<int64_t>(dst->size()));
    dst->append(m.chunk().data());
    ++n;
  }
  if (chunks != nullptr) *chunks = n;
  return stream->Finish();
}

// Unary above the limit is RESOURCE_EXHAUSTED; the same tensors stream and come back right.
TEST(ServiceStreaming, LargerThanUnaryLimit) {
  Coordinator::Options o;
  o.max_unary_bytes = 256 << 10;
  o.stream_chunk_bytes = 100003;  // not a multiple of any element size
  Service svc(3, o);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  Shape s{1, 1000, 4, 2, 64, v1::DTYPE_FP32};  // q alone is 1 MB
  v1::AttendRequest req = MakeRequest(s);
  req.mutable_options()->set_causal(true);
  v1::AttendResponse unary;
  grpc::Status st = Call(svc, req, &unary);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();

  v1::AttendResponse resp;
  int chunks = 0;
  grpc::Status fin = Streamed(svc, req, 65537, &resp, &chunks);
  ASSERT_TRUE(fin.ok()) << fin.error_message();
  EXPECT_GT(chunks, 10);
  EXPECT_GT(resp.timings().receive_seconds(), 0);
  ExpectMatchesReference(req, resp);
}

// Streamed requests land their chunks in the coordinator's landing arenas (pipeline depth + 1
// of them); more streams at once than arenas assemble in memory instead. Streams and unary
// calls in flight together, through both, each get their own answer.
TEST(ServiceStreaming, MoreStreamsThanLandingArenasEachGetTheirOwnAnswer) {
  Coordinator::Options o;
  o.pipeline_depth = 1;  // two landing arenas
  Service svc(2, o);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  ExpectEachCallRight(5, 2, [&](int t, int c) -> std::string {
    const Shape shape{1, 150 + 61 * t + c, 5, 1, 64, v1::DTYPE_FP32};
    v1::AttendRequest req = MakeRequest(shape, 300 + 10 * t + c);
    req.mutable_options()->set_causal(t % 2 == 0);
    v1::AttendResponse resp;
    const grpc::Status st = t == 4 ? Call(svc, req, &resp, absl::Seconds(120))
                                   : Streamed(svc, req, 7001 + 13 * t, &resp);
    if (!st.ok()) return st.error_message();
    std::string wrong = OutMismatch(req, resp);
    if (resp.lse().data().size() != req.q().shape(1) * 5 * sizeof(float)) {
      wrong += "lse has " + std::to_string(resp.lse().data().size()) + " bytes; ";
    }
    return wrong;
  });
}

// Waits until every worker of the ring reports `busy` (running a shard) or not; false after
// `timeout`. Polled every 10 ms.
bool WaitForWorkers(Service& svc, bool busy, absl::Duration timeout) {
  const ClusterSecret secret = *ClusterSecret::FromString(svc.coordinator().cluster_secret());
  const absl::Time stop_by = absl::Now() + timeout;
  for (const std::string& address : svc.coordinator().worker_addresses()) {
    auto stub = v1::WorkerService::NewStub(
        ClusterChannel(address, grpc::ChannelArguments(), secret));
    bool reached = false;
    while (!reached && absl::Now() < stop_by) {
      grpc::ClientContext pctx;
      v1::PingResponse pong;
      reached = stub->Ping(&pctx, v1::PingRequest(), &pong).ok() && pong.busy() == busy;
      if (!reached) absl::SleepFor(absl::Milliseconds(10));
    }
    if (!reached) return false;
  }
  return true;
}

bool WorkersIdle(Service& svc, absl::Duration timeout) {
  return WaitForWorkers(svc, /*busy=*/false, timeout);
}

// After a failed request: a small one is answered, and matches the reference.
void ExpectNextRequestMatchesReference(Service& svc) {
  Shape small;
  const v1::AttendRequest next = MakeRequest(small);
  v1::AttendResponse resp;
  const grpc::Status st = Call(svc, next, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ExpectMatchesReference(next, resp);
}

// Work longer than the deadline: DEADLINE_EXCEEDED, the workers stop, the next request works.
// The deadline passes inside a ring step (seconds of CPU work, more on a loaded machine), which
// the kernels leave within a block of work: no worker is busy 2 s later, however long the step.
TEST(ServiceFaults, DeadlineShorterThanWork) {
  Service svc(2);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  Shape big{1, 6144, 8, 8, 128, v1::DTYPE_BF16};  // seconds of CPU work
  v1::AttendRequest req = MakeRequest(big);
  v1::AttendResponse resp;
  const absl::Time t0 = absl::Now();
  grpc::Status st = Call(svc, req, &resp, absl::Milliseconds(300));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(3));

  // The workers were told to stop, and stop inside the step.
  EXPECT_TRUE(WorkersIdle(svc, absl::Seconds(2)));
  ExpectNextRequestMatchesReference(svc);
}

// The client cancels inside a ring step (each of the two steps is seconds of CPU work): it sees
// CANCELLED, every worker is free again within a second of the cancel (the kernels poll the
// ring's abort between blocks of work instead of finishing the step), and the next request is
// answered. Bounds of the fault model (docs/security.md), generous for a loaded 2-core machine.
TEST(ServiceFaults, ACancelInsideARingStepFreesTheWorkers) {
  Service svc(2);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  Shape big{1, 12288, 8, 8, 128, v1::DTYPE_BF16};  // a ring step: seconds of CPU work
  const v1::AttendRequest req = MakeRequest(big);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(120)));
  grpc::Status st;
  std::thread caller([&] {
    v1::AttendResponse resp;
    st = svc.stub().Attend(&ctx, req, &resp);
  });
  // Both workers run their shard (RunShard is unary: the ring computes from the start), then
  // 0.3 s more: inside the first step.
  const bool busy = WaitForWorkers(svc, /*busy=*/true, absl::Seconds(60));
  absl::SleepFor(absl::Milliseconds(300));
  const absl::Time cancelled = absl::Now();
  ctx.TryCancel();
  caller.join();
  ASSERT_TRUE(busy) << "the workers never ran the request";
  EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED) << st.error_message();
  ASSERT_TRUE(WorkersIdle(svc, absl::Seconds(30)));
  const absl::Duration freed = absl::Now() - cancelled;
  ExpectNextRequestMatchesReference(svc);
  const absl::Duration answered = absl::Now() - cancelled;
  std::fprintf(stderr, "workers free %.3f s after the cancel; next request answered %.3f s after it\n",
               absl::ToDoubleSeconds(freed), absl::ToDoubleSeconds(answered));
  EXPECT_LT(freed, absl::Seconds(1)) << "the ring ran on after the cancel";
  EXPECT_LT(answered, absl::Seconds(5));
}

// A request whose client set no deadline still ends at the server's maximum request time
// (DEADLINE_EXCEEDED), freeing the ring for the next one.
TEST(ServiceFaults, NoClientDeadlineStillEndsAtTheServersMaximum) {
  Coordinator::Options o;
  o.max_request_time = absl::Seconds(2);
  Service svc(2, o);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  // Several times the 2 s maximum of CPU work (8192 tokens took 1.75 s once the CPU kernel
  // used AVX-512: too close).
  Shape big{1, 16384, 8, 8, 128, v1::DTYPE_BF16};
  const v1::AttendRequest req = MakeRequest(big);
  v1::AttendResponse resp;
  grpc::ClientContext ctx;  // no deadline
  const absl::Time t0 = absl::Now();
  const grpc::Status st = svc.stub().Attend(&ctx, req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(8));
  // The next request (within the same 2 s) once the workers have left the old ring.
  ASSERT_TRUE(svc.coordinator().WaitUntilReady(absl::Seconds(60)));
  ExpectNextRequestMatchesReference(svc);
}

// A stream whose client sends its header and then nothing is cancelled after the idle timeout
// (it would otherwise hold its buffers for ever); the service keeps serving.
TEST(ServiceFaults, ASilentStreamIsCancelledAfterTheIdleTimeout) {
  Coordinator::Options o;
  o.stream_idle_timeout = absl::Seconds(1);
  Service svc(2, o);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  Shape s{1, 1024, 8, 8, 128, v1::DTYPE_BF16};
  v1::AttendStreamRequest header;
  *header.mutable_header() = MakeRequest(s);
  for (v1::Tensor* t : {header.mutable_header()->mutable_q(), header.mutable_header()->mutable_k(),
                        header.mutable_header()->mutable_v()}) {
    t->clear_data();
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  auto stream = svc.stub().AttendStream(&ctx);
  ASSERT_TRUE(stream->Write(header));
  const absl::Time t0 = absl::Now();
  v1::AttendStreamResponse ignored;
  while (stream->Read(&ignored)) {
  }
  const grpc::Status st = stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED) << st.error_message();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  ExpectNextRequestMatchesReference(svc);
}

// A connection without calls is closed by the server after connection_idle: the client's
// channel goes back to IDLE, and its next call reconnects.
TEST(ServiceFaults, AnIdleConnectionIsClosed) {
  Coordinator::Options o;
  o.connection_idle = absl::Milliseconds(500);
  Service svc(1, o);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  auto channel = grpc::CreateChannel(svc.address(), grpc::InsecureChannelCredentials());
  auto stub = v1::AttentionService::NewStub(channel);
  {
    grpc::ClientContext ctx;
    v1::InfoResponse info;
    ASSERT_TRUE(stub->GetInfo(&ctx, v1::InfoRequest(), &info).ok());
  }
  EXPECT_EQ(channel->GetState(false), GRPC_CHANNEL_READY);
  const absl::Time stop_by = absl::Now() + absl::Seconds(10);
  while (channel->GetState(false) == GRPC_CHANNEL_READY && absl::Now() < stop_by) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_NE(channel->GetState(false), GRPC_CHANNEL_READY) << "the idle connection stayed open";
  grpc::ClientContext ctx;
  v1::InfoResponse info;
  EXPECT_TRUE(stub->GetInfo(&ctx, v1::InfoRequest(), &info).ok());
}

// A worker killed mid-request: UNAVAILABLE, the worker is restarted, the ring re-formed, and
// the next request succeeds.
TEST(ServiceFaults, WorkerKilledMidRequest) {
  Service svc(3);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  Shape big{1, 12288, 8, 8, 128, v1::DTYPE_BF16};  // still running at the kill, 0.4 s in
  v1::AttendRequest req = MakeRequest(big);
  v1::AttendResponse resp;
  grpc::Status st;
  std::thread caller([&] { st = Call(svc, req, &resp, absl::Seconds(60)); });
  absl::SleepFor(absl::Milliseconds(400));
  const pid_t victim = svc.workers().pids()[1];
  ASSERT_GT(victim, 0);
  kill(victim, SIGKILL);
  caller.join();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();

  Shape small{1, 97, 4, 2, 64, v1::DTYPE_FP32};
  v1::AttendRequest next = MakeRequest(small);
  next.mutable_options()->set_causal(true);
  v1::AttendResponse ok_resp;
  grpc::Status st2 = Call(svc, next, &ok_resp, absl::Seconds(60));
  ASSERT_TRUE(st2.ok()) << st2.error_message();
  EXPECT_EQ(ok_resp.plan().world_size(), 3);
  ExpectMatchesReference(next, ok_resp);
  EXPECT_GE(svc.workers().restarts(), 1);
}

// The internal plane is apart and needs the secret: the public port has no CoordinatorService;
// on the internal port registration and the rendezvous store refuse callers without the secret
// (a rogue worker cannot join, read the store or fill it); workers refuse them too. After all of
// it the service answers correctly.
TEST(ServicePlanes, InternalCallsNeedTheSecretAndThePublicPortHasNone) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Service svc(2);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  Coordinator& c = svc.coordinator();
  ASSERT_NE(c.internal_port(), c.port());
  v1::RegisterRequest rogue;
  rogue.set_address("127.0.0.1:1");
  rogue.set_backend("cpu");
  {
    auto pub = v1::CoordinatorService::NewStub(svc.channel_ptr());
    grpc::ClientContext ctx;
    v1::RegisterResponse resp;
    EXPECT_EQ(pub->Register(&ctx, rogue, &resp).error_code(), grpc::StatusCode::UNIMPLEMENTED);
  }
  const std::string wrong(c.cluster_secret().size(), 'x');
  for (const std::string& secret : {std::string(), wrong}) {
    auto internal = v1::CoordinatorService::NewStub(
        secret.empty() ? grpc::CreateChannel(c.internal_address(),
                                             grpc::InsecureChannelCredentials())
                       : ClusterChannel(c.internal_address(), grpc::ChannelArguments(),
                                        *ClusterSecret::FromString(secret)));
    grpc::ClientContext r;
    v1::RegisterResponse rr;
    EXPECT_EQ(internal->Register(&r, rogue, &rr).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext set;
    v1::StoreSetRequest sreq;
    sreq.set_key("k");
    sreq.set_value(std::string(1 << 20, 'v'));
    v1::StoreSetResponse sresp;
    EXPECT_EQ(internal->StoreSet(&set, sreq, &sresp).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext get;
    get.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    v1::StoreGetRequest greq;
    greq.add_keys("k");
    v1::StoreGetResponse gresp;
    EXPECT_EQ(internal->StoreGet(&get, greq, &gresp).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    for (const std::string& address : c.worker_addresses()) {
      auto worker = v1::WorkerService::NewStub(
          grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
      grpc::ClientContext j;
      v1::JoinRingRequest poison;
      poison.set_generation(INT64_MAX);
      poison.set_world_size(1);
      v1::JoinRingResponse jr;
      EXPECT_EQ(worker->JoinRing(&j, poison, &jr).error_code(),
                grpc::StatusCode::UNAUTHENTICATED);
    }
  }
  Shape s;
  const v1::AttendRequest req = MakeRequest(s);
  v1::AttendResponse resp;
  ASSERT_TRUE(Call(svc, req, &resp).ok());
  ExpectMatchesReference(req, resp);
  EXPECT_EQ(c.worker_addresses().size(), 2u);  // the rogue registration left no trace
}

// Past the admission queue: RESOURCE_EXHAUSTED at once.
TEST(ServiceAdmission, QueueFull) {
  Coordinator::Options o;
  o.max_queue = 1;
  o.pipeline_depth = 1;  // one request out of the queue at a time
  Service svc(2, o);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  Shape big{1, 8192, 8, 8, 128, v1::DTYPE_BF16};  // the first still running at the fourth
  v1::AttendRequest req = MakeRequest(big);
  constexpr int kCalls = 4;
  std::vector<grpc::Status> results(kCalls);
  std::vector<std::thread> threads;
  for (int i = 0; i < kCalls; ++i) {
    threads.emplace_back([&, i] {
      v1::AttendResponse resp;
      results[i] = Call(svc, req, &resp, absl::Seconds(120));
    });
    absl::SleepFor(absl::Milliseconds(100));
  }
  for (auto& t : threads) t.join();
  int exhausted = 0, ok = 0;
  for (const grpc::Status& s : results) {
    if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++exhausted;
      EXPECT_NE(s.error_message().find("queue"), std::string::npos) << s.error_message();
    }
    if (s.ok()) ++ok;
  }
  EXPECT_GE(exhausted, 1);
  EXPECT_GE(ok, 1);
}

// A request of seconds of CPU work on `svc`, called from a thread of its own.
class LongRequest {
 public:
  explicit LongRequest(Service& svc)
      : request_(MakeRequest(Shape{1, 8192, 8, 8, 128, v1::DTYPE_BF16})),
        thread_([this, &svc] {
          v1::AttendResponse resp;
          status_ = Call(svc, request_, &resp, absl::Seconds(120));
        }) {}
  ~LongRequest() {
    if (thread_.joinable()) thread_.join();
  }
  grpc::Status Join() {
    thread_.join();
    return status_;
  }

 private:
  const v1::AttendRequest request_;
  grpc::Status status_;
  std::thread thread_;
};

// `request` sent and cancelled by its client once `until` returns; the call's status.
grpc::Status CancelledCall(Service& svc, const v1::AttendRequest& request,
                           const std::function<void()>& until) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  grpc::Status status;
  v1::AttendResponse resp;
  std::thread caller([&] { status = svc.stub().Attend(&ctx, request, &resp); });
  until();
  ctx.TryCancel();
  caller.join();
  return status;
}

// With the pipeline (depth 2) the request after a long one goes to the workers at once and waits
// there for its turn. Giving up there (deadline, cancel) skips its turn: the long request and
// the ring carry on, the ring is not re-formed, and the next request runs in turn after it.
TEST(ServicePipeline, GivingUpWhileWaitingForTheTurnKeepsTheRing) {
  Coordinator::Options o;
  o.pipeline_depth = 2;
  Service svc(2, o);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  const int64_t generation = svc.coordinator().ring_generation();
  LongRequest long_request(svc);
  absl::SleepFor(absl::Milliseconds(300));
  Shape small;
  const v1::AttendRequest next = MakeRequest(small);
  v1::AttendResponse resp;
  const grpc::Status late = Call(svc, next, &resp, absl::Milliseconds(300));
  EXPECT_EQ(late.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << late.error_message();
  const grpc::Status gone =
      CancelledCall(svc, next, [] { absl::SleepFor(absl::Milliseconds(300)); });
  EXPECT_EQ(gone.error_code(), grpc::StatusCode::CANCELLED) << gone.error_message();
  // Waits behind the long one at the workers, then runs in its turn.
  v1::AttendResponse ok_resp;
  const grpc::Status ok = Call(svc, next, &ok_resp, absl::Seconds(120));
  ASSERT_TRUE(ok.ok()) << ok.error_message();
  ExpectMatchesReference(next, ok_resp);
  const grpc::Status long_status = long_request.Join();
  EXPECT_TRUE(long_status.ok()) << long_status.error_message();
  EXPECT_EQ(svc.coordinator().ring_generation(), generation) << "the ring was re-formed";
  // The request that waited its turn reports it.
  double turn_wait = 0;
  for (const v1::WorkerTiming& w : ok_resp.timings().workers()) {
    turn_wait = std::max(turn_wait, w.turn_wait_seconds());
  }
  EXPECT_GT(turn_wait, 0.05);
}

// Requests in flight together (three on the ring, more queued) through 3 workers each get their
// own answer: with the pipeline a request's bytes are scattered, and its workers stage them,
// while another computes, each through its own arena and staging set.
TEST(ServicePipeline, ConcurrentRequestsEachGetTheirOwnAnswer) {
  Coordinator::Options o;
  o.pipeline_depth = 3;
  Service svc(3, o);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  ExpectEachCallRight(4, 3, [&](int t, int c) -> std::string {
    const Shape shape{1 + (t % 2), 200 + 37 * t, 4, 2, 64, v1::DTYPE_FP32};
    v1::AttendRequest req = MakeRequest(shape, 100 + 10 * t + c);
    req.mutable_options()->set_causal(c % 2 == 0);
    v1::AttendResponse resp;
    const grpc::Status st = Call(svc, req, &resp, absl::Seconds(120));
    return st.ok() ? OutMismatch(req, resp) : st.error_message();
  });
}

std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

// SIGTERM's path: Drain refuses new requests at once (UNAVAILABLE, health NOT_SERVING) and returns
// once the running and the queued ones are answered, correctly.
TEST(ServiceOps, DrainFinishesAdmittedRequestsAndRefusesNewOnes) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Service svc(2);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  // Still running 0.5 s in, when the drain begins: seconds of CPU work on two cores.
  Shape big{1, 12288, 8, 8, 128, v1::DTYPE_BF16};
  const v1::AttendRequest running = MakeRequest(big);
  Shape small{1, 37, 5, 1, 64, v1::DTYPE_FP32};
  const v1::AttendRequest queued = MakeRequest(small);
  v1::AttendResponse running_resp, queued_resp;
  grpc::Status running_st, queued_st;
  absl::Time running_done;
  std::thread a([&] {
    running_st = Call(svc, running, &running_resp);
    running_done = absl::Now();
  });
  absl::SleepFor(absl::Milliseconds(300));
  std::thread b([&] { queued_st = Call(svc, queued, &queued_resp); });
  absl::SleepFor(absl::Milliseconds(200));
  bool drained = false;
  absl::Time drain0 = absl::Now();
  std::thread d([&] { drained = svc.coordinator().Drain(absl::Seconds(60)); });
  absl::SleepFor(absl::Milliseconds(100));
  v1::AttendResponse refused_resp;
  const grpc::Status refused = Call(svc, queued, &refused_resp);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE) << refused.error_message();
  EXPECT_NE(refused.error_message().find("shutting down"), std::string::npos);
  EXPECT_NE(test::HealthStatus(svc.channel_ptr()), std::string("\x08\x01", 2))
      << "still SERVING while draining";
  a.join();
  b.join();
  d.join();
  EXPECT_TRUE(drained);
  EXPECT_LT(absl::Now() - drain0, absl::Seconds(60));
  EXPECT_GT(running_done, drain0) << "the request finished before the drain began: make it longer";
  ASSERT_TRUE(running_st.ok()) << running_st.error_message();
  EXPECT_EQ(running_resp.out().data().size(), running.q().data().size());
  ASSERT_TRUE(queued_st.ok()) << queued_st.error_message();
  ExpectMatchesReference(queued, queued_resp);
}

TEST(ServiceOps, HealthInfoAndMetrics) {
  Service svc(2);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  // grpc.health.v1.Health/Check for the whole server (empty service name), called as raw
  // bytes: the empty request is zero bytes; SERVING is field 1 = 1 (0x08 0x01), NOT_SERVING 2.
  // The health status follows the ring within the coordinator's 50 ms status poll.

  const std::string kServing("\x08\x01", 2);
  std::string health = test::HealthStatus(svc.channel_ptr());
  for (int i = 0; i < 20 && health != kServing; ++i) {
    absl::SleepFor(absl::Milliseconds(50));
    health = test::HealthStatus(svc.channel_ptr());
  }
  EXPECT_EQ(health, kServing);
  v1::InfoResponse info;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(svc.stub().GetInfo(&ctx, v1::InfoRequest(), &info).ok());
  }
  EXPECT_TRUE(info.ready());
  EXPECT_EQ(info.world_size(), 2);
  EXPECT_EQ(info.workers_size(), 2);
  for (const v1::WorkerInfo& w : info.workers()) {
    EXPECT_TRUE(w.address().empty()) << "GetInfo shows an internal address: " << w.address();
  }
  EXPECT_EQ(info.transport(), "gloo");
  ASSERT_EQ(info.backends_size(), 1);
  EXPECT_EQ(info.backends(0), "cpu");

  Shape s;
  v1::AttendRequest req = MakeRequest(s);
  v1::AttendResponse resp;
  ASSERT_TRUE(Call(svc, req, &resp).ok());
  const std::string metrics = HttpGet(svc.coordinator().metrics_port(), "/metrics");
  for (const char* family :
       {"ringattn_requests_total", "ringattn_request_phase_seconds", "ringattn_request_bytes_total",
        "ringattn_queue_depth", "ringattn_workers_up", "ringattn_ring_steps_total"}) {
    EXPECT_NE(metrics.find(family), std::string::npos) << family;
  }
  EXPECT_NE(metrics.find("code=\"OK\""), std::string::npos);
}

// Whether /metrics shows `line` within `timeout`.
bool MetricsShowWithin(Service& svc, const std::string& line, absl::Duration timeout) {
  const absl::Time stop_by = absl::Now() + timeout;
  while (HttpGet(svc.coordinator().metrics_port(), "/metrics").find(line) == std::string::npos) {
    if (absl::Now() >= stop_by) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return true;
}

// Requests waiting behind a long one leave the queue as soon as their deadline passes or their
// client cancels (the coordinator is told, it does not find out later): their place is free
// for the next request, and the metrics count them under their codes.
TEST(ServiceAdmission, LeavingTheQueueFreesItsPlace) {
  Coordinator::Options o;
  o.max_queue = 1;
  o.pipeline_depth = 1;  // the queue's own behaviour: nothing waits at the workers
  Service svc(2, o);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  LongRequest long_request(svc);
  // The dispatcher has taken it: the queue is empty, one request runs.
  absl::SleepFor(absl::Milliseconds(300));
  ASSERT_TRUE(MetricsShowWithin(svc, "ringattn_queue_depth 0\n", absl::Seconds(5)));
  EXPECT_TRUE(MetricsShowWithin(svc, "ringattn_running_requests 1\n", absl::Seconds(5)));

  Shape small;
  const v1::AttendRequest next = MakeRequest(small);
  v1::AttendResponse resp;
  const grpc::Status late = Call(svc, next, &resp, absl::Milliseconds(300));
  EXPECT_EQ(late.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << late.error_message();
  EXPECT_TRUE(MetricsShowWithin(svc, "ringattn_queue_depth 0\n", absl::Seconds(2)));
  const grpc::Status gone = CancelledCall(svc, next, [&svc] {
    EXPECT_TRUE(MetricsShowWithin(svc, "ringattn_queue_depth 1\n", absl::Seconds(5)));
  });
  EXPECT_EQ(gone.error_code(), grpc::StatusCode::CANCELLED) << gone.error_message();
  EXPECT_TRUE(MetricsShowWithin(svc, "ringattn_queue_depth 0\n", absl::Seconds(2)));
  // With max_queue 1 this is refused unless both left: it waits behind the long one instead.
  v1::AttendResponse ok_resp;
  const grpc::Status ok = Call(svc, next, &ok_resp, absl::Seconds(120));
  ASSERT_TRUE(ok.ok()) << ok.error_message();
  ExpectMatchesReference(next, ok_resp);
  const grpc::Status long_status = long_request.Join();
  EXPECT_TRUE(long_status.ok()) << long_status.error_message();
  // Each call is counted under its code (recorded as its reactor finishes: polled).
  for (const char* line : {"ringattn_requests_total{code=\"DEADLINE_EXCEEDED\",rpc=\"Attend\"} 1",
                           "ringattn_requests_total{code=\"CANCELLED\",rpc=\"Attend\"} 1",
                           "ringattn_requests_total{code=\"OK\",rpc=\"Attend\"} 2"}) {
    EXPECT_TRUE(MetricsShowWithin(svc, line, absl::Seconds(10)))
        << line << " not in:\n" << HttpGet(svc.coordinator().metrics_port(), "/metrics");
  }
}

}  // namespace
}  // namespace ringattn
