#include "tests/service_fixture.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <climits>
#include <cmath>
#include <cstdlib>
#include <utility>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/params_check.h"
#include "ring/testing/synthetic_inputs.h"

namespace ringattn::test {

std::string WorkerBinary() {
  const char* b = std::getenv("RINGATTN_BIN");
  return b != nullptr ? b : "";
}

LocalService::LocalService(int world, Coordinator::Options options, std::string kernel,
                           std::vector<std::string> worker_args) {
  options.world_size = world;
  options.ring.ring_timeout_seconds = 20;
  options.ring.ping_interval = absl::Milliseconds(200);
  coordinator_ = std::make_unique<Coordinator>(options);
  start_status_ = coordinator_->BuildAndStart();
  if (!start_status_.ok()) return;
  LocalWorkerPool::Options w;
  w.binary = WorkerBinary();
  w.count = world;
  w.coordinator_address = coordinator_->internal_address();
  w.cluster_secret = coordinator_->cluster_secret();
  w.kernel = std::move(kernel);
  w.extra_args = std::move(worker_args);
  // The workers stage as many calls at once as the coordinator keeps on the ring.
  w.extra_args.push_back(absl::StrCat("--pipeline_depth=", options.pipeline_depth));
  workers_ = std::make_unique<LocalWorkerPool>(w);
  start_status_ = workers_->Start();
  if (!start_status_.ok()) return;
  if (!coordinator_->WaitUntilReady(absl::Seconds(60))) {
    start_status_ = absl::DeadlineExceededError("ring did not form in 60 s");
  }
}

LocalService::~LocalService() { Stop(); }

std::string LocalService::address() const {
  return absl::StrCat("127.0.0.1:", coordinator_->port());
}

void LocalService::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (workers_) workers_->Stop();
  if (coordinator_) coordinator_->Shutdown();
}

DType ToDType(v1::DType d) {
  return d == v1::DTYPE_FP32 ? DType::kF32 : d == v1::DTYPE_FP16 ? DType::kF16 : DType::kBF16;
}

void FillTensor(v1::Tensor* t, const Shape& s, int heads, uint32_t id, uint64_t seed) {
  t->set_dtype(s.dtype);
  for (int64_t d : {static_cast<int64_t>(s.batch), s.seqlen, static_cast<int64_t>(heads),
                    static_cast<int64_t>(s.head_dim)}) {
    t->add_shape(d);
  }
  std::string* data = t->mutable_data();
  data->resize(static_cast<size_t>(s.batch) * s.seqlen * heads * s.head_dim *
               DTypeSize(ToDType(s.dtype)));
  FillSynthetic(seed, id, s.batch, s.seqlen, heads, s.head_dim, ToDType(s.dtype), data->data());
}

v1::AttendRequest MakeRequest(const Shape& s, uint64_t seed) {
  v1::AttendRequest r;
  FillTensor(r.mutable_q(), s, s.heads, 0, seed);
  FillTensor(r.mutable_k(), s, s.heads_k, 1, seed);
  FillTensor(r.mutable_v(), s, s.heads_k, 2, seed);
  r.set_return_lse(true);
  return r;
}

AttentionParams ReferenceParams(const v1::Tensor& q, const v1::Tensor& k, const v1::Tensor& v,
                                const v1::AttentionOptions& o, std::vector<float>* slopes) {
  AttentionParams p;
  p.batch = static_cast<int>(q.shape(0));
  p.seqlen_q = p.seqlen_k = q.shape(1);
  p.heads = static_cast<int>(q.shape(2));
  p.heads_k = static_cast<int>(k.shape(2));
  p.head_dim = static_cast<int>(q.shape(3));
  p.dtype = p.o_dtype = ToDType(q.dtype());
  p.q = q.data().data();
  p.k = k.data().data();
  p.v = v.data().data();
  SetContiguousStrides(&p);
  p.softmax_scale = o.has_softmax_scale() ? o.softmax_scale() : 1.0f / std::sqrt(p.head_dim * 1.0f);
  p.causal = o.causal();
  p.window_left = o.has_window_left() ? o.window_left() : -1;
  p.window_right = o.has_window_right() ? o.window_right() : -1;
  slopes->assign(o.alibi_slopes().begin(), o.alibi_slopes().end());
  p.alibi_slopes = slopes->empty() ? nullptr : slopes->data();
  p.softcap = o.softcap();
  return p;
}

std::string HealthStatus(const std::shared_ptr<grpc::Channel>& channel) {
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  grpc::Slice empty_slice{std::string()};
  grpc::ByteBuffer request(&empty_slice, 1), response;
  absl::Notification done;
  grpc::Status status;
  generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                    [&](grpc::Status s) {
                      status = s;
                      done.Notify();
                    });
  done.WaitForNotification();
  if (!status.ok()) return "error: " + status.error_message();
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return "error: dump";
  std::string bytes;
  for (const grpc::Slice& sl : slices) {
    bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  }
  return bytes;
}

absl::StatusOr<ReferenceResult> ReferenceOf(const v1::AttendRequest& req) {
  std::vector<float> slopes;
  AttentionParams p = ReferenceParams(req.q(), req.k(), req.v(), req.options(), &slopes);
  char unused_output;  // ReferenceForward returns its own buffers; validation wants a pointer
  p.o = &unused_output;
  return ReferenceForward(p);
}

// The fp64 reference of a request, compared with its response.
void ExpectMatchesReference(const v1::AttendRequest& req, const v1::AttendResponse& resp) {
  absl::StatusOr<ReferenceResult> ref = ReferenceOf(req);
  ASSERT_TRUE(ref.ok()) << ref.status();
  const DType dtype = DTypeFromProto(req.q().dtype()).value();
  ASSERT_EQ(resp.out().data().size(), req.q().data().size());
  const int64_t n = static_cast<int64_t>(ref->o.size());
  const ErrorStats e = CompareTensor(resp.out().data().data(), dtype, ref->o.data(), n);
  const double tol = dtype == DType::kF32 ? 1e-5 : dtype == DType::kF16 ? 2e-3 : 1e-2;
  EXPECT_TRUE(e.Within(tol, 1.0)) << "out vs fp64: " << e.ToString();
  ASSERT_EQ(resp.lse().data().size(), ref->lse.size() * sizeof(float));
  const ErrorStats l = CompareTensor(resp.lse().data().data(), DType::kF32, ref->lse.data(),
                                     static_cast<int64_t>(ref->lse.size()));
  EXPECT_TRUE(l.Within(1e-5, 1e-4)) << "lse vs fp64: " << l.ToString();
}

std::unique_ptr<v1::AttentionService::Stub> UnlimitedStub(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(INT_MAX);
  args.SetMaxSendMessageSize(INT_MAX);
  return v1::AttentionService::NewStub(
      grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
}

grpc::Status CallAttend(v1::AttentionService::Stub& stub, const v1::AttendRequest& req,
                        v1::AttendResponse* resp, absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  return stub.Attend(&ctx, req, resp);
}

}  // namespace ringattn::test
