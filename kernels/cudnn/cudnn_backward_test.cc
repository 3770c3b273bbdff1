// The backward of the cudnn backend (cudnn_backward.h).
//
// Host-only (run everywhere): refusals are InvalidArgument naming the option (alibi_slopes,
// softcap, dtype, out_dtype, out/dout strides) before any device call; the factory.
// GPU (every case skips without a CUDA device):
//   - a sweep against the fp64 reference backward (ReferenceBackward) at seq 7, 255, 1000 (and
//     s_q != s_k), 5 heads, GQA 8:2, d 64/128, bf16/fp16, unmasked, causal, windows (one with
//     s_q > s_k: the padding-mask path); dq/dk/dv poisoned with NaN before the call so an
//     unwritten element fails (rows outside the mask plan's live block must be written 0);
//   - accumulate: dq/dk/dv start at 0, two calls with accumulate = true must give 2x the
//     gradient;
//   - a ring-like key split: two calls on the two key halves (k/v/dk/dv pointers moved, key
//     positions kept), the whole forward's lse, accumulating into the same dq, give the whole
//     gradients;
//   - the graph cache: a repeated call does not rebuild;
//   - dynamic shapes: one backend per graph mode (static, dynamic, dynamic after Prewarm)
//     through interleaved calls of many lengths sharing kernel classes (seq 1, 7, 3816; 5
//     heads; GQA; another scale; windows with other bounds), each against the fp64 reference.
//   - background builds: the first call of a shape runs our kernel while the graph builds, the
//     next one cuDNN (seq 1000, 5:1 heads), both against the fp64 reference.
// ComputeDelta is checked for every backend by backend_conformance_test.
// The forward's O and LSE come from the fp64 reference forward (O rounded to the input dtype,
// as a real forward would store it), so a failure here is the backward's.
//
// Tolerances, per gradient tensor (dq, dk, dv separately): relative L2 <= 2e-2 for bf16 inputs,
// <= 5e-3 for fp16. cuDNN rounds P and dS to the input dtype for its matmuls and stores dQ/dK/dV
// in the input dtype (then converted to our fp32), and reads O in the input dtype for D.
// A failing case prints its mask plan, each gradient's error statistics, the worst element as
// (b, row, head, col) with got/want, and ||got|| / ||want|| (a GQA dK/dV ratio near h_k/h
// would mean cuDNN did not sum over the query-head group; a ratio of exactly 0 means nothing
// was written back; 2.0 in a non-accumulate case means double counting).
#include "kernels/cudnn/cudnn_backward.h"

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/cpu/reference_backward.h"
#include "kernels/cpu/test_util.h"
#include "kernels/cuda/gpu_backward_test_util.h"
#include "kernels/cuda/gpu_test_util.h"
#include "kernels/cudnn/cudnn_backend.h"
#include "kernels/cudnn/graph_mode_test_util.h"

namespace ringattn {
namespace {

using kernel_testing::Case;
using kernel_testing::CaseName;
using kernel_testing::CheckGrads;
using kernel_testing::DeviceBuffer;
using kernel_testing::DeviceCall;
using kernel_testing::Download;
using kernel_testing::ExpectGraphStatsOfMode;
using kernel_testing::GpuTest;
using kernel_testing::GraphMode;
using kernel_testing::GraphModeName;
using kernel_testing::HostCall;
using kernel_testing::MakeCudnnInMode;
using kernel_testing::MakeHostCall;
using kernel_testing::Shape;
using kernel_testing::ToDevice;

// ---- Host-only ------------------------------------------------------------------------------

// The registered "cudnn" backend.
std::unique_ptr<AttentionBackend> MakeCudnn() {
  absl::StatusOr<std::unique_ptr<AttentionBackend>> b = MakeBackend("cudnn");
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? *std::move(b) : nullptr;
}

AttentionBackwardParams FakeCall() { return kernel_testing::FakeBackwardCall(); }

// Refused by cuDNN's rules (CudnnBackwardSupports: fp32 for its own dtype refusal) and by the
// backend's Backward, which rounds fp32 inputs but checks the call first.
void ExpectRefused(const AttentionBackwardParams& p, const std::string& needle) {
  const std::string rule_needle = p.fwd.dtype == DType::kF32 ? "got dtype fp32" : needle;
  EXPECT_EQ(CudnnBackwardSupports(p).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(CudnnBackwardSupports(p).message().find(rule_needle), std::string::npos)
      << CudnnBackwardSupports(p);
  auto backend = MakeCudnn();
  kernel_testing::ExpectBackwardRefused(*backend, p, needle);
}

TEST(CudnnBackwardHostTest, Factory) {
  auto backend = MakeCudnn();
  ASSERT_NE(backend, nullptr);
  EXPECT_EQ(backend->name(), "cudnn");
  EXPECT_EQ(backend->memory_space(), MemorySpace::kDevice);
  EXPECT_TRUE(backend->capabilities().backward);
  CudnnBackend* c = AsCudnnBackend(backend.get());
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->graph_builds(), 0);
}

TEST(CudnnBackwardHostTest, AcceptsPlainCall) {
  EXPECT_TRUE(CudnnBackwardSupports(FakeCall()).ok());
}

TEST(CudnnBackwardHostTest, RefusesWhatNoGpuBackwardTakes) {
  for (const kernel_testing::BackwardRefusal& c : kernel_testing::RefusalsOfEveryGpuBackward()) {
    SCOPED_TRACE(c.name);
    ExpectRefused(c.p, c.needle);
  }
}

// cuDNN's dropout draws its own mask (Philox), not the pairs' DropoutFactor that the forward
// dropped: refused, naming the option.
// Packed sequences: cuDNN has no per-sequence mask within a batch row (with bf16 and with fp32
// inputs, which are checked before they are rounded).
TEST(CudnnBackwardHostTest, RefusesPackedSequences) {
  AttentionBackwardParams p = FakeCall();
  static const int64_t bounds[] = {0, int64_t{1} << 40};  // covers every position
  p.fwd.seq_bounds = bounds;
  p.fwd.num_seqs = 1;
  ExpectRefused(p, "packed variable-length sequences");
  p.fwd.dtype = p.out_dtype = DType::kF32;
  ExpectRefused(p, "packed variable-length sequences");
}

TEST(CudnnBackwardHostTest, RefusesDropout) {
  AttentionBackwardParams p = FakeCall();
  p.fwd.dropout_p = 0.1f;
  ExpectRefused(p, "dropout_p");
}

TEST(CudnnBackwardHostTest, RefusesAlibi) {
  AttentionBackwardParams p = FakeCall();
  static const float slopes[4] = {0.5f, 0.25f, 0.125f, 0.0625f};
  p.fwd.alibi_slopes = slopes;
  ExpectRefused(p, "alibi_slopes");
}

TEST(CudnnBackwardHostTest, RefusesSoftcap) {
  AttentionBackwardParams p = FakeCall();
  p.fwd.softcap = 30.0f;
  ExpectRefused(p, "softcap");
}

TEST(CudnnBackwardHostTest, RefusesNullOutWithDelta) {
  AttentionBackwardParams p = FakeCall();
  p.out = nullptr;
  p.delta = reinterpret_cast<const float*>(p.out);
  ExpectRefused(p, "out");
}

TEST(CudnnBackwardHostTest, RefusesBadDoutStride) {
  AttentionBackwardParams p = FakeCall();
  p.dout_row_stride += 4;
  p.dout_batch_stride = p.dout_row_stride * p.fwd.seqlen_q;
  ExpectRefused(p, "dout_row_stride");
}

TEST(CudnnBackwardHostTest, RefusesPartialMaskWithUnequalPositionStrides) {
  AttentionBackwardParams p = FakeCall();
  p.fwd.causal = true;
  p.fwd.q_pos_stride = 2;
  p.fwd.k_pos_stride = 1;
  ExpectRefused(p, "q_pos_stride");
}

// ---- GPU ------------------------------------------------------------------------------------

std::string PlanOf(const AttentionParams& f) {
  absl::StatusOr<CudnnMaskPlan> plan = PlanCudnnCall(f);
  return plan.ok() ? plan->ToString() : plan.status().ToString();
}

class CudnnBackwardSweep : public GpuTest, public ::testing::WithParamInterface<Case> {};

TEST_P(CudnnBackwardSweep, MatchesFp64Reference) {
  const Case& c = GetParam();
  HostCall hc;
  ASSERT_NO_FATAL_FAILURE(MakeHostCall(c, &hc));
  DeviceCall dc;
  ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, /*accumulate=*/false));
  SCOPED_TRACE(absl::StrCat(CaseName(c), " plan ", PlanOf(hc.fwd)));
  std::printf("  %s plan %s\n", CaseName(c).c_str(), PlanOf(hc.fwd).c_str());
  auto backend = MakeCudnn();
  const absl::Status s = backend->Backward(dc.p);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  CheckGrads(hc, dc, 1.0);
}

TEST_P(CudnnBackwardSweep, AccumulateTwiceIsTwice) {
  const Case& c = GetParam();
  if (c.sq > 255 || c.d != 64) GTEST_SKIP() << "accumulate checked on the smaller cases";
  HostCall hc;
  ASSERT_NO_FATAL_FAILURE(MakeHostCall(c, &hc));
  DeviceCall dc;
  ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, /*accumulate=*/true));
  SCOPED_TRACE(absl::StrCat(CaseName(c), " plan ", PlanOf(hc.fwd)));
  auto backend = MakeCudnn();
  ASSERT_TRUE(backend->Backward(dc.p).ok());
  const absl::Status s = backend->Backward(dc.p);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  // One build, none for a 1 x 1 call (our kernel runs it).
  EXPECT_EQ(AsCudnnBackend(backend.get())->graph_builds(), c.sq * c.sk == 1 ? 0 : 1)
      << "repeat rebuilt";
  CheckGrads(hc, dc, 2.0);
}

std::vector<Case> SweepCases() {
  std::vector<Case> cases;
  for (DType t : {DType::kBF16, DType::kF16}) {
    for (int d : {64, 128}) {
      cases.push_back({1, 1, 5, 5, d, t});  // cuDNN refuses 1 x 1: our kernel runs it
      cases.push_back({7, 7, 5, 5, d, t});
      cases.push_back({255, 255, 5, 5, d, t, /*causal=*/true});
      cases.push_back({1000, 1000, 8, 2, d, t, /*causal=*/true});
      cases.push_back({255, 1000, 8, 2, d, t});
      cases.push_back({1000, 1000, 5, 5, d, t, false, /*left=*/64, /*right=*/0});
      cases.push_back({255, 255, 8, 2, d, t, false, 16, 16});
      // s_q > s_k with a left bound: the padding-mask path of the plan.
      cases.push_back({255, 100, 5, 5, d, t, false, 20, 5});
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Sweep, CudnnBackwardSweep, ::testing::ValuesIn(SweepCases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return CaseName(info.param);
                         });

// A ring step: the forward saw all keys; two backward calls on the key halves, with the whole
// forward's lse, accumulate into dq (and into their own halves of dk/dv).
class CudnnBackwardGpuTest : public GpuTest {};

TEST_F(CudnnBackwardGpuTest, KeySplitAccumulatesToWholeGradient) {
  for (bool causal : {false, true}) {
    for (DType t : {DType::kBF16, DType::kF16}) {
      const Case c{255, 256, 8, 2, 64, t, causal};
      SCOPED_TRACE(absl::StrCat("key split ", CaseName(c)));
      HostCall hc;
      ASSERT_NO_FATAL_FAILURE(MakeHostCall(c, &hc));
      DeviceCall dc;
      ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, /*accumulate=*/true));
      auto backend = MakeCudnn();
      for (const auto& [begin, end] : {std::pair<int64_t, int64_t>{0, 128}, {128, 256}}) {
        AttentionBackwardParams part = dc.p;
        part.fwd = kernel_testing::KeyRange(dc.p.fwd, begin, end);
        part.dk = dc.p.dk + begin * dc.p.dk_row_stride;
        part.dv = dc.p.dv + begin * dc.p.dv_row_stride;
        std::printf("  keys [%lld, %lld) plan %s\n", static_cast<long long>(begin),
                    static_cast<long long>(end), PlanOf(part.fwd).c_str());
        const absl::Status s = backend->Backward(part);
        ASSERT_TRUE(s.ok()) << "keys [" << begin << ", " << end << "): " << s;
      }
      ASSERT_CUDA_OK(cudaDeviceSynchronize());
      CheckGrads(hc, dc, 1.0);
    }
  }
}

// ---- Dynamic shapes: one backend through many lengths ------------------------------------------

// Backward calls sharing kernel classes at many sizes and scalar values (one other scale),
// interleaved.
std::vector<AttentionParams> DynamicCalls() {
  using kernel_testing::Causal;
  using kernel_testing::Window;
  const DType bf16 = DType::kBF16, f16 = DType::kF16;
  AttentionParams rescaled = Causal(Shape(255, 255, 8, 2, 64, bf16, bf16));
  rescaled.softmax_scale = 0.3f;
  return {
      Causal(Shape(7, 7, 5, 5, 64, bf16, bf16)),
      Shape(255, 1000, 8, 2, 64, bf16, bf16),
      Causal(Shape(3816, 3816, 2, 1, 64, bf16, bf16)),
      Shape(1, 1, 5, 5, 64, bf16, bf16),  // cuDNN refuses 1 x 1: our kernel runs it
      Causal(Shape(1000, 1000, 8, 2, 64, bf16, bf16)),
      Window(Shape(255, 255, 8, 2, 64, bf16, bf16), 16, 16),
      Shape(7, 7, 5, 5, 64, bf16, bf16),
      Shape(3816, 3816, 2, 1, 64, bf16, bf16),
      Window(Shape(300, 300, 8, 2, 64, bf16, bf16), 40, 9),
      rescaled,
      Causal(Shape(129, 129, 4, 2, 128, f16, f16)),
      Shape(255, 255, 5, 5, 128, f16, f16),
      Causal(Shape(7, 7, 4, 1, 128, f16, f16)),
  };
}

class CudnnBackwardGraphModeTest : public GpuTest,
                                   public ::testing::WithParamInterface<GraphMode> {};

TEST_P(CudnnBackwardGraphModeTest, OneBackendThroughManyLengthsMatchesFp64Reference) {
  const GraphMode mode = GetParam();
  std::unique_ptr<CudnnBackend> backend = MakeCudnnInMode(mode);
  for (const AttentionParams& fwd : DynamicCalls()) {
    // The long calls (seconds of fp64 reference each) in the dynamic modes only.
    if (mode == GraphMode::kStatic && fwd.seqlen_q > 1000) continue;
    SCOPED_TRACE(absl::StrCat(std::string(DTypeName(fwd.dtype)), " s_q=", fwd.seqlen_q, " s_k=",
                              fwd.seqlen_k, " h=", fwd.heads, ":", fwd.heads_k, " d=", fwd.head_dim,
                              " scale=", fwd.softmax_scale, " plan ", PlanOf(fwd)));
    HostCall hc;
    ASSERT_NO_FATAL_FAILURE(kernel_testing::MakeHostCallOf(fwd, /*alibi=*/false, &hc));
    DeviceCall dc;
    ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, /*accumulate=*/false));
    const absl::Status s = backend->Backward(dc.p);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    CheckGrads(hc, dc, 1.0);
  }
  ExpectGraphStatsOfMode(mode, *backend);
}

INSTANTIATE_TEST_SUITE_P(Modes, CudnnBackwardGraphModeTest,
                         ::testing::Values(GraphMode::kStatic, GraphMode::kDynamic,
                                           GraphMode::kDynamicPrewarmed),
                         [](const ::testing::TestParamInfo<GraphMode>& info) {
                           return GraphModeName(info.param);
                         });

// The first backward call of a shape runs our kernel while its graph is built in the
// background; once built, the same call runs cuDNN. Both against the fp64 reference.
TEST_F(CudnnBackwardGpuTest, BackgroundBuildServesTheFirstCallWithOurKernel) {
  const Case c{1000, 1000, 5, 1, 128, DType::kBF16, /*causal=*/true};
  SCOPED_TRACE(absl::StrCat("background ", CaseName(c)));
  HostCall hc;
  ASSERT_NO_FATAL_FAILURE(MakeHostCall(c, &hc));
  std::unique_ptr<CudnnBackend> backend =
      MakeCudnnBackend({.dynamic_shapes = false, .background_builds = true});
  {
    DeviceCall dc;
    ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, /*accumulate=*/false));
    const absl::Status s = backend->Backward(dc.p);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    EXPECT_EQ(backend->graph_stats().own_kernel_calls, 1);
    CheckGrads(hc, dc, 1.0);
  }
  const absl::Status waited = backend->WaitForGraphs();
  ASSERT_TRUE(waited.ok()) << waited;
  EXPECT_EQ(backend->graph_builds(), 1);
  DeviceCall dc;
  ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, /*accumulate=*/false));  // gradients poisoned again
  const absl::Status s = backend->Backward(dc.p);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(backend->graph_stats().own_kernel_calls, 1) << "the built graph was not used";
  EXPECT_EQ(backend->graph_builds(), 1) << "the call rebuilt its graph";
  CheckGrads(hc, dc, 1.0);
}

TEST(CudnnBackwardHostTest, BackgroundBuildsAreOffByDefault) {
  EXPECT_FALSE(CudnnBackendOptions().background_builds);
}

}  // namespace
}  // namespace ringattn
