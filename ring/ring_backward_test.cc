// The ring backward against the single-device fast backward on the whole sequence and against
// the fp64 reference backward, with 1 to 4 in-process ranks (8 for the error growth), every
// layout, causal and not, GQA and every option; refusals and failure release.
//
// Tolerances. Both the ring and the single-device backward read the same forward output and
// LSE and accumulate in fp32; with fp32 gradients they differ only in the order of the sums
// (dK/dV sum over ranks), so rel L2 <= 1e-5 (measured <= 3e-7). Against the exact fp64
// reference, the forward's output rounded to bf16/fp16 feeds D = rowsum(dO * O): that
// rounding, not the ring, sets the error (see kReferenceTolerance).
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/flash_cpu_backward.h"
#include "kernels/cpu/reference_backward.h"
#include "kernels/params_check.h"
#include "ring/host_ring.h"
#include "ring/ring_backward_test_util.h"
#include "ring/ring_test_util.h"
#include "ring/testing/inprocess_ranks.h"
#include "ring/testing/synthetic_inputs.h"

namespace ringattn {
namespace {

using Problem = test::HostProblem;

using test::BackwardInputs;
using test::ExpectClose;
using test::GradBuffers;
using test::Grads;
using test::KvElems;
using test::QElems;
using test::RingCase;
using test::WholeBackwardParams;
using Inputs = BackwardInputs;

// Whole-sequence inputs and dO, with the forward's results from the single-device fast forward.
Inputs MakeInputs(const Problem& pr) {
  Inputs in = test::MakeSyntheticBackwardInputs(pr);
  const absl::Status s = FlashCpuForward(test::ForwardParams(pr, &in));
  EXPECT_TRUE(s.ok()) << s;
  return in;
}

// The single-device fast backward on the whole sequence, fp32 gradients.
Grads RunSingle(const Problem& pr, const Inputs& in) {
  Grads g;
  g.dq.resize(QElems(pr));
  g.dk.resize(KvElems(pr));
  g.dv.resize(KvElems(pr));
  AttentionBackwardParams bp = WholeBackwardParams(pr, in);
  bp.dq = g.dq.data();
  bp.dk = g.dk.data();
  bp.dv = g.dv.data();
  const absl::Status s = FlashCpuBackward(bp);
  EXPECT_TRUE(s.ok()) << s;
  return g;
}

BackendFactory Backend(const char* name) {
  return [name] { return MakeBackend(name, MemorySpace::kHost); };
}

// The ring backward with `world` in-process ranks; gradients poisoned first (0xff bytes are
// NaN in every dtype), so every element must be written.
Grads RunRing(const Problem& pr, const Inputs& in, int world, Layout layout,
              const char* backend = "cpu") {
  GradBuffers grads = GradBuffers::Poisoned(pr);
  absl::StatusOr<std::vector<RingTimings>> timings = RunRingBackwardInProcess(
      test::WholeBackwardView(pr, in, &grads), world, layout, pr.options, Backend(backend));
  EXPECT_TRUE(timings.ok()) << timings.status();
  if (timings.ok()) {
    EXPECT_EQ(timings->size(), static_cast<size_t>(world));
    for (const RingTimings& rt : *timings) EXPECT_EQ(rt.steps.size(), static_cast<size_t>(world));
  }
  return grads.ToFloat(pr);
}

double ExpectCloseToSingle(const Grads& ring, const Grads& single, double tol,
                           const std::string& what) {
  return test::ExpectCloseGrads(ring, single, tol, what);
}

// ---- Every world size, layout, causal or not ------------------------------------------------

class RingBackwardMatchesSingleDevice : public ::testing::TestWithParam<RingCase> {};

TEST_P(RingBackwardMatchesSingleDevice, Fp32) {
  const auto [world, layout, causal] = GetParam();
  Problem pr;
  pr.options.causal = causal;
  const Inputs in = MakeInputs(pr);
  const Grads single = RunSingle(pr, in);
  const Grads ring = RunRing(pr, in, world, layout);
  const double e = ExpectCloseToSingle(ring, single, 1e-5, "ring vs single");
  std::printf("    ring vs single device: worst rel L2 %.2e\n", e);
}

INSTANTIATE_TEST_SUITE_P(WorldsLayouts, RingBackwardMatchesSingleDevice,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(Layout::kContiguous, Layout::kZigzag,
                                                              Layout::kStripe),
                                            ::testing::Bool()),
                         test::RingCaseName);

// ---- Every option alone and together --------------------------------------------------------

using test::OptionCase;

// Against the exact fp64 reference: fp32 is the kernels' accumulation (measured <= 4e-7);
// with bf16/fp16 the forward output feeding D is rounded to the dtype, and with bf16/fp16
// gradients they are too (measured: 8e-4 bf16 and 7e-5 fp16 with fp32 gradients, 1.7e-3
// with bf16 gradients).
double ReferenceTolerance(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 1e-5;
    case DType::kF16:
      return 2e-3;
    case DType::kBF16:
      return 1e-2;
  }
  return 0;
}

class RingBackwardOptions : public ::testing::TestWithParam<OptionCase> {};

TEST_P(RingBackwardOptions, MatchesSingleDeviceAndReference) {
  const OptionCase& c = GetParam();
  Problem pr;
  test::ApplyOptionCase(c, &pr);
  if (c.alibi) pr.options.alibi_slopes = test::HostAlibiSlopes(c.heads);
  const Inputs in = MakeInputs(pr);
  const Grads single = RunSingle(pr, in);
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStripe}) {
    ExpectCloseToSingle(RunRing(pr, in, 3, layout), single, 1e-5,
                        absl::StrCat(std::string(LayoutName(layout)), " w3 vs single"));
  }
  // And against the fp64 reference on the same (rounded) inputs.
  absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(WholeBackwardParams(pr, in));
  ASSERT_TRUE(ref.ok()) << ref.status();
  const double e = ExpectClose(RunRing(pr, in, 4, Layout::kZigzag), ref->dq, ref->dk, ref->dv,
                               ReferenceTolerance(pr.dtype), "zigzag w4 vs fp64");
  std::printf("    ring(4) vs fp64 reference: worst rel L2 %.2e\n", e);
}

INSTANTIATE_TEST_SUITE_P(Options, RingBackwardOptions, ::testing::ValuesIn(test::HostOptionCases()),
                         test::OptionCaseName);

// ---- Gradients in the input dtype, batch > 1, the reference backend ---------------------------

TEST(RingBackward, Bf16GradientsAndBatch2MatchSingleDevice) {
  Problem pr;
  pr.dtype = pr.grad_dtype = DType::kBF16;
  pr.batch = 2;
  pr.heads = 4;
  pr.heads_k = 2;
  pr.seqlen = 200;
  pr.options.causal = true;
  const Inputs in = MakeInputs(pr);
  Grads single = RunSingle(pr, in);
  // The single-device gradients rounded to bf16 as the ring rounds its fp32 accumulators:
  // both sides then differ by at most one bf16 rounding of nearly equal fp32 values.
  for (std::vector<float>* g : {&single.dq, &single.dk, &single.dv}) {
    for (float& x : *g) x = RoundThrough(x, DType::kBF16);
  }
  for (Layout layout : {Layout::kZigzag, Layout::kStripe}) {
    ExpectCloseToSingle(RunRing(pr, in, 3, layout), single, 1e-3,
                        absl::StrCat(std::string(LayoutName(layout)), " bf16 vs single"));
  }
}

TEST(RingBackward, ReferenceBackendThroughTheRing) {
  Problem pr;
  pr.heads = 2;
  pr.heads_k = 1;
  pr.seqlen = 40;
  pr.options.causal = true;
  pr.options.softcap = 10.0f;
  const Inputs in = MakeInputs(pr);
  absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(WholeBackwardParams(pr, in));
  ASSERT_TRUE(ref.ok());
  ExpectClose(RunRing(pr, in, 3, Layout::kZigzag, "cpu_reference"), ref->dq, ref->dk, ref->dv, 1e-5,
              "cpu_reference ring vs fp64");
}

// ---- Numerics: the error does not grow with the number of ranks -----------------------------

// dQ accumulates in fp32 on its rank and dK/dV in fp32 around the ring; nothing is rounded to
// bf16 before the end, so the bf16 error against fp64 stays that of one rounding.
TEST(RingBackwardNumerics, ErrorDoesNotGrowWithRanks) {
  Problem pr;
  pr.dtype = pr.grad_dtype = DType::kBF16;
  pr.seqlen = 512;
  pr.heads = 4;
  pr.heads_k = 4;
  pr.options.causal = true;
  const Inputs in = MakeInputs(pr);
  absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(WholeBackwardParams(pr, in));
  ASSERT_TRUE(ref.ok());
  std::vector<double> errs;
  for (int world : {1, 2, 4, 8}) {
    errs.push_back(ExpectClose(RunRing(pr, in, world, Layout::kZigzag), ref->dq, ref->dk, ref->dv,
                               ReferenceTolerance(pr.dtype), absl::StrCat("w", world)));
    std::printf("    bf16 ring backward, %d ranks: worst rel L2 vs fp64 %.6e\n", world,
                errs.back());
  }
  for (size_t i = 1; i < errs.size(); ++i) {
    EXPECT_LE(errs[i], errs[0] * 1.05 + 1e-6)
        << "world index " << i << " errors " << errs[0] << " -> " << errs[i];
  }
}

// ---- Refusals and failures ------------------------------------------------------------------

WholeAttentionBackward View(const Problem& pr, const Inputs& in, GradBuffers* grads) {
  *grads = GradBuffers::Poisoned(pr);
  return test::WholeBackwardView(pr, in, grads);
}

TEST(RingBackwardRefusals, DropoutAndAttnProbsAndGradDtype) {
  Problem pr;
  pr.seqlen = 16;
  const Inputs in = MakeInputs(pr);
  struct Bad {
    RingAttentionOptions options;
    DType dtype, grad_dtype;
    std::string expect;
  };
  std::vector<Bad> bad(4);
  bad[0] = {{}, DType::kF32, DType::kF32, "dropout_p must be in [0, 1)"};
  bad[0].options.dropout_p = 1.0f;
  bad[1] = {{}, DType::kF32, DType::kF32, "return_attn_probs"};
  bad[1].options.return_attn_probs = true;
  bad[2] = {{}, DType::kF32, DType::kF32, "alibi_slopes"};
  bad[2].options.alibi_slopes = {0.5f};
  bad[3] = {{}, DType::kF32, DType::kBF16, "grad_dtype"};
  for (const Bad& b : bad) {
    Problem p = pr;
    p.grad_dtype = b.grad_dtype;
    GradBuffers grads;
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<std::vector<RingTimings>> r = RunRingBackwardInProcess(
        View(p, in, &grads), 3, Layout::kContiguous, b.options, Backend("cpu"));
    ASSERT_FALSE(r.ok()) << b.expect;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find(b.expect), std::string_view::npos) << r.status();
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  }
}

// A rank that fails (here: its backend cannot be made) must not leave the others waiting for
// its blocks until their timeout.
TEST(RingBackwardFailures, OneFailingRankReleasesTheOthers) {
  Problem pr;
  pr.seqlen = 64;
  const Inputs in = MakeInputs(pr);
  std::atomic<int> made{0};
  BackendFactory flaky = [&]() -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    if (made.fetch_add(1) == 1) return absl::InternalError("planted backend failure");
    return MakeBackend("cpu");
  };
  GradBuffers grads;
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<RingTimings>> r = RunRingBackwardInProcess(
      View(pr, in, &grads), 4, Layout::kZigzag, pr.options, flaky, std::chrono::seconds(30));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("planted backend failure"), std::string_view::npos)
      << r.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

// A backend that fails mid-ring (its third call) must release the others as well.
TEST(RingBackwardFailures, AFailingKernelCallReleasesTheOthers) {
  class FailingBackend final : public AttentionBackend {
   public:
    std::string_view name() const override { return "failing"; }
    MemorySpace memory_space() const override { return MemorySpace::kHost; }
    BackendCapabilities capabilities() const override { return {.backward = true}; }

   protected:
    absl::Status DoBackward(const AttentionBackwardParams& p, const ExecutionContext&) override {
      if (++calls_ == 3) return absl::InternalError("planted kernel failure");
      return FlashCpuBackward(p);
    }
    absl::Status DoComputeDelta(const AttentionBackwardParams& p, float* delta,
                                const ExecutionContext&) override {
      return FlashCpuBackwardDelta(p, delta);
    }

   private:
    int calls_ = 0;
  };
  Problem pr;
  pr.seqlen = 64;
  const Inputs in = MakeInputs(pr);
  std::atomic<int> made{0};
  BackendFactory factory = [&]() -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    if (made.fetch_add(1) == 2) return std::make_unique<FailingBackend>();
    return MakeBackend("cpu");
  };
  GradBuffers grads;
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<RingTimings>> r = RunRingBackwardInProcess(
      View(pr, in, &grads), 4, Layout::kContiguous, pr.options, factory, std::chrono::seconds(30));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("planted kernel failure"), std::string_view::npos)
      << r.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

}  // namespace
}  // namespace ringattn
