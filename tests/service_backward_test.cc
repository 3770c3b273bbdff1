// AttendBackward end to end through gRPC on loopback: an in-process coordinator and real worker
// processes (`ringattn worker`, Gloo ring, CPU kernel). Each case runs the forward through
// Attend (return_lse), then the backward through AttentionClient::AttendBackward with a random
// dout, and compares dq, dk and dv with the fp64 reference backward (ReferenceBackward, which
// recomputes the forward from q, k and v in fp64). Tolerances on the relative L2 error: fp32
// 1e-5; bf16 1e-2, the rounding of the gradients to bf16 (and of the forward's out to bf16,
// which enters through D = rowsum(dout * out)). Bad input is INVALID_ARGUMENT naming the field,
// and the service keeps serving.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/error_metrics.h"
#include "cli/attend_command.h"
#include "client/attention_client.h"
#include "client/head_split.h"
#include "client/npy.h"
#include "gtest/gtest.h"
#include "kernels/attention_backward_params.h"
#include "kernels/cpu/reference_backward.h"
#include "kernels/params_check.h"
#include "ringattn/v1/attention.grpc.pb.h"
#include "server/coordinator.h"
#include "server/local_workers.h"
#include "tests/service_backward_fixture.h"
#include "tests/service_fixture.h"

namespace ringattn {
namespace {

using test::MakeRequest;
using test::Shape;
using test::WorkerBinary;

using Service = test::BackwardService;
using test::CompareWithReference;
using test::GradErrors;
using test::MakeBackward;

class BackwardWorlds : public ::testing::TestWithParam<int> {};

TEST_P(BackwardWorlds, MatchesReference) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  const int world = GetParam();
  Service svc(world, "cpu");  // CPU workers even where a GPU would make "auto" pick cuda
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();

  struct Case {
    const char* name;
    Shape shape;
    bool causal;
    v1::Layout layout;
    int64_t window_left, window_right;
  };
  const Case cases[] = {
      {"seq7_gqa_causal_fp32", {1, 7, 8, 2, 64, v1::DTYPE_FP32}, true, v1::LAYOUT_AUTO, -1, -1},
      {"seq7_gqa_noncausal_bf16", {1, 7, 8, 2, 64, v1::DTYPE_BF16}, false, v1::LAYOUT_AUTO, -1, -1},
      {"seq255_noncausal_fp32", {2, 255, 4, 4, 64, v1::DTYPE_FP32}, false, v1::LAYOUT_AUTO, -1, -1},
      {"seq255_gqa_causal_bf16_zigzag",
       {1, 255, 8, 2, 128, v1::DTYPE_BF16},
       true,
       v1::LAYOUT_ZIGZAG,
       -1,
       -1},
      {"seq255_gqa_window_fp32_stripe",
       {1, 255, 8, 2, 64, v1::DTYPE_FP32},
       true,
       v1::LAYOUT_STRIPE,
       40,
       -1},
      {"seq255_window_bf16_contiguous",
       {1, 255, 4, 2, 64, v1::DTYPE_BF16},
       false,
       v1::LAYOUT_CONTIGUOUS,
       16,
       24},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::AttendRequest fwd = MakeRequest(c.shape);
    fwd.set_request_id(c.name);
    fwd.set_layout(c.layout);
    fwd.mutable_options()->set_causal(c.causal);
    if (c.window_left >= 0) fwd.mutable_options()->set_window_left(c.window_left);
    if (c.window_right >= 0) fwd.mutable_options()->set_window_right(c.window_right);
    absl::StatusOr<v1::AttendResponse> fwd_resp = svc.client().Attend(fwd, absl::Seconds(60));
    ASSERT_TRUE(fwd_resp.ok()) << fwd_resp.status();

    const v1::AttendBackwardRequest req = MakeBackward(fwd, *fwd_resp, c.shape);
    absl::StatusOr<v1::AttendBackwardResponse> resp =
        svc.client().AttendBackward(req, absl::Seconds(60));
    ASSERT_TRUE(resp.ok()) << resp.status();
    EXPECT_EQ(resp->request_id(), c.name);
    EXPECT_EQ(resp->dq().dtype(), c.shape.dtype);
    EXPECT_EQ(resp->dk().dtype(), c.shape.dtype);
    EXPECT_EQ(resp->dv().dtype(), c.shape.dtype);
    EXPECT_EQ(resp->dk().shape_size(), 4);
    if (resp->dk().shape_size() == 4) {
      EXPECT_EQ(resp->dk().shape(2), c.shape.heads_k);
    }
    EXPECT_EQ(resp->plan().world_size(), world);
    EXPECT_NE(resp->plan().layout(), v1::LAYOUT_AUTO);
    ASSERT_EQ(resp->timings().workers_size(), world);
    EXPECT_GT(resp->timings().total_seconds(), 0);
    for (const v1::WorkerTiming& w : resp->timings().workers()) {
      EXPECT_EQ(w.steps_size(), world);
      EXPECT_EQ(w.backend(), "cpu");
    }
    const GradErrors e = CompareWithReference(req, *resp);
    const double tol = c.shape.dtype == v1::DTYPE_FP32 ? 1e-5 : 1e-2;
    std::printf("world %d %-32s rel_l2 dq=%.3g dk=%.3g dv=%.3g\n", world, c.name, e.dq.rel_l2,
                e.dk.rel_l2, e.dv.rel_l2);
    EXPECT_TRUE(e.dq.Within(tol, 1e30)) << "dq vs fp64: " << e.dq.ToString();
    EXPECT_TRUE(e.dk.Within(tol, 1e30)) << "dk vs fp64: " << e.dk.ToString();
    EXPECT_TRUE(e.dv.Within(tol, 1e30)) << "dv vs fp64: " << e.dv.ToString();
    EXPECT_GT(e.dq.count, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(World, BackwardWorlds, ::testing::Values(1, 2, 3));

// A client with several connections cuts a request by K/V heads (client/head_split.h), here
// past a threshold of 0 bytes: three parts of a GQA request with ALiBi, forward and backward,
// each joined answer matching the fp64 reference as the whole request's would.
TEST(HeadSplit, PartsOverConnectionsMatchTheReference) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Service svc(2, "cpu");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  absl::StatusOr<std::unique_ptr<AttentionClient>> client =
      AttentionClient::Connect(svc.address(), absl::Seconds(10), {}, /*connections=*/3);
  ASSERT_TRUE(client.ok()) << client.status();
  (*client)->set_split_above_bytes(0);
  const Shape shape{2, 211, 6, 3, 64, v1::DTYPE_FP32};
  v1::AttendRequest fwd = MakeRequest(shape);
  fwd.mutable_options()->set_causal(true);
  for (int h = 0; h < shape.heads; ++h) {
    fwd.mutable_options()->add_alibi_slopes(std::pow(2.0f, -8.0f * (h + 1) / shape.heads));
  }
  // Parts: the largest divisor of heads_k within the connections; none with dropout.
  EXPECT_EQ(HeadParts(AttendRpc(), fwd, 4), 3);
  EXPECT_EQ(HeadParts(AttendRpc(), fwd, 2), 1);
  v1::AttendRequest dropped = fwd;
  dropped.mutable_options()->set_dropout_p(0.1f);
  EXPECT_EQ(HeadParts(AttendRpc(), dropped, 3), 1);
  absl::StatusOr<v1::AttendResponse> out = (*client)->AttendAuto(fwd, absl::Seconds(60), 0);
  ASSERT_TRUE(out.ok()) << out.status();
  test::ExpectMatchesReference(fwd, *out);  // out and lse, joined along the heads
  EXPECT_GT(out->timings().client_seconds(), out->timings().total_seconds());

  const v1::AttendBackwardRequest req = MakeBackward(fwd, *out, shape);
  absl::StatusOr<v1::AttendBackwardResponse> grads =
      (*client)->AttendBackwardAuto(req, absl::Seconds(60), 0);
  ASSERT_TRUE(grads.ok()) << grads.status();
  ASSERT_EQ(grads->dk().shape_size(), 4);
  EXPECT_EQ(grads->dk().shape(2), shape.heads_k);
  const GradErrors e = CompareWithReference(req, *grads);
  EXPECT_TRUE(e.dq.Within(1e-5, 1e30)) << "dq vs fp64: " << e.dq.ToString();
  EXPECT_TRUE(e.dk.Within(1e-5, 1e30)) << "dk vs fp64: " << e.dk.ToString();
  EXPECT_TRUE(e.dv.Within(1e-5, 1e30)) << "dv vs fp64: " << e.dv.ToString();
}

// Bad input is INVALID_ARGUMENT naming the field; the next request succeeds.
TEST(BackwardErrors, BadInputThenGoodRequest) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Service svc(2, "cpu");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  Shape s;
  s.seqlen = 37;
  v1::AttendRequest fwd = MakeRequest(s);
  fwd.mutable_options()->set_causal(true);
  absl::StatusOr<v1::AttendResponse> fwd_resp = svc.client().Attend(fwd, absl::Seconds(60));
  ASSERT_TRUE(fwd_resp.ok()) << fwd_resp.status();
  const v1::AttendBackwardRequest good = MakeBackward(fwd, *fwd_resp, s);

  struct Bad {
    const char* name;
    std::function<void(v1::AttendBackwardRequest*)> mutate;
    const char* expect;
  };
  const std::vector<Bad> bad = {
      {"dout shape", [](v1::AttendBackwardRequest* r) { r->mutable_dout()->set_shape(1, 36); },
       "dout.shape"},
      {"dout dtype",
       [](v1::AttendBackwardRequest* r) { r->mutable_dout()->set_dtype(v1::DTYPE_BF16); },
       "dout.dtype"},
      {"dout bytes",
       [](v1::AttendBackwardRequest* r) { r->mutable_dout()->mutable_data()->pop_back(); },
       "dout.data"},
      {"lse bytes",
       [](v1::AttendBackwardRequest* r) { r->mutable_lse()->mutable_data()->resize(12); },
       "lse.data"},
      {"lse shape", [](v1::AttendBackwardRequest* r) { r->mutable_lse()->set_shape(2, 36); },
       "lse.shape"},
      {"lse dtype",
       [](v1::AttendBackwardRequest* r) { r->mutable_lse()->set_dtype(v1::DTYPE_BF16); },
       "lse.dtype"},
      {"missing lse", [](v1::AttendBackwardRequest* r) { r->clear_lse(); }, "lse is missing"},
      {"missing out", [](v1::AttendBackwardRequest* r) { r->clear_out(); }, "out is missing"},
      {"out shape", [](v1::AttendBackwardRequest* r) { r->mutable_out()->set_shape(2, 2); },
       "out.shape"},
      {"k seq", [](v1::AttendBackwardRequest* r) { r->mutable_k()->set_shape(1, 36); },
       "k.shape[1]"},
      {"q bytes", [](v1::AttendBackwardRequest* r) { r->mutable_q()->mutable_data()->resize(8); },
       "q.data"},
      {"missing v", [](v1::AttendBackwardRequest* r) { r->clear_v(); }, "v is missing"},
      {"dropout", [](v1::AttendBackwardRequest* r) { r->mutable_options()->set_dropout_p(1.5f); },
       "dropout_p"},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.name);
    v1::AttendBackwardRequest req = good;
    b.mutate(&req);
    absl::StatusOr<v1::AttendBackwardResponse> resp =
        svc.client().AttendBackward(req, absl::Seconds(30));
    ASSERT_FALSE(resp.ok());
    EXPECT_EQ(resp.status().code(), absl::StatusCode::kInvalidArgument) << resp.status();
    EXPECT_NE(resp.status().message().find(b.expect), std::string::npos) << resp.status();
  }
  absl::StatusOr<v1::AttendBackwardResponse> resp =
      svc.client().AttendBackward(good, absl::Seconds(60));
  ASSERT_TRUE(resp.ok()) << resp.status();
  const GradErrors e = CompareWithReference(good, *resp);
  EXPECT_TRUE(e.dq.Within(1e-5, 1e30)) << e.dq.ToString();
  EXPECT_TRUE(e.dk.Within(1e-5, 1e30)) << e.dk.ToString();
  EXPECT_TRUE(e.dv.Within(1e-5, 1e30)) << e.dv.ToString();
  // The forward still works after the backward, on the same ring.
  absl::StatusOr<v1::AttendResponse> again = svc.client().Attend(fwd, absl::Seconds(60));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->out().data(), fwd_resp->out().data());
}

// `ringattn attend --backward --check` against the service: gradients through AttendBackward,
// checked here against the fp64 reference backward; and the check fails on a corrupted result.
TEST(BackwardCommand, AttendBackwardPassesItsCheck) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Service svc(2, "cpu");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  AttendCommandOptions o;
  o.target = svc.address();
  o.batch = 1;
  o.seqlen = 77;
  o.heads = 4;
  o.heads_k = 2;
  o.head_dim = 64;
  o.dtype = "bf16";
  o.causal = true;
  o.layout = "zigzag";
  o.check = true;
  o.backward = true;
  o.return_lse = false;  // --backward asks for the LSE anyway
  std::ostringstream out;
  EXPECT_EQ(RunAttendCommand(o, out), 0) << out.str();
  EXPECT_NE(out.str().find("dq [1, 77, 4, 64] bf16"), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("dk [1, 77, 2, 64] bf16"), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("check gradients: PASS"), std::string::npos) << out.str();
  // With dropout (p 0.3, a seed): forward and gradients still pass their fp64 checks.
  AttendCommandOptions dropped = o;
  dropped.dropout_p = 0.3f;
  dropped.dropout_seed = 21;
  std::ostringstream with_dropout;
  EXPECT_EQ(RunAttendCommand(dropped, with_dropout), 0) << with_dropout.str();
  EXPECT_NE(with_dropout.str().find("check gradients: PASS"), std::string::npos)
      << with_dropout.str();

  // The same through AttendBackwardStream (--stream), writing the gradients as .npy files that
  // read back as the shapes of q, k and v.
  const std::string prefix = ::testing::TempDir() + "/attend_backward_";
  o.grads_npy_prefix = prefix;
  o.streaming = true;
  o.chunk_bytes = 3000;
  std::ostringstream streamed;
  EXPECT_EQ(RunAttendCommand(o, streamed), 0) << streamed.str();
  EXPECT_NE(streamed.str().find("check gradients: PASS"), std::string::npos) << streamed.str();
  for (const auto& [name, shape] : {std::pair{"dq", std::vector<int64_t>{1, 77, 4, 64}},
                                    std::pair{"dk", std::vector<int64_t>{1, 77, 2, 64}},
                                    std::pair{"dv", std::vector<int64_t>{1, 77, 2, 64}}}) {
    absl::StatusOr<NpyArray> npy = ReadNpy(prefix + name + ".npy");
    ASSERT_TRUE(npy.ok()) << name << ": " << npy.status();
    EXPECT_EQ(npy->shape, shape) << name;
    EXPECT_EQ(npy->dtype, DType::kF32) << name;  // bf16 written as fp32
  }

  // The same comparison on a corrupted gradient fails it.
  const v1::AttendRequest fwd = MakeSyntheticRequest(1, 33, 2, 2, 64, DType::kF32, 5);
  v1::AttendRequest with_lse = fwd;
  with_lse.set_return_lse(true);
  absl::StatusOr<v1::AttendResponse> fwd_resp = svc.client().Attend(with_lse, absl::Seconds(60));
  ASSERT_TRUE(fwd_resp.ok()) << fwd_resp.status();
  const v1::AttendBackwardRequest req = MakeBackwardRequest(with_lse, *fwd_resp, 9);
  absl::StatusOr<v1::AttendBackwardResponse> resp =
      svc.client().AttendBackward(req, absl::Seconds(60));
  ASSERT_TRUE(resp.ok()) << resp.status();
  absl::StatusOr<GradientErrors> good = CompareGradientsWithReference(req, *resp);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_LT(good->dv.rel_l2, GradientTolerance(DType::kF32));
  v1::AttendBackwardResponse corrupted = *resp;
  float* dv = reinterpret_cast<float*>(corrupted.mutable_dv()->mutable_data()->data());
  dv[5] += 1.0f;
  absl::StatusOr<GradientErrors> bad = CompareGradientsWithReference(req, corrupted);
  ASSERT_TRUE(bad.ok()) << bad.status();
  EXPECT_GT(bad->dv.rel_l2, GradientTolerance(DType::kF32));
  corrupted.mutable_dk()->mutable_data()->pop_back();
  EXPECT_EQ(CompareGradientsWithReference(req, corrupted).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// AttendBackwardStream: a request past the server's unary limit is RESOURCE_EXHAUSTED as a unary
// call and goes through the stream (AttendBackwardAuto), with the unary call's result bit for bit
// where both fit; streams breaking the chunk protocol are INVALID_ARGUMENT and the service keeps
// serving.
TEST(BackwardStream, PastTheUnaryLimitAndProtocolErrors) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Coordinator::Options options;
  // 64 KiB (gRPC's own limit is this plus 1 MiB of slack): the request below is ~1.6 MiB.
  options.max_unary_bytes = 64 << 10;
  options.stream_chunk_bytes = 5000;  // several response chunks per tensor
  Service svc(2, "cpu", options);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  Shape s;
  s.seqlen = 400;
  s.heads = 4;
  s.heads_k = 2;
  v1::AttendRequest fwd = MakeRequest(s);
  fwd.mutable_options()->set_causal(true);
  absl::StatusOr<v1::AttendResponse> fwd_resp =
      svc.client().AttendStreaming(fwd, absl::Seconds(60), 30000);
  ASSERT_TRUE(fwd_resp.ok()) << fwd_resp.status();
  const v1::AttendBackwardRequest req = MakeBackward(fwd, *fwd_resp, s);
  ASSERT_GT(static_cast<int64_t>(req.ByteSizeLong()), options.max_unary_bytes + (1 << 20));

  absl::StatusOr<v1::AttendBackwardResponse> unary =
      svc.client().AttendBackward(req, absl::Seconds(60));
  EXPECT_EQ(unary.status().code(), absl::StatusCode::kResourceExhausted) << unary.status();
  absl::StatusOr<v1::AttendBackwardResponse> streamed =
      svc.client().AttendBackwardAuto(req, absl::Seconds(60), options.max_unary_bytes);
  ASSERT_TRUE(streamed.ok()) << streamed.status();
  const GradErrors e = CompareWithReference(req, *streamed);
  EXPECT_TRUE(e.dq.Within(1e-5, 1e30)) << e.dq.ToString();
  EXPECT_TRUE(e.dk.Within(1e-5, 1e30)) << e.dk.ToString();
  EXPECT_TRUE(e.dv.Within(1e-5, 1e30)) << e.dv.ToString();
  EXPECT_GT(streamed->timings().receive_seconds(), 0.0);

  // The unary and streamed answers of a request that fits both are the same bytes.
  Shape small = s;
  small.seqlen = 9;
  const v1::AttendRequest fwd_small = MakeRequest(small);
  absl::StatusOr<v1::AttendResponse> small_resp = svc.client().Attend(fwd_small, absl::Seconds(60));
  ASSERT_TRUE(small_resp.ok()) << small_resp.status();
  const v1::AttendBackwardRequest req_small = MakeBackward(fwd_small, *small_resp, small);
  absl::StatusOr<v1::AttendBackwardResponse> a =
      svc.client().AttendBackward(req_small, absl::Seconds(60));
  absl::StatusOr<v1::AttendBackwardResponse> b =
      svc.client().AttendBackwardStreaming(req_small, absl::Seconds(60), 700);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->dq().data(), b->dq().data());
  EXPECT_EQ(a->dk().data(), b->dk().data());
  EXPECT_EQ(a->dv().data(), b->dv().data());
  EXPECT_EQ(a->dq().shape_size(), 4);

  // Protocol errors, through the raw stub.
  auto channel = grpc::CreateChannel(svc.address(), grpc::InsecureChannelCredentials());
  auto stub = v1::AttentionService::NewStub(channel);
  auto run = [&](const std::vector<v1::AttendBackwardStreamRequest>& messages) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto stream = stub->AttendBackwardStream(&ctx);
    for (const auto& m : messages) {
      if (!stream->Write(m)) break;
    }
    stream->WritesDone();
    v1::AttendBackwardStreamResponse ignored;
    while (stream->Read(&ignored)) {
    }
    return stream->Finish();
  };
  v1::AttendBackwardStreamRequest header;
  *header.mutable_header() = req_small;
  for (v1::Tensor* t :
       {header.mutable_header()->mutable_q(), header.mutable_header()->mutable_k(),
        header.mutable_header()->mutable_v(), header.mutable_header()->mutable_out(),
        header.mutable_header()->mutable_dout(), header.mutable_header()->mutable_lse()}) {
    t->clear_data();
  }
  v1::AttendBackwardStreamRequest wrong_tensor;
  wrong_tensor.mutable_chunk()->set_tensor(v1::TensorChunk::WHICH_DQ);
  wrong_tensor.mutable_chunk()->set_data("abcd");
  v1::AttendBackwardStreamRequest bad_offset;
  bad_offset.mutable_chunk()->set_tensor(v1::TensorChunk::WHICH_Q);
  bad_offset.mutable_chunk()->set_offset(8);
  bad_offset.mutable_chunk()->set_data("abcd");
  v1::AttendBackwardStreamRequest with_data = header;
  *with_data.mutable_header()->mutable_dout() = req_small.dout();
  const struct {
    const char* name;
    std::vector<v1::AttendBackwardStreamRequest> messages;
    const char* expect;
  } cases[] = {
      {"no header", {wrong_tensor}, "must start with a header"},
      {"chunk of a response tensor", {header, wrong_tensor}, "WHICH_DQ is not one this call takes"},
      {"offset out of order", {header, bad_offset}, "q chunk at offset 8, expected 0"},
      {"data in the header", {with_data}, "header carries tensor data"},
      {"short tensors", {header}, "incomplete: q has 0 of the"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const grpc::Status st = run(c.messages);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_NE(st.error_message().find(c.expect), std::string::npos) << st.error_message();
  }
  // Still serving.
  absl::StatusOr<v1::AttendBackwardResponse> again =
      svc.client().AttendBackwardStreaming(req_small, absl::Seconds(60), 700);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->dv().data(), a->dv().data());
}

// Sends `fwd` (fp32), checks its output against the fp64 reference (max abs 1e-5), then its
// gradients (AttendBackward with a synthetic dout) against the fp64 reference backward;
// *resp gets the forward response.
void ExpectForwardAndGradientsMatch(Service& svc, const v1::AttendRequest& fwd,
                                    v1::AttendResponse* resp) {
  absl::StatusOr<v1::AttendResponse> r = svc.client().Attend(fwd, absl::Seconds(60));
  ASSERT_TRUE(r.ok()) << r.status();
  *resp = *std::move(r);
  absl::StatusOr<ErrorStats> out_err = CheckAgainstReference(fwd, *resp);
  ASSERT_TRUE(out_err.ok()) << out_err.status();
  EXPECT_TRUE(out_err->Within(1e-5, 1e30)) << out_err->ToString();

  const v1::AttendBackwardRequest req = MakeBackwardRequest(fwd, *resp, 5);
  absl::StatusOr<v1::AttendBackwardResponse> grads =
      svc.client().AttendBackward(req, absl::Seconds(60));
  ASSERT_TRUE(grads.ok()) << grads.status();
  absl::StatusOr<GradientErrors> e = CompareGradientsWithReference(req, *grads);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_TRUE(e->dq.Within(1e-5, 1e30)) << e->dq.ToString();
  EXPECT_TRUE(e->dk.Within(1e-5, 1e30)) << e->dk.ToString();
  EXPECT_TRUE(e->dv.Within(1e-5, 1e30)) << e->dv.ToString();
}

// Dropout through the service on CPU workers: the forward and the gradients with p = 0.25 and
// a seed match the fp64 reference with the same mask (a hash of global positions: the ring's
// zigzag shards drop what one call over the whole sequence drops), and another seed differs.
TEST(BackwardDropout, ForwardAndGradientsMatchTheReference) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Service svc(3, "cpu");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  v1::AttendRequest fwd = MakeSyntheticRequest(1, 150, 4, 2, 64, DType::kF32, 7);
  fwd.set_return_lse(true);
  fwd.set_layout(v1::LAYOUT_ZIGZAG);
  fwd.mutable_options()->set_causal(true);
  fwd.mutable_options()->set_dropout_p(0.25f);
  fwd.mutable_options()->set_dropout_seed(1234);
  v1::AttendResponse resp;
  ExpectForwardAndGradientsMatch(svc, fwd, &resp);
  if (HasFatalFailure()) return;

  // Another seed is another mask: the output moves away from this reference.
  v1::AttendRequest other = fwd;
  other.mutable_options()->set_dropout_seed(99);
  absl::StatusOr<v1::AttendResponse> other_resp = svc.client().Attend(other, absl::Seconds(60));
  ASSERT_TRUE(other_resp.ok()) << other_resp.status();
  absl::StatusOr<ErrorStats> moved = CheckAgainstReference(fwd, *other_resp);
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_GT(moved->rel_l2, 0.05) << moved->ToString();
}

// Packed variable-length sequences through the service on CPU workers: forward and gradients
// with cu_seqlens (an empty sequence, single tokens, boundaries inside every zigzag shard)
// match the fp64 reference, which separates the sequences by its own walk over the bounds; the
// same request without them (one sequence) does not; bad bounds are INVALID_ARGUMENT naming
// options.cu_seqlens and the service keeps serving.
TEST(PackedSequences, ForwardAndGradientsMatchTheReference) {
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Service svc(3, "cpu");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  v1::AttendRequest fwd = MakeSyntheticRequest(1, 211, 5, 1, 64, DType::kF32, 9);
  fwd.set_return_lse(true);
  fwd.set_layout(v1::LAYOUT_ZIGZAG);
  fwd.mutable_options()->set_causal(true);
  for (const int64_t b : {0, 1, 8, 8, 120, 211}) fwd.mutable_options()->add_cu_seqlens(b);
  v1::AttendResponse resp;
  ExpectForwardAndGradientsMatch(svc, fwd, &resp);
  if (HasFatalFailure()) return;

  // One sequence is another problem: its output is far from this reference.
  v1::AttendRequest whole = fwd;
  whole.mutable_options()->clear_cu_seqlens();
  absl::StatusOr<v1::AttendResponse> whole_resp = svc.client().Attend(whole, absl::Seconds(60));
  ASSERT_TRUE(whole_resp.ok()) << whole_resp.status();
  absl::StatusOr<ErrorStats> moved = CheckAgainstReference(fwd, *whole_resp);
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_GT(moved->rel_l2, 0.05) << moved->ToString();

  for (const std::vector<int64_t>& bad :
       {std::vector<int64_t>{0, 300}, std::vector<int64_t>{1, 211}, std::vector<int64_t>{0, 90, 80, 211},
        std::vector<int64_t>{211}}) {
    v1::AttendRequest r = fwd;
    r.mutable_options()->clear_cu_seqlens();
    for (const int64_t b : bad) r.mutable_options()->add_cu_seqlens(b);
    absl::StatusOr<v1::AttendResponse> refused = svc.client().Attend(r, absl::Seconds(60));
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
    EXPECT_NE(refused.status().message().find("options.cu_seqlens"), std::string::npos)
        << refused.status();
  }
  absl::StatusOr<v1::AttendResponse> again = svc.client().Attend(fwd, absl::Seconds(60));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->out().data(), resp.out().data());
}

}  // namespace
}  // namespace ringattn
