// The ring against a single-device run of the whole sequence and against the fp64 reference,
// with 1 to 4 in-process ranks, every layout, and the options alone and together.
#include "ring/host_ring.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/params_check.h"
#include "kernels/score_mod.h"
#include "ring/ring_test_util.h"
#include "ring/testing/inprocess_ranks.h"
#include "ring/transport/inprocess.h"

namespace ringattn {
namespace {

using Problem = test::HostProblem;

using Tensors = test::RingTensors;
using test::MakeInputs;
using test::QElems;
using test::RingCase;
using test::View;

AttentionParams WholeParams(const Problem& pr, Tensors& t) {
  return test::WholeParams(pr, t.q.data(), t.k.data(), t.v.data(), t.out.data(), t.lse.data(),
                           test::HostAlibi(pr.options));
}

BackendFactory Cpu() {
  return [] { return MakeBackend("cpu"); };
}

// Runs the single-device kernel on the whole sequence.
Tensors RunSingle(const Problem& pr) {
  Tensors t = MakeInputs(pr);
  AttentionParams p = WholeParams(pr, t);
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend("cpu");
  EXPECT_TRUE(backend.ok());
  absl::Status s = (*backend)->Forward(p);
  EXPECT_TRUE(s.ok()) << s;
  return t;
}

Tensors RunRing(const Problem& pr, int world, Layout layout) {
  Tensors t = MakeInputs(pr);
  absl::StatusOr<std::vector<RingTimings>> timings =
      RunRingInProcess(View(pr, t), world, layout, pr.options, Cpu());
  EXPECT_TRUE(timings.ok()) << timings.status();
  if (timings.ok()) {
    EXPECT_EQ(timings->size(), static_cast<size_t>(world));
    for (const RingTimings& rt : *timings) EXPECT_EQ(rt.steps.size(), static_cast<size_t>(world));
  }
  return t;
}

ErrorStats OutVsSingle(const Problem& pr, const Tensors& ring, const Tensors& single) {
  std::vector<float> ref(QElems(pr));
  for (int64_t i = 0; i < QElems(pr); ++i) ref[i] = LoadAsFloat(single.out.data(), i, pr.dtype);
  return CompareTensor(ring.out.data(), pr.dtype, ref.data(), QElems(pr));
}

ErrorStats LseVsSingle(const Tensors& ring, const Tensors& single) {
  return CompareTensor(ring.lse.data(), DType::kF32, single.lse.data(),
                       static_cast<int64_t>(single.lse.size()));
}

// Relative L2 of the ring against the single-device run, per dtype: both accumulate in fp32
// and round once, so fp32 agrees to accumulation-order noise and fp16/bf16 to one rounding.
double SingleTolerance(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 1e-5;
    case DType::kF16:
      return 1e-3;
    case DType::kBF16:
      return 8e-3;
  }
  return 0;
}

class RingMatchesSingleDevice : public ::testing::TestWithParam<RingCase> {};

TEST_P(RingMatchesSingleDevice, Fp32) {
  const auto [world, layout, causal] = GetParam();
  Problem pr;
  pr.options.causal = causal;
  const Tensors single = RunSingle(pr);
  const Tensors ring = RunRing(pr, world, layout);
  const ErrorStats e = OutVsSingle(pr, ring, single);
  EXPECT_TRUE(e.Within(1e-5, 1e-5)) << e.ToString();
  const ErrorStats l = LseVsSingle(ring, single);
  EXPECT_TRUE(l.Within(1e-6, 1e-5)) << l.ToString();
}

INSTANTIATE_TEST_SUITE_P(WorldsLayouts, RingMatchesSingleDevice,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(Layout::kContiguous, Layout::kZigzag,
                                                              Layout::kStripe),
                                            ::testing::Bool()),
                         test::RingCaseName);

// Every option alone and together, through the ring with 3 ranks at an awkward length, GQA.
using test::OptionCase;

class RingOptions : public ::testing::TestWithParam<OptionCase> {};

TEST_P(RingOptions, MatchesSingleDeviceAndReference) {
  const OptionCase& c = GetParam();
  Problem pr;
  test::ApplyOptionCase(c, &pr);
  if (c.alibi) pr.options.alibi_slopes = test::HostAlibiSlopes(c.heads);
  const Tensors single = RunSingle(pr);
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStripe}) {
    const Tensors ring = RunRing(pr, 3, layout);
    const ErrorStats e = OutVsSingle(pr, ring, single);
    EXPECT_TRUE(e.Within(SingleTolerance(pr.dtype), 1.0))
        << LayoutName(layout) << " vs single: " << e.ToString();
    const ErrorStats l = LseVsSingle(ring, single);
    EXPECT_TRUE(l.Within(1e-6, 1e-4)) << LayoutName(layout) << " lse: " << l.ToString();
  }
  // And the single-device run against fp64, so the ring is anchored to an independent oracle.
  Tensors t = MakeInputs(pr);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(WholeParams(pr, t));
  ASSERT_TRUE(ref.ok()) << ref.status();
  const Tensors ring = RunRing(pr, 4, Layout::kZigzag);
  const ErrorStats r = CompareTensor(ring.out.data(), pr.dtype, ref->o.data(), QElems(pr));
  const double tol = pr.dtype == DType::kF32 ? 1e-5 : (pr.dtype == DType::kF16 ? 2e-3 : 1e-2);
  EXPECT_TRUE(r.Within(tol, 1.0)) << "ring(4) vs fp64: " << r.ToString();
  const ErrorStats rl = CompareTensor(ring.lse.data(), DType::kF32, ref->lse.data(),
                                      static_cast<int64_t>(ref->lse.size()));
  EXPECT_TRUE(rl.Within(1e-5, 1e-4)) << "ring(4) lse vs fp64: " << rl.ToString();
}

INSTANTIATE_TEST_SUITE_P(Options, RingOptions, ::testing::ValuesIn(test::HostOptionCases()),
                         test::OptionCaseName);

// The ring keeps partials in fp32, so its bf16 error against fp64 does not grow with ranks.
TEST(RingNumerics, ErrorDoesNotGrowWithRanks) {
  Problem pr;
  pr.dtype = DType::kBF16;
  pr.seqlen = 512;
  pr.heads = 4;
  pr.heads_k = 4;
  pr.options.causal = true;
  Tensors t = MakeInputs(pr);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(WholeParams(pr, t));
  ASSERT_TRUE(ref.ok());
  std::vector<double> errs;
  for (int world : {1, 2, 4, 8}) {
    const Tensors ring = RunRing(pr, world, Layout::kZigzag);
    errs.push_back(CompareTensor(ring.out.data(), pr.dtype, ref->o.data(), QElems(pr)).rel_l2);
  }
  for (size_t i = 1; i < errs.size(); ++i) {
    EXPECT_LE(errs[i], errs[0] * 1.05 + 1e-6)
        << "world index " << i << " errors " << errs[0] << " -> " << errs[i];
  }
}

// ---- Refusals and failures ------------------------------------------------------------------

// Packed sequences are refused up front, naming the option (and the kernels), for bounds that
// do not run 0..seqlen without decreasing, and for a backend that does not take them (every
// driver calls this before any transfer).
TEST(RingRefusals, PackedSequencesBadBoundsOrABackendWithout) {
  absl::StatusOr<ShardPlan> plan = PlanShards(9, 2, Layout::kZigzag);
  ASSERT_TRUE(plan.ok());
  RingAttentionOptions options;
  EXPECT_TRUE(CheckPackedSequences(options, *plan, false, "cuda").ok());
  options.seq_bounds = {0, 5, 9};
  EXPECT_TRUE(CheckPackedSequences(options, *plan, true, "cpu").ok());
  absl::Status s = CheckPackedSequences(options, *plan, false, "cuda");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("seq_bounds"), std::string::npos) << s;
  EXPECT_NE(s.message().find("'cuda'"), std::string::npos) << s;
  for (const std::vector<int64_t>& bad :
       {std::vector<int64_t>{0, 5}, std::vector<int64_t>{0, 6, 5, 9}}) {
    options.seq_bounds = bad;
    s = CheckPackedSequences(options, *plan, true, "cpu");
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("seq_bounds"), std::string::npos) << s;
  }
}

TEST(RingStepCalls, SecondRunMustStartAfterTheFirst) {
  std::vector<float> buffer(8 * 64);
  AttentionParams p;
  p.batch = p.heads = p.heads_k = 1;
  p.head_dim = 64;
  p.q = p.k = p.v = p.o = buffer.data();
  SetContiguousStrides(&p);
  p.q_pos_split = 4;
  p.q_pos_offset = 10;
  p.q_pos_offset2 = 13;  // the first run ends at 13
  p.seqlen_q = p.seqlen_k = 8;
  const absl::Status s = ValidateParams(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("q_pos_offset2"), std::string::npos) << s;
  p.q_pos_offset2 = 14;
  EXPECT_EQ(QueryPos(p, 3), 13);
  EXPECT_EQ(QueryPos(p, 4), 14);
  EXPECT_EQ(QueryPos(p, 7), 17);
  AttentionParams k = p;
  k.k_pos_split = 0;
  EXPECT_NE(ValidateParams(k).message().find("k_pos_split"), std::string::npos);
}

TEST(RingRefusals, DropoutAndAttnProbsAndAlibiSize) {
  Problem pr;
  pr.seqlen = 16;
  for (const test::RefusedOptions& b : test::RefusedOptionCases()) {
    pr.options = b.options;
    Tensors t = MakeInputs(pr);
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<std::vector<RingTimings>> r =
        RunRingInProcess(View(pr, t), 3, Layout::kContiguous, pr.options, Cpu());
    ASSERT_FALSE(r.ok()) << b.expect;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find(b.expect), std::string_view::npos) << r.status();
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  }
}

TEST(RingRefusals, UnsupportedHeadDim) {
  Problem pr;
  pr.head_dim = 96;
  pr.seqlen = 8;
  Tensors t = MakeInputs(pr);
  absl::StatusOr<std::vector<RingTimings>> r =
      RunRingInProcess(View(pr, t), 2, Layout::kContiguous, pr.options, Cpu());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("head_dim 96"), std::string_view::npos) << r.status();
}

// A rank that fails (here: its backend cannot be made) must not leave the others waiting for
// its blocks until their timeout.
TEST(RingFailures, OneFailingRankReleasesTheOthers) {
  Problem pr;
  pr.seqlen = 64;
  Tensors t = MakeInputs(pr);
  std::atomic<int> made{0};
  BackendFactory flaky = [&]() -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    if (made.fetch_add(1) == 1) return absl::InternalError("planted backend failure");
    return MakeBackend("cpu");
  };
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<RingTimings>> r = RunRingInProcess(
      View(pr, t), 4, Layout::kZigzag, pr.options, flaky, std::chrono::seconds(30));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("planted backend failure"), std::string_view::npos)
      << r.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

// An abort during a step (a cancelled request, a passed deadline) stops the kernel in hand, not
// at the step's end: with 8192 tokens a step takes seconds on two cores, yet every rank of the
// forward and the backward returns the abort's reason well within a second of it.
TEST(RingFailures, AnAbortStopsTheStepInHand) {
  const int64_t seqlen = 8192;
  const int heads = 8, head_dim = 64;
  const size_t elems = static_cast<size_t>(seqlen) * heads * head_dim;
  // Values do not matter to the time; small ones keep everything finite.
  const std::vector<float> in(elems, 0.01f);
  std::vector<float> out(elems), dq(elems), dk(elems), dv(elems);
  const std::vector<float> lse(static_cast<size_t>(seqlen) * heads, 0.0f);
  for (const bool backward : {false, true}) {
    for (const int world : {1, 2}) {
      SCOPED_TRACE(absl::StrCat(backward ? "backward" : "forward", ", world ", world));
      absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, world, Layout::kContiguous);
      ASSERT_TRUE(plan.ok());
      absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> comms =
          InProcessGroup::CreateCommunicators(world, std::chrono::seconds(60));
      ASSERT_TRUE(comms.ok());
      const RingAttentionOptions options;
      std::thread aborter([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        (*comms)[0]->Abort(absl::CancelledError("the client cancelled"));
      });
      const auto start = std::chrono::steady_clock::now();
      absl::StatusOr<std::vector<RingTimings>> r = RunRanksInThreads<Communicator>(
          *comms, [&](int rank, Communicator& comm) -> absl::StatusOr<RingTimings> {
            absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend("cpu");
            if (!backend.ok()) return backend.status();
            // Contiguous shards of one batch: rank r's rows start at its segment's start.
            const size_t at = static_cast<size_t>(plan->shards[rank].segments[0].start) * heads *
                              head_dim;
            const int64_t rows = plan->shards[rank].rows;
            RingShardSizes sizes;
            sizes.dtype = DType::kF32;
            sizes.batch = 1;
            sizes.heads = sizes.heads_k = heads;
            sizes.head_dim = head_dim;
            if (!backward) {
              RingShardTensors t;
              static_cast<RingShardSizes&>(t) = sizes;
              t.q = t.k = t.v = in.data() + at;
              t.out = out.data() + at;
              return RingFlashAttnForward(comm, **backend, *plan, t, options);
            }
            RingBackwardTensors t;
            static_cast<RingShardSizes&>(t) = sizes;
            t.q = t.k = t.v = t.out = t.dout = in.data() + at;
            t.lse = lse.data() + rank * rows;  // [1, heads, rows] per shard: any rows will do
            t.dq = dq.data() + at;
            t.dk = dk.data() + at;
            t.dv = dv.data() + at;
            return RingFlashAttnBackward(comm, **backend, *plan, t, options);
          });
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      aborter.join();
      ASSERT_FALSE(r.ok()) << "finished before the abort: make the problem larger";
      EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
      EXPECT_NE(r.status().message().find("the client cancelled"), std::string_view::npos)
          << r.status();
      EXPECT_LT(seconds, 0.3 + 1.0) << "the ring ran on after the abort";
      std::fprintf(stderr, "%s world %d: returned %.3f s after the abort\n",
                   backward ? "backward" : "forward", world, seconds - 0.3);
    }
  }
}

}  // namespace
}  // namespace ringattn
