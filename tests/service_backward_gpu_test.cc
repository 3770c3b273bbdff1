// AttendBackward end to end on one GPU: an in-process coordinator and one `ringattn worker`
// process with a device kernel (--kernel=cuda, and --kernel=cudnn where the build has cuDNN),
// so the backward runs through RunShardBackward, the GPU engine's device copies and
// RingFlashAttnBackwardDevice over NCCL with one rank (NCCL refuses two ranks on one GPU, so
// multi-rank device rings are tested in process: worker/ring/device_ring_backward_test). Each
// case runs the forward through Attend (return_lse), then AttendBackward with a synthetic
// dout, and compares dq, dk and dv (rounded to the input dtype) with the fp64 reference
// backward: relative L2 <= 2e-2 for bf16, 5e-3 for fp16 (the kernels' own bounds). A worker
// with cuda_reference answers the backward with an error naming the kernels that have one.
// Every case skips without a CUDA device.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "ringattn/v1/attention.pb.h"
#include "ringattn_config.h"
#include "tests/service_backward_fixture.h"
#include "tests/service_fixture.h"

namespace ringattn {
namespace {

using test::BackwardService;
using test::Shape;

bool GpuAvailable() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e == cudaSuccess && count > 0;
}

class GpuServiceBackward : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
    ASSERT_FALSE(test::WorkerBinary().empty()) << "RINGATTN_BIN not set";
  }
};

struct Case {
  const char* name;
  Shape shape;
  bool causal;
  v1::Layout layout;
  int64_t window_left, window_right;
};

TEST_P(GpuServiceBackward, MatchesReference) {
  const std::string kernel = GetParam();
  BackwardService svc(1, kernel);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  const Case cases[] = {
      {"seq255_gqa_causal_bf16_zigzag",
       {1, 255, 8, 2, 128, v1::DTYPE_BF16},
       true,
       v1::LAYOUT_ZIGZAG,
       -1,
       -1},
      {"seq7_noncausal_bf16_batch2",
       {2, 7, 4, 4, 64, v1::DTYPE_BF16},
       false,
       v1::LAYOUT_AUTO,
       -1,
       -1},
      {"seq300_window_fp16",
       {1, 300, 4, 2, 64, v1::DTYPE_FP16},
       true,
       v1::LAYOUT_CONTIGUOUS,
       40,
       -1},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::AttendRequest fwd = test::MakeRequest(c.shape);
    fwd.set_request_id(c.name);
    fwd.set_layout(c.layout);
    fwd.mutable_options()->set_causal(c.causal);
    if (c.window_left >= 0) fwd.mutable_options()->set_window_left(c.window_left);
    if (c.window_right >= 0) fwd.mutable_options()->set_window_right(c.window_right);
    absl::StatusOr<v1::AttendResponse> fwd_resp = svc.client().Attend(fwd, absl::Seconds(60));
    ASSERT_TRUE(fwd_resp.ok()) << fwd_resp.status();

    const v1::AttendBackwardRequest req = test::MakeBackward(fwd, *fwd_resp, c.shape);
    absl::StatusOr<v1::AttendBackwardResponse> resp =
        svc.client().AttendBackward(req, absl::Seconds(60));
    ASSERT_TRUE(resp.ok()) << resp.status();
    EXPECT_EQ(resp->dq().dtype(), c.shape.dtype);
    ASSERT_EQ(resp->timings().workers_size(), 1);
    EXPECT_EQ(resp->timings().workers(0).backend(), kernel);
    const test::GradErrors e = test::CompareWithReference(req, *resp);
    const double tol = c.shape.dtype == v1::DTYPE_FP16 ? 5e-3 : 2e-2;
    std::printf("%s %-32s rel_l2 dq=%.3g dk=%.3g dv=%.3g\n", kernel.c_str(), c.name, e.dq.rel_l2,
                e.dk.rel_l2, e.dv.rel_l2);
    EXPECT_TRUE(e.dq.Within(tol, 1e30)) << "dq vs fp64: " << e.dq.ToString();
    EXPECT_TRUE(e.dk.Within(tol, 1e30)) << "dk vs fp64: " << e.dk.ToString();
    EXPECT_TRUE(e.dv.Within(tol, 1e30)) << "dv vs fp64: " << e.dv.ToString();
    EXPECT_GT(e.dq.count, 0);
  }
}

// The options GPU workers took last: packed sequences (runs of 1, 7 and the rest), dropout and
// fp32 inputs on a cuda worker, forward and gradients against the fp64 reference (fp32 is
// computed on fp16 copies forward and bf16 copies backward: bf16's gradient bound).
TEST(GpuServiceOptions, CudaWorkerTakesPackedDropoutAndFp32) {
  if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  ASSERT_FALSE(test::WorkerBinary().empty()) << "RINGATTN_BIN not set";
  BackwardService svc(1, "cuda");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  for (const v1::DType dtype : {v1::DTYPE_BF16, v1::DTYPE_FP32}) {
    const Shape shape{1, 300, 5, 1, 64, dtype};
    SCOPED_TRACE(v1::DType_Name(dtype));
    v1::AttendRequest fwd = test::MakeRequest(shape);
    fwd.set_layout(v1::LAYOUT_ZIGZAG);
    v1::AttentionOptions* o = fwd.mutable_options();
    o->set_causal(true);
    o->set_dropout_p(0.2f);
    o->set_dropout_seed(77);
    for (const int64_t b : {0, 1, 8, 300}) o->add_cu_seqlens(b);
    fwd.set_return_lse(true);
    absl::StatusOr<v1::AttendResponse> fwd_resp = svc.client().Attend(fwd, absl::Seconds(60));
    ASSERT_TRUE(fwd_resp.ok()) << fwd_resp.status();
    const v1::AttendBackwardRequest req = test::MakeBackward(fwd, *fwd_resp, shape);
    absl::StatusOr<v1::AttendBackwardResponse> resp =
        svc.client().AttendBackward(req, absl::Seconds(60));
    ASSERT_TRUE(resp.ok()) << resp.status();
    EXPECT_EQ(resp->timings().workers(0).backend(), "cuda");
    const test::GradErrors e = test::CompareWithReference(req, *resp);
    std::printf("cuda packed+dropout %s rel_l2 dq=%.3g dk=%.3g dv=%.3g\n",
                v1::DType_Name(dtype).c_str(), e.dq.rel_l2, e.dk.rel_l2, e.dv.rel_l2);
    EXPECT_TRUE(e.dq.Within(2e-2, 1e30)) << "dq vs fp64: " << e.dq.ToString();
    EXPECT_TRUE(e.dk.Within(2e-2, 1e30)) << "dk vs fp64: " << e.dk.ToString();
    EXPECT_TRUE(e.dv.Within(2e-2, 1e30)) << "dv vs fp64: " << e.dv.ToString();
    EXPECT_GT(e.dq.count, 0);
  }
}

std::vector<std::string> Kernels() {
#if RINGATTN_HAVE_CUDNN
  return {"cuda", "cudnn"};
#else
  return {"cuda"};
#endif
}

INSTANTIATE_TEST_SUITE_P(Kernels, GpuServiceBackward, ::testing::ValuesIn(Kernels()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// cuda_reference has a forward but no backward: the request fails, naming the kernels to use.
TEST(GpuServiceBackwardErrors, CudaReferenceNamesTheKernelsWithABackward) {
  if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  ASSERT_FALSE(test::WorkerBinary().empty()) << "RINGATTN_BIN not set";
  BackwardService svc(1, "cuda_reference");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  Shape s;
  s.seqlen = 32;
  s.dtype = v1::DTYPE_BF16;
  v1::AttendRequest fwd = test::MakeRequest(s);
  absl::StatusOr<v1::AttendResponse> fwd_resp = svc.client().Attend(fwd, absl::Seconds(60));
  ASSERT_TRUE(fwd_resp.ok()) << fwd_resp.status();
  absl::StatusOr<v1::AttendBackwardResponse> resp =
      svc.client().AttendBackward(test::MakeBackward(fwd, *fwd_resp, s), absl::Seconds(60));
  ASSERT_FALSE(resp.ok());
  EXPECT_NE(resp.status().message().find("--kernel=cuda"), std::string::npos) << resp.status();
}

}  // namespace
}  // namespace ringattn
