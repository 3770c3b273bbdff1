// Three Workers in one process against a fake coordinator: registration, the rendezvous through
// the coordinator store, the Gloo ring over loopback, the assembled output against the fp64
// reference, and the failure paths (stale generation, bad payload, deadline, superseded join).
#include "worker/worker.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "base/error_metrics.h"
#include "gloo/common/error.h"
#include "kernels/attention_params.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/params_check.h"
#include "ring/layout.h"
#include "ring/testing/synthetic_inputs.h"
#include "ringattn/v1/worker.grpc.pb.h"
#include "proto/cluster_auth.h"
#include "worker/coordinator_store.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// The internal plane's secret the workers of these tests share with their callers.
constexpr char kSecret[] = "worker-test-secret-0123456789";

const ClusterSecret& Secret() {
  static const ClusterSecret* const secret = new ClusterSecret(*ClusterSecret::FromString(kSecret));
  return *secret;
}

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The coordinator's side, in memory: Register records addresses; the store's Get blocks until
// every key exists or the call's deadline passes.
class FakeCoordinator final : public v1::CoordinatorService::Service {
 public:
  grpc::Status Register(grpc::ServerContext* context, const v1::RegisterRequest* request,
                        v1::RegisterResponse* response) override {
    // Workers carry the secret on every call to the coordinator.
    if (!Secret().Check(*context).ok()) return grpc::Status(grpc::UNAUTHENTICATED, "no secret");
    absl::MutexLock lock(&mu_);
    registrations_.push_back(*request);
    response->set_worker_id(absl::StrCat("w", registrations_.size()));
    return grpc::Status::OK;
  }

  grpc::Status StoreSet(grpc::ServerContext* context, const v1::StoreSetRequest* request,
                        v1::StoreSetResponse*) override {
    if (!Secret().Check(*context).ok()) return grpc::Status(grpc::UNAUTHENTICATED, "no secret");
    absl::MutexLock lock(&mu_);
    values_[request->key()] = request->value();
    return grpc::Status::OK;
  }

  grpc::Status StoreGet(grpc::ServerContext* context, const v1::StoreGetRequest* request,
                        v1::StoreGetResponse* response) override {
    auto all_present = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (const std::string& key : request->keys()) {
        if (!values_.contains(key)) return false;
      }
      return true;
    };
    absl::MutexLock lock(&mu_);
    while (!all_present()) {
      if (context->IsCancelled()) return grpc::Status(grpc::CANCELLED, "cancelled");
      if (std::chrono::system_clock::now() >= context->deadline()) {
        return grpc::Status(grpc::DEADLINE_EXCEEDED, "keys missing");
      }
      mu_.AwaitWithTimeout(absl::Condition(&all_present), absl::Milliseconds(20));
    }
    for (const std::string& key : request->keys()) response->add_values(values_[key]);
    return grpc::Status::OK;
  }

  std::vector<v1::RegisterRequest> registrations() const {
    absl::MutexLock lock(&mu_);
    return registrations_;
  }
  bool HasKey(const std::string& key) const {
    absl::MutexLock lock(&mu_);
    return values_.contains(key);
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<v1::RegisterRequest> registrations_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
};

class FakeCoordinatorServer {
 public:
  explicit FakeCoordinatorServer(const std::string& address = "127.0.0.1:0") {
    grpc::ServerBuilder builder;
    builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
  }
  ~FakeCoordinatorServer() {
    if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
  }
  bool ok() const { return server_ != nullptr && port_ != 0; }
  int port() const { return port_; }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  FakeCoordinator& service() { return service_; }
  std::shared_ptr<v1::CoordinatorService::Stub> NewStub() const {
    return v1::CoordinatorService::NewStub(
        ClusterChannel(address(), grpc::ChannelArguments(), Secret()));
  }

 private:
  FakeCoordinator service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

// ---- CoordinatorStore -------------------------------------------------------------------------

TEST(CoordinatorStoreTest, SetGetWaitThroughTheCoordinator) {
  FakeCoordinatorServer coordinator;
  ASSERT_TRUE(coordinator.ok());
  CoordinatorStore store(coordinator.NewStub(), "ring/7/", milliseconds(2000));
  store.set("a", std::vector<char>{'x', 'y'});
  EXPECT_TRUE(coordinator.service().HasKey("ring/7/a"));
  EXPECT_EQ(store.get("a"), (std::vector<char>{'x', 'y'}));
  store.wait({"a"});
  store.wait({"a"}, milliseconds(100));

  // A key set later releases a waiting get.
  std::thread setter([&] {
    std::this_thread::sleep_for(milliseconds(100));
    CoordinatorStore other(coordinator.NewStub(), "ring/7/", milliseconds(2000));
    other.set("late", std::vector<char>{'z'});
  });
  EXPECT_EQ(store.get("late"), std::vector<char>{'z'});
  setter.join();
}

TEST(CoordinatorStoreTest, MissingKeyThrowsAfterTheTimeout) {
  FakeCoordinatorServer coordinator;
  ASSERT_TRUE(coordinator.ok());
  CoordinatorStore store(coordinator.NewStub(), "p/", milliseconds(300));
  const auto t0 = Clock::now();
  try {
    store.wait({"missing"}, milliseconds(200));
    FAIL() << "wait for a missing key returned";
  } catch (const gloo::IoException& e) {
    EXPECT_NE(std::string(e.what()).find("missing"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("DEADLINE_EXCEEDED"), std::string::npos) << e.what();
  }
  EXPECT_THROW(store.get("missing"), gloo::IoException);
  EXPECT_LT(SecondsSince(t0), 3.0);
  // The status API reports the same without throwing.
  absl::StatusOr<std::vector<std::string>> got = store.Get({"missing"}, milliseconds(50));
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST(CoordinatorStoreTest, CancelReleasesABlockedGet) {
  FakeCoordinatorServer coordinator;
  ASSERT_TRUE(coordinator.ok());
  CoordinatorStore store(coordinator.NewStub(), "p/", milliseconds(20000));
  std::thread canceller([&] {
    std::this_thread::sleep_for(milliseconds(200));
    store.Cancel(absl::AbortedError("superseded"));
  });
  const auto t0 = Clock::now();
  absl::StatusOr<std::vector<std::string>> got = store.Get({"never"}, milliseconds(20000));
  canceller.join();
  EXPECT_LT(SecondsSince(t0), 5.0);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kAborted) << got.status();
  EXPECT_THROW(store.set("k", {}), gloo::IoException);  // every later call fails too
}

// ---- Workers ----------------------------------------------------------------------------------

constexpr int kWorld = 3;

// One attention problem: whole synthetic tensors and the fp64 reference.
struct Problem {
  int batch = 2;
  int64_t seqlen = 77;  // not a multiple of 2 * kWorld: uneven shards
  int heads = 4;
  int heads_k = 2;  // GQA
  int head_dim = 64;
  bool causal = true;
  std::vector<float> q, k, v;
  ReferenceResult ref;

  size_t q_row_bytes() const { return static_cast<size_t>(heads) * head_dim * sizeof(float); }
  size_t kv_row_bytes() const { return static_cast<size_t>(heads_k) * head_dim * sizeof(float); }
};

Problem MakeProblem() {
  Problem p;
  p.q.resize(static_cast<size_t>(p.batch) * p.seqlen * p.heads * p.head_dim);
  p.k.resize(static_cast<size_t>(p.batch) * p.seqlen * p.heads_k * p.head_dim);
  p.v.resize(p.k.size());
  FillSynthetic(11, 0, p.batch, p.seqlen, p.heads, p.head_dim, DType::kF32, p.q.data());
  FillSynthetic(11, 1, p.batch, p.seqlen, p.heads_k, p.head_dim, DType::kF32, p.k.data());
  FillSynthetic(11, 2, p.batch, p.seqlen, p.heads_k, p.head_dim, DType::kF32, p.v.data());
  std::vector<float> o(p.q.size());  // unused by the reference, but must be set
  std::vector<float> lse(static_cast<size_t>(p.batch) * p.heads * p.seqlen);
  AttentionParams params;
  params.o = o.data();
  params.lse = lse.data();
  params.q = p.q.data();
  params.k = p.k.data();
  params.v = p.v.data();
  params.batch = p.batch;
  params.seqlen_q = params.seqlen_k = p.seqlen;
  params.heads = p.heads;
  params.heads_k = p.heads_k;
  params.head_dim = p.head_dim;
  params.dtype = params.o_dtype = DType::kF32;
  params.softmax_scale = 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  params.causal = p.causal;
  SetContiguousStrides(&params);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(params);
  EXPECT_TRUE(ref.ok()) << ref.status();
  if (ref.ok()) p.ref = *std::move(ref);
  return p;
}

std::string ShardBytes(const ShardPlan& plan, int rank, const std::vector<float>& whole, int batch,
                       size_t row_bytes) {
  std::string bytes(static_cast<size_t>(batch) * plan.shards[rank].rows * row_bytes, '\0');
  ExtractShard(plan, rank, whole.data(), batch, row_bytes, bytes.data());
  return bytes;
}

struct CallResult {
  grpc::Status status;
  v1::RunShardResponse response;
  double seconds = 0;
};

class WorkerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(coordinator_.ok());
    for (int r = 0; r < kWorld; ++r) {
      Worker::Options options;
      options.coordinator_address = coordinator_.address();
      options.kernel = "cpu";  // the CPU path, also on a machine with a GPU
      options.cluster_secret = kSecret;
      workers_.push_back(std::make_unique<Worker>(options));
      absl::Status s = workers_.back()->BuildAndStart();
      ASSERT_TRUE(s.ok()) << s;
      grpc::ChannelArguments args;
      args.SetMaxReceiveMessageSize(INT_MAX);
      args.SetMaxSendMessageSize(INT_MAX);
      stubs_.push_back(v1::WorkerService::NewStub(
          ClusterChannel(workers_.back()->address(), args, Secret())));
    }
  }

  void TearDown() override {
    for (auto& w : workers_) w->Shutdown();
    workers_.clear();
  }

  grpc::Status Join(int rank, int64_t generation, double timeout_s = 30) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    v1::JoinRingRequest request;
    request.set_generation(generation);
    request.set_rank(rank);
    request.set_world_size(kWorld);
    request.set_store_prefix(absl::StrCat("ring/", generation, "/"));
    request.set_timeout_seconds(timeout_s);
    v1::JoinRingResponse response;
    return stubs_[rank]->JoinRing(&ctx, request, &response);
  }

  // JoinRing on every rank at once (each blocks until all have joined).
  void JoinAll(int64_t generation) {
    std::vector<grpc::Status> results(kWorld);
    std::vector<std::thread> threads;
    for (int r = 0; r < kWorld; ++r) {
      threads.emplace_back([&, r] { results[r] = Join(r, generation); });
    }
    for (auto& t : threads) t.join();
    for (int r = 0; r < kWorld; ++r) {
      ASSERT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r].error_message();
    }
  }

  v1::PingResponse Ping(int rank) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::PingResponse response;
    grpc::Status s = stubs_[rank]->Ping(&ctx, v1::PingRequest(), &response);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return response;
  }

  // The ranks' requests for `problem` split by `plan`.
  std::vector<v1::RunShardRequest> MakeRequests(const Problem& problem, const ShardPlan& plan,
                                                v1::Layout layout, int64_t generation) {
    std::vector<v1::RunShardRequest> requests(kWorld);
    for (int r = 0; r < kWorld; ++r) {
      v1::RunShardRequest& q = requests[r];
      v1::ShardHeader* h = q.mutable_header();
      h->set_generation(generation);
      h->set_request_id(absl::StrCat("test-", generation));
      v1::Shape* shape = h->mutable_shape();
      shape->set_dtype(v1::DTYPE_FP32);
      shape->set_batch(problem.batch);
      shape->set_seqlen_q(problem.seqlen);
      shape->set_seqlen_k(problem.seqlen);
      shape->set_heads(problem.heads);
      shape->set_heads_k(problem.heads_k);
      shape->set_head_dim(problem.head_dim);
      h->set_layout(layout);
      h->mutable_options()->set_causal(problem.causal);
      q.set_return_lse(true);
      q.set_q(ShardBytes(plan, r, problem.q, problem.batch, problem.q_row_bytes()));
      q.set_k(ShardBytes(plan, r, problem.k, problem.batch, problem.kv_row_bytes()));
      q.set_v(ShardBytes(plan, r, problem.v, problem.batch, problem.kv_row_bytes()));
    }
    return requests;
  }

  // RunShard on every rank that has a request, concurrently, each with `timeout`.
  std::vector<CallResult> RunShards(const std::vector<std::optional<v1::RunShardRequest>>& reqs,
                                    milliseconds timeout = milliseconds(30000)) {
    std::vector<CallResult> results(reqs.size());
    std::vector<std::thread> threads;
    for (size_t r = 0; r < reqs.size(); ++r) {
      if (!reqs[r].has_value()) continue;
      threads.emplace_back([&, r] {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + timeout);
        const auto t0 = Clock::now();
        results[r].status = stubs_[r]->RunShard(&ctx, *reqs[r], &results[r].response);
        results[r].seconds = SecondsSince(t0);
      });
    }
    for (auto& t : threads) t.join();
    return results;
  }

  // Runs `problem` through the ring in `layout` and checks the output against the reference.
  void RunAndCheck(const Problem& problem, v1::Layout layout, Layout ring_layout,
                   int64_t generation) {
    absl::StatusOr<ShardPlan> plan = PlanShards(problem.seqlen, kWorld, ring_layout);
    ASSERT_TRUE(plan.ok()) << plan.status();
    std::vector<std::optional<v1::RunShardRequest>> requests;
    for (auto& r : MakeRequests(problem, *plan, layout, generation)) requests.emplace_back(r);
    CheckResults(problem, *plan, RunShards(requests));
  }

  // The ranks' results of `problem` split by `plan`, against the reference.
  void CheckResults(const Problem& problem, const ShardPlan& plan_in,
                    const std::vector<CallResult>& results) {
    const ShardPlan* plan = &plan_in;

    std::vector<float> out(problem.q.size(), std::nanf(""));
    std::vector<float> lse(static_cast<size_t>(problem.batch) * problem.heads * problem.seqlen,
                           std::nanf(""));
    for (int r = 0; r < kWorld; ++r) {
      ASSERT_TRUE(results[r].status.ok())
          << "rank " << r << ": " << results[r].status.error_message();
      const v1::RunShardResponse& resp = results[r].response;
      const int64_t rows = plan->shards[r].rows;
      ASSERT_EQ(resp.out().size(), problem.batch * rows * problem.q_row_bytes());
      ASSERT_EQ(resp.lse().size(), problem.batch * problem.heads * rows * sizeof(float));
      InsertShard(*plan, r, resp.out().data(), problem.batch, problem.q_row_bytes(), out.data());
      InsertShard(*plan, r, resp.lse().data(), static_cast<int64_t>(problem.batch) * problem.heads,
                  sizeof(float), lse.data());

      const v1::WorkerTiming& timing = resp.timing();
      EXPECT_EQ(timing.rank(), r);
      EXPECT_EQ(timing.rows(), rows);
      EXPECT_EQ(timing.backend(), "cpu");
      ASSERT_EQ(timing.steps_size(), kWorld);
      double compute = 0;
      for (int s = 0; s < kWorld; ++s) {
        EXPECT_EQ(timing.steps(s).source_rank(), (r - s + kWorld) % kWorld);
        compute += timing.steps(s).compute_seconds();
      }
      EXPECT_NEAR(timing.compute_seconds(), compute, 1e-9);
      EXPECT_GE(timing.ring_seconds(), timing.compute_seconds());
    }
    ASSERT_EQ(problem.ref.o.size(), out.size());
    ASSERT_EQ(problem.ref.lse.size(), lse.size());
    const ErrorStats e_out =
        CompareTensor(out.data(), DType::kF32, problem.ref.o.data(), out.size());
    const ErrorStats e_lse =
        CompareTensor(lse.data(), DType::kF32, problem.ref.lse.data(), lse.size());
    EXPECT_TRUE(e_out.Within(1e-5, 1e-4)) << "out: " << e_out.ToString();
    EXPECT_TRUE(e_lse.Within(1e-5, 1e-4)) << "lse: " << e_lse.ToString();
  }

  FakeCoordinatorServer coordinator_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<std::unique_ptr<v1::WorkerService::Stub>> stubs_;
};

TEST_F(WorkerTest, RegistersWithTheCoordinator) {
  const std::vector<v1::RegisterRequest> regs = coordinator_.service().registrations();
  ASSERT_EQ(regs.size(), static_cast<size_t>(kWorld));
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_NE(workers_[r]->port(), 0);
    EXPECT_EQ(regs[r].address(), workers_[r]->address());
    EXPECT_EQ(regs[r].backend(), "cpu");
    EXPECT_EQ(regs[r].device(), "cpu");
    EXPECT_EQ(regs[r].transport(), "gloo");
    EXPECT_GT(regs[r].pid(), 0);
    EXPECT_EQ(workers_[r]->worker_id(), absl::StrCat("w", r + 1));
    const v1::PingResponse ping = Ping(r);
    EXPECT_EQ(ping.generation(), 0);
    EXPECT_FALSE(ping.busy());
  }
}

TEST_F(WorkerTest, RingMatchesTheReference) {
  const Problem problem = MakeProblem();
  JoinAll(1);
  for (int r = 0; r < kWorld; ++r) EXPECT_EQ(Ping(r).generation(), 1);
  {
    SCOPED_TRACE("contiguous");
    RunAndCheck(problem, v1::LAYOUT_CONTIGUOUS, Layout::kContiguous, 1);
  }
  {
    SCOPED_TRACE("zigzag");
    RunAndCheck(problem, v1::LAYOUT_ZIGZAG, Layout::kZigzag, 1);
  }
  for (int r = 0; r < kWorld; ++r) {
    const v1::PingResponse ping = Ping(r);
    EXPECT_EQ(ping.generation(), 1);
    EXPECT_FALSE(ping.busy());
  }
}

// Two calls with turns 1 and 2 reach the ranks in different orders (rank 0 gets turn 2 first):
// every rank stages both at once but runs the ring passes in turn order, so both are right. Run
// in arrival order instead, rank 0 would pass turn 2's blocks while the others pass turn 1's.
TEST_F(WorkerTest, RingPassesRunInTurnOrderWhateverTheArrivalOrder) {
  const Problem problem = MakeProblem();
  JoinAll(1);
  const Layout layouts[2] = {Layout::kContiguous, Layout::kZigzag};
  const v1::Layout proto_layouts[2] = {v1::LAYOUT_CONTIGUOUS, v1::LAYOUT_ZIGZAG};
  std::vector<ShardPlan> plans;
  std::vector<std::vector<v1::RunShardRequest>> reqs;  // [turn - 1][rank]
  for (int t = 0; t < 2; ++t) {
    plans.push_back(*PlanShards(problem.seqlen, kWorld, layouts[t]));
    reqs.push_back(MakeRequests(problem, plans[t], proto_layouts[t], 1));
    for (v1::RunShardRequest& q : reqs[t]) q.mutable_header()->set_sequence(t + 1);
  }
  std::vector<std::vector<CallResult>> results(2, std::vector<CallResult>(kWorld));
  std::vector<std::thread> threads;
  for (int r = 0; r < kWorld; ++r) {
    for (int t = 0; t < 2; ++t) {
      // Rank 0 sends turn 2 first, the others turn 1 first.
      const bool first = (r == 0) == (t == 1);
      threads.emplace_back([&, r, t, first] {
        if (!first) absl::SleepFor(absl::Milliseconds(200));
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
        results[t][r].status = stubs_[r]->RunShard(&ctx, reqs[t][r], &results[t][r].response);
      });
    }
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 2; ++t) {
    SCOPED_TRACE(absl::StrCat("turn ", t + 1));
    CheckResults(problem, plans[t], results[t]);
  }
  // Rank 0 received turn 2 before turn 1 and waited for it.
  EXPECT_GT(results[1][0].response.timing().turn_wait_seconds(), 0.1);
  // A turn that already passed is refused, and drops the ring.
  grpc::ClientContext ctx;
  v1::RunShardResponse resp;
  EXPECT_EQ(stubs_[0]->RunShard(&ctx, reqs[0][0], &resp).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
}

TEST_F(WorkerTest, StaleGenerationIsRefused) {
  const Problem problem = MakeProblem();
  const ShardPlan plan = *PlanShards(problem.seqlen, kWorld, Layout::kZigzag);

  // No ring yet.
  std::vector<CallResult> before =
      RunShards({MakeRequests(problem, plan, v1::LAYOUT_ZIGZAG, 1)[0]});
  EXPECT_EQ(before[0].status.error_code(), grpc::FAILED_PRECONDITION)
      << before[0].status.error_message();

  JoinAll(2);
  std::vector<CallResult> stale = RunShards({MakeRequests(problem, plan, v1::LAYOUT_ZIGZAG, 1)[0]});
  EXPECT_EQ(stale[0].status.error_code(), grpc::FAILED_PRECONDITION)
      << stale[0].status.error_message();
  EXPECT_NE(stale[0].status.error_message().find("generation 2"), std::string::npos)
      << stale[0].status.error_message();
  const grpc::Status stale_join = Join(0, 1);
  EXPECT_EQ(stale_join.error_code(), grpc::FAILED_PRECONDITION) << stale_join.error_message();

  // The refusals leave the current ring alone.
  EXPECT_EQ(Ping(0).generation(), 2);
  RunAndCheck(problem, v1::LAYOUT_ZIGZAG, Layout::kZigzag, 2);
}

// Whoever reaches a worker without the cluster secret gets UNAUTHENTICATED from every RPC and
// changes nothing: a JoinRing with the largest generation does not poison later rings, a RunShard
// does not touch the ring.
TEST_F(WorkerTest, CallsWithoutTheSecretAreRefusedAndChangeNothing) {
  JoinAll(3);
  for (const char* secret : {"", "worker-test-secret-0123456780"}) {
    SCOPED_TRACE(secret);
    grpc::ChannelArguments args;
    auto rogue = v1::WorkerService::NewStub(
        *secret == '\0'
            ? grpc::CreateCustomChannel(workers_[0]->address(), grpc::InsecureChannelCredentials(),
                                        args)
            : ClusterChannel(workers_[0]->address(), args, *ClusterSecret::FromString(secret)));
    {
      grpc::ClientContext ctx;
      v1::JoinRingRequest poison;
      poison.set_generation(INT64_MAX);
      poison.set_world_size(1);
      v1::JoinRingResponse resp;
      EXPECT_EQ(rogue->JoinRing(&ctx, poison, &resp).error_code(), grpc::UNAUTHENTICATED);
    }
    {
      grpc::ClientContext ctx;
      v1::PingResponse resp;
      EXPECT_EQ(rogue->Ping(&ctx, v1::PingRequest(), &resp).error_code(), grpc::UNAUTHENTICATED);
    }
    for (int method = 0; method < 2; ++method) {
      grpc::ClientContext ctx;
      grpc::Status s;
      if (method == 0) {
        v1::RunShardRequest req;
        req.mutable_header()->set_generation(3);
        v1::RunShardResponse resp;
        s = rogue->RunShard(&ctx, req, &resp);
      } else {
        v1::RunShardBackwardRequest req;
        req.mutable_header()->set_generation(3);
        v1::RunShardBackwardResponse resp;
        s = rogue->RunShardBackward(&ctx, req, &resp);
      }
      EXPECT_EQ(s.error_code(), grpc::UNAUTHENTICATED) << method;
    }
  }
  // The ring of generation 3 is untouched and the next generation still forms.
  EXPECT_EQ(Ping(0).generation(), 3);
  const Problem problem = MakeProblem();
  RunAndCheck(problem, v1::LAYOUT_ZIGZAG, Layout::kZigzag, 3);
  JoinAll(4);
  RunAndCheck(problem, v1::LAYOUT_CONTIGUOUS, Layout::kContiguous, 4);
}

TEST_F(WorkerTest, WrongQByteCountIsInvalidArgumentAndReleasesThePeers) {
  const Problem problem = MakeProblem();
  const ShardPlan plan = *PlanShards(problem.seqlen, kWorld, Layout::kContiguous);
  JoinAll(1);
  std::vector<v1::RunShardRequest> requests = MakeRequests(problem, plan, v1::LAYOUT_CONTIGUOUS, 1);
  requests[0].mutable_q()->resize(requests[0].q().size() - 4);
  std::vector<std::optional<v1::RunShardRequest>> calls(requests.begin(), requests.end());
  std::vector<CallResult> results = RunShards(calls);

  EXPECT_EQ(results[0].status.error_code(), grpc::INVALID_ARGUMENT)
      << results[0].status.error_message();
  EXPECT_EQ(results[0].status.error_message().rfind("q has", 0), 0u)
      << results[0].status.error_message();
  // The peers were already in the ring: rank 0 aborts it, so they fail now rather than at the
  // transport timeout (30 s).
  for (int r = 1; r < kWorld; ++r) {
    EXPECT_FALSE(results[r].status.ok()) << "rank " << r;
    EXPECT_LT(results[r].seconds, 10.0) << "rank " << r;
  }
  for (int r = 0; r < kWorld; ++r) EXPECT_EQ(Ping(r).generation(), 0) << "rank " << r;

  JoinAll(2);
  RunAndCheck(problem, v1::LAYOUT_CONTIGUOUS, Layout::kContiguous, 2);
}

TEST_F(WorkerTest, DeadlineFailsTheRingFastAndANewRingWorks) {
  const Problem problem = MakeProblem();
  const ShardPlan plan = *PlanShards(problem.seqlen, kWorld, Layout::kZigzag);
  JoinAll(1);
  std::vector<v1::RunShardRequest> requests = MakeRequests(problem, plan, v1::LAYOUT_ZIGZAG, 1);
  // Rank 2 is never called: ranks 0 and 1 would wait for it until the transport timeout (30 s)
  // but for the call's deadline.
  std::vector<CallResult> results =
      RunShards({requests[0], requests[1], std::nullopt}, milliseconds(1000));
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(results[r].status.error_code(), grpc::DEADLINE_EXCEEDED)
        << "rank " << r << ": " << results[r].status.error_message();
    EXPECT_LT(results[r].seconds, 3.0) << "rank " << r;
  }
  // The workers drop the aborted ring (the handler may still be finishing: poll briefly).
  for (int r = 0; r < 2; ++r) {
    const auto t0 = Clock::now();
    while (Ping(r).generation() != 0 && SecondsSince(t0) < 5) {
      std::this_thread::sleep_for(milliseconds(20));
    }
    EXPECT_EQ(Ping(r).generation(), 0) << "rank " << r;
    EXPECT_FALSE(Ping(r).busy()) << "rank " << r;
  }

  JoinAll(2);
  RunAndCheck(problem, v1::LAYOUT_ZIGZAG, Layout::kZigzag, 2);
}

TEST_F(WorkerTest, NewerJoinRingSupersedesARendezvousInProgress) {
  // Rank 0 alone joins generation 1 and waits for peers that never come...
  grpc::Status lonely;
  const auto t0 = Clock::now();
  double lonely_seconds = 0;
  std::thread joiner([&] {
    lonely = Join(0, 1);
    lonely_seconds = SecondsSince(t0);
  });
  std::this_thread::sleep_for(milliseconds(300));
  // ...until the coordinator forms generation 2.
  JoinAll(2);
  joiner.join();
  EXPECT_EQ(lonely.error_code(), grpc::ABORTED) << lonely.error_message();
  EXPECT_LT(lonely_seconds, 10.0);
  for (int r = 0; r < kWorld; ++r) EXPECT_EQ(Ping(r).generation(), 2);
  RunAndCheck(MakeProblem(), v1::LAYOUT_CONTIGUOUS, Layout::kContiguous, 2);
}

TEST_F(WorkerTest, BadJoinRingArgumentsAreInvalidArgument) {
  v1::JoinRingRequest request;
  request.set_generation(1);
  request.set_rank(3);
  request.set_world_size(kWorld);
  request.set_timeout_seconds(5);
  grpc::ClientContext ctx;
  v1::JoinRingResponse response;
  const grpc::Status s = stubs_[0]->JoinRing(&ctx, request, &response);
  EXPECT_EQ(s.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("rank"), std::string::npos) << s.error_message();
}

// ---- Registration -----------------------------------------------------------------------------

TEST(WorkerRegistrationTest, RetriesUntilTheCoordinatorComesUp) {
  // Reserve a port, then free it for the coordinator that starts late.
  int port = 0;
  {
    FakeCoordinatorServer probe;
    ASSERT_TRUE(probe.ok());
    port = probe.port();
  }
  Worker::Options options;
  options.cluster_secret = kSecret;
  options.coordinator_address = absl::StrCat("127.0.0.1:", port);
  options.kernel = "cpu";
  options.register_timeout = milliseconds(15000);
  Worker worker(options);
  absl::Status status;
  std::thread starter([&] { status = worker.BuildAndStart(); });
  std::this_thread::sleep_for(milliseconds(700));
  FakeCoordinatorServer coordinator(absl::StrCat("127.0.0.1:", port));
  ASSERT_TRUE(coordinator.ok());
  starter.join();
  ASSERT_TRUE(status.ok()) << status;
  ASSERT_EQ(coordinator.service().registrations().size(), 1u);
  EXPECT_EQ(coordinator.service().registrations()[0].address(), worker.address());
}

TEST(WorkerRegistrationTest, GivesUpAfterTheTimeout) {
  int port = 0;
  {
    FakeCoordinatorServer probe;
    ASSERT_TRUE(probe.ok());
    port = probe.port();
  }
  Worker::Options options;
  options.cluster_secret = kSecret;
  options.coordinator_address = absl::StrCat("127.0.0.1:", port);
  options.kernel = "cpu";
  options.register_timeout = milliseconds(500);
  Worker worker(options);
  const auto t0 = Clock::now();
  const absl::Status status = worker.BuildAndStart();
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
  EXPECT_LT(SecondsSince(t0), 5.0);
}

TEST(WorkerRegistrationTest, UnknownBackendIsInvalidArgument) {
  Worker::Options options;
  options.cluster_secret = kSecret;
  options.coordinator_address = "127.0.0.1:1";
  options.kernel = "tpu";
  Worker worker(options);
  const absl::Status status = worker.BuildAndStart();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
}

}  // namespace
}  // namespace ringattn
