// The device ring backward on a GPU, with "cuda" (our kernel) and, where the build has cuDNN,
// "cudnn". Every test skips without a CUDA device (gtest counts a skip as a pass), so ctest
// passes on machines without one.
//
// What is checked:
//   1. the driver's accumulator add kernel against the host, aligned and not;
//   2. the ring, W = 1 (one backward call) to 4 in-process ranks on one GPU, every layout,
//      causal and not, GQA 8:2, bf16, batch 2: every gradient against the fp64 reference
//      backward of the whole sequence, and W > 1 against W = 1;
//   3. awkward lengths (3, 7: ranks with 0 or 1 rows; 1000: uneven shards), window, ALiBi,
//      softcap (cuda only: cudnn refuses those), fp16, head dims 128 and 256, gradients in the
//      input dtype, the error not growing with W;
//   4. refusals (cudnn with softcap or ALiBi is InvalidArgument and releases every rank at
//      once), a failing rank, workspace reuse, recovery after a failed run;
//   5. NCCL with one rank (the transport the GPU worker uses) against the in-process ring.
//
// Inputs: q, k, v and dO synthetic (uniform in [-1, 1)); the forward's O and LSE from the fp64
// reference forward (O rounded to the input dtype, as a real forward stores it), so a failure
// is the backward's.
//
// Tolerances (relative L2 per gradient). Against fp64: 2e-2 bf16, 5e-3 fp16 (the backends' own
// single-call bounds: P and dS are rounded to the input dtype for the matmuls, and O for D).
// Ring against one rank, fp32 gradients: with "cuda" every P and dS element is the same in
// both (P = exp(S - lse) with the forward's global LSE, masks on global positions); only the
// order of the fp32 sums differs (dQ over key blocks, dK/dV over ranks), so 1e-3 is loose.
// "cudnn" rounds each call's dQ/dK/dV to the input dtype before adding them in fp32, so a ring
// step's partial sums are rounded separately: 1e-2.
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/cpu/reference_backward.h"
#include "kernels/cuda/gpu_test_util.h"
#include "ring/device_ring.h"
#include "ring/ring_backward_test_util.h"
#include "ring/ring_test_util.h"
#include "ring/testing/inprocess_ranks.h"
#include "ringattn_config.h"
#if RINGATTN_HAVE_NCCL
#include "ring/transport/nccl_communicator.h"
#endif

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;
using kernel_testing::DeviceBuffer;
using kernel_testing::GpuTest;
using test::BackwardInputs;
using test::GradBuffers;
using test::Grads;

constexpr const char* kCuda = "cuda";
constexpr const char* kCudnn = "cudnn";
const std::pair<int64_t, int64_t> kNoWindow = {-1, -1};
constexpr Layout kLayouts[] = {Layout::kContiguous, Layout::kZigzag, Layout::kStripe};

// ---- Problems -------------------------------------------------------------------------------

struct Problem {
  DType dtype = DType::kBF16;
  DType grad_dtype = DType::kF32;
  int batch = 1;
  int64_t seqlen = 255;
  int heads = 8;
  int heads_k = 2;
  int head_dim = 64;
  RingAttentionOptions options;
  uint64_t seed = 7;

  std::string Describe() const {
    return absl::StrCat(
        std::string(DTypeName(dtype)), " grads ", std::string(DTypeName(grad_dtype)), " b=", batch,
        " s=", seqlen, " h=", heads, " h_k=", heads_k, " d=", head_dim,
        options.causal ? " causal" : "", " window=(", options.window_size.first, ",",
        options.window_size.second, ")", options.alibi_slopes.empty() ? "" : " alibi",
        options.softcap > 0 ? absl::StrCat(" softcap=", options.softcap) : "");
  }
};

void AddAlibi(Problem* pr) {
  pr->options.alibi_slopes.clear();
  for (int h = 0; h < pr->heads; ++h) {
    pr->options.alibi_slopes.push_back(std::exp2(-8.0f * (h + 1.0f) / pr->heads));
  }
}

// Synthetic inputs and dO; out and lse from the fp64 reference forward (out rounded to dtype).
BackwardInputs MakeInputs(const Problem& pr) {
  BackwardInputs in = test::MakeSyntheticBackwardInputs(pr);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(test::ForwardParams(pr, &in));
  EXPECT_TRUE(ref.ok()) << ref.status();
  if (!ref.ok()) return in;
  for (size_t i = 0; i < ref->o.size(); ++i) {
    StoreFromFloat(in.out.data(), static_cast<int64_t>(i), pr.dtype, static_cast<float>(ref->o[i]));
  }
  for (size_t i = 0; i < ref->lse.size(); ++i) in.lse[i] = static_cast<float>(ref->lse[i]);
  return in;
}

// The exact gradients of the whole sequence (fp64, forward recomputed from q, k and v).
ReferenceBackwardResult Reference(const Problem& pr, const BackwardInputs& in) {
  absl::StatusOr<ReferenceBackwardResult> ref =
      ReferenceBackward(test::WholeBackwardParams(pr, in));
  EXPECT_TRUE(ref.ok()) << ref.status();
  return ref.ok() ? *std::move(ref) : ReferenceBackwardResult{};
}

// ---- Backends and runs ----------------------------------------------------------------------

BackendFactory Factory(const std::string& name) {
  return [name] { return MakeBackend(name); };
}

// The backends of this build: cuda, and cudnn where built.
std::vector<std::string> Backends() {
#if RINGATTN_HAVE_CUDNN
  return {kCuda, kCudnn};
#else
  return {kCuda};
#endif
}

// Per-rank timings as the driver promises them.
void CheckTimings(const std::vector<RingTimings>& timings, int world, const ShardPlan& plan) {
  ASSERT_EQ(timings.size(), static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) {
    const RingTimings& rt = timings[r];
    ASSERT_EQ(rt.steps.size(), static_cast<size_t>(world)) << "rank " << r;
    double busy = 0;
    for (int s = 0; s < world; ++s) {
      const RingStepTiming& st = rt.steps[s];
      EXPECT_EQ(st.source_rank, RingSourceRank(r, s, world)) << "rank " << r << " step " << s;
      EXPECT_TRUE(std::isfinite(st.compute_seconds) && st.compute_seconds >= 0)
          << "rank " << r << " step " << s << " compute " << st.compute_seconds;
      EXPECT_TRUE(std::isfinite(st.comm_wait_seconds) && st.comm_wait_seconds >= 0)
          << "rank " << r << " step " << s << " wait " << st.comm_wait_seconds;
      busy += st.compute_seconds + st.comm_wait_seconds;
    }
    // One rank with rows: the one backward call.
    if (world == 1 && plan.shards[0].rows > 0) {
      EXPECT_EQ(rt.steps[0].kernel_calls, 1);
    }
    // The steps follow each other on the compute stream inside the call.
    EXPECT_LE(busy, rt.total_seconds * 1.01 + 1e-4) << "rank " << r;
  }
}

// The device ring backward with `world` in-process ranks over the whole problem.
Grads RunRing(const Problem& pr, const BackwardInputs& in, int world, Layout layout,
              const std::string& backend) {
  GradBuffers grads = GradBuffers::Poisoned(pr);
  absl::StatusOr<std::vector<RingTimings>> timings =
      RunDeviceRingBackwardInProcess(test::WholeBackwardView(pr, in, &grads), world, layout,
                                     pr.options, Factory(backend), std::chrono::seconds(60));
  EXPECT_TRUE(timings.ok()) << backend << " ring of " << world << " (" << LayoutName(layout)
                            << ") on " << pr.Describe() << ": " << timings.status();
  if (timings.ok()) {
    absl::StatusOr<ShardPlan> plan = PlanShards(pr.seqlen, world, layout);
    EXPECT_TRUE(plan.ok());
    if (plan.ok()) CheckTimings(*timings, world, *plan);
  }
  return grads.ToFloat(pr);
}

// ---- Tolerances -----------------------------------------------------------------------------

double VsReference(DType dtype) { return dtype == DType::kF16 ? 5e-3 : 2e-2; }

double VsOneRank(const std::string& backend) { return backend == kCudnn ? 1e-2 : 1e-3; }

std::string RingName(const std::string& backend, int world, Layout layout) {
  return absl::StrCat(backend, " ring(", world, ", ", std::string(LayoutName(layout)), ")");
}

// Runs W = 1 once, then every W in `worlds` and layout in `layouts`: each against fp64 and,
// for W > 1, against W = 1. Prints the worst errors.
void CheckRings(const Problem& pr, const std::string& backend, const std::vector<int>& worlds,
                const std::vector<Layout>& layouts) {
  SCOPED_TRACE(pr.Describe());
  const BackwardInputs in = MakeInputs(pr);
  const ReferenceBackwardResult ref = Reference(pr, in);
  ASSERT_EQ(ref.dq.size(), static_cast<size_t>(test::QElems(pr)));
  const Grads one = RunRing(pr, in, 1, Layout::kContiguous, backend);
  double worst_ref = test::ExpectClose(one, ref.dq, ref.dk, ref.dv, VsReference(pr.dtype),
                                       RingName(backend, 1, Layout::kContiguous) + " vs fp64");
  double worst_one = 0;
  for (int world : worlds) {
    if (world == 1) continue;
    for (Layout layout : layouts) {
      const std::string name = RingName(backend, world, layout);
      const Grads ring = RunRing(pr, in, world, layout, backend);
      worst_ref = std::max(worst_ref, test::ExpectClose(ring, ref.dq, ref.dk, ref.dv,
                                                        VsReference(pr.dtype), name + " vs fp64"));
      worst_one = std::max(
          worst_one, test::ExpectCloseGrads(ring, one, VsOneRank(backend), name + " vs W = 1"));
    }
  }
  std::printf("    %s %s: worst rel L2 vs fp64 %.3e, vs one rank %.3e\n", backend.c_str(),
              pr.Describe().c_str(), worst_ref, worst_one);
}

// ---- 1. The accumulator add -----------------------------------------------------------------

class DeviceRingBackwardKernels : public GpuTest {};

TEST_F(DeviceRingBackwardKernels, AddFloatMatchesTheHost) {
  constexpr int64_t kN = 100003;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  std::vector<float> a(kN + 1), b(kN + 1);
  for (float& x : a) x = dist(rng);
  for (float& x : b) x = dist(rng);
  DeviceBuffer into((kN + 1) * sizeof(float)), from((kN + 1) * sizeof(float));
  // Offsets 0 (the vectorised path) and 1 element (misaligned: the scalar path); sizes with
  // every tail length and n = 0 (nothing).
  for (int64_t off : {0, 1}) {
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{4}, int64_t{5}, kN - 1, kN}) {
      if (off + n > kN + 1) continue;
      into.Upload(a.data());
      from.Upload(b.data());
      ASSERT_CUDA_OK(cudaDeviceSynchronize());
      float* d_into = static_cast<float*>(into.get()) + off;
      const float* d_from = static_cast<const float*>(from.get()) + off;
      const absl::Status s = LaunchAddFloat(d_into, d_from, n, nullptr);
      ASSERT_TRUE(s.ok()) << s;
      ASSERT_CUDA_OK(cudaDeviceSynchronize());
      std::vector<float> got(kN + 1);
      into.Download(got.data());
      for (int64_t i = 0; i <= kN; ++i) {
        const bool added = i >= off && i < off + n;
        const float want = added ? a[i] + b[i] : a[i];
        ASSERT_EQ(got[i], want) << "off=" << off << " n=" << n << " element " << i;
      }
    }
  }
}

// ---- 2. Every world size, layout, causal or not ---------------------------------------------

using LayoutCase = std::tuple<std::string /*backend*/, Layout, bool /*causal*/>;

class DeviceRingBackwardLayouts : public GpuTest,
                                  public ::testing::WithParamInterface<LayoutCase> {};

// bf16, batch 2, 255 positions, GQA 8:2, d 64, fp32 gradients.
TEST_P(DeviceRingBackwardLayouts, MatchesReferenceAndOneRank) {
  const auto& [backend, layout, causal] = GetParam();
  Problem pr;
  pr.batch = 2;
  pr.options.causal = causal;
  CheckRings(pr, backend, {2, 3, 4}, {layout});
}

INSTANTIATE_TEST_SUITE_P(WorldsLayouts, DeviceRingBackwardLayouts,
                         ::testing::Combine(::testing::ValuesIn(Backends()),
                                            ::testing::ValuesIn(kLayouts), ::testing::Bool()),
                         [](const ::testing::TestParamInfo<LayoutCase>& info) {
                           return absl::StrCat(std::get<0>(info.param), "_",
                                               std::string(LayoutName(std::get<1>(info.param))),
                                               std::get<2>(info.param) ? "_causal" : "_full");
                         });

// ---- 3. Awkward lengths, options, dtypes ----------------------------------------------------

using LengthCase = std::tuple<std::string /*backend*/, int64_t /*seqlen*/>;

class DeviceRingBackwardLengths : public GpuTest,
                                  public ::testing::WithParamInterface<LengthCase> {};

// 3 positions over 4 ranks leaves one rank empty (contiguous: 1, 1, 1, 0); 7 gives ranks of
// 1 and 2 rows; 1000 uneven shards. Causal, every layout, W = 2, 3, 4.
TEST_P(DeviceRingBackwardLengths, MatchesReferenceAndOneRank) {
  const auto& [backend, seqlen] = GetParam();
  Problem pr;
  pr.seqlen = seqlen;
  pr.options.causal = true;
  CheckRings(pr, backend, {2, 3, 4}, {std::begin(kLayouts), std::end(kLayouts)});
}

INSTANTIATE_TEST_SUITE_P(Lengths, DeviceRingBackwardLengths,
                         ::testing::Combine(::testing::ValuesIn(Backends()),
                                            ::testing::Values(int64_t{3}, int64_t{7},
                                                              int64_t{1000})),
                         [](const ::testing::TestParamInfo<LengthCase>& info) {
                           return absl::StrCat(std::get<0>(info.param), "_seq",
                                               std::get<1>(info.param));
                         });

using test::OptionCase;

class DeviceRingBackwardOptions : public GpuTest,
                                  public ::testing::WithParamInterface<OptionCase> {};

// Window, ALiBi, softcap, dropout (our kernel only), alone and together, fp16, other head dims:
// W = 2, 3, 4 in every layout against fp64 and against W = 1.
TEST_P(DeviceRingBackwardOptions, CudaMatchesReferenceAndOneRank) {
  const OptionCase& c = GetParam();
  Problem pr;
  test::ApplyOptionCase(c, &pr);
  if (c.alibi) AddAlibi(&pr);
  CheckRings(pr, kCuda, {2, 3, 4}, {std::begin(kLayouts), std::end(kLayouts)});
}

const DType kBf16 = DType::kBF16;
const DType kFp16 = DType::kF16;

INSTANTIATE_TEST_SUITE_P(
    Options, DeviceRingBackwardOptions,
    ::testing::Values(
        OptionCase{"window", kBf16, 4, 4, 64, 255, false, {17, 9}, false, 0},
        OptionCase{"window_causal_d128", kBf16, 4, 2, 128, 255, true, {40, -1}, false, 0},
        OptionCase{"window_zero", kBf16, 2, 2, 64, 64, false, {0, 0}, false, 0},
        OptionCase{"alibi_causal", kBf16, 4, 4, 64, 255, true, kNoWindow, true, 0},
        OptionCase{"softcap_d128", kBf16, 4, 4, 128, 255, false, kNoWindow, false, 5.0f},
        OptionCase{"mqa8to1_d128", kBf16, 8, 1, 128, 255, false, kNoWindow, false, 0},
        OptionCase{"d256_causal", kBf16, 4, 2, 256, 200, true, kNoWindow, false, 0},
        OptionCase{"all_bf16", kBf16, 8, 2, 128, 381, true, {60, -1}, true, 20.0f},
        OptionCase{"all_fp16", kFp16, 8, 2, 64, 381, false, {30, 30}, true, 20.0f},
        // Dropout: every rank drops the pairs the whole call's forward dropped (global
        // positions), so the ring's gradients equal the fp64 reference's.
        OptionCase{"dropout_causal_gqa", kBf16, 5, 1, 64, 255, true, kNoWindow, false, 0, 0.2f},
        OptionCase{"dropout_all_fp16", kFp16, 8, 2, 128, 381, true, {60, -1}, true, 20.0f,
                   0.1f},
        // Packed sequences: each rank's queries meet only their own sequence's keys.
        OptionCase{"packed_causal_gqa", kBf16, 5, 1, 64, 255, true, kNoWindow, false, 0, 0,
                   {0, 1, 8, 8, 200, 255}},
        OptionCase{"packed_all_fp16", kFp16, 8, 2, 128, 381, true, {60, -1}, true, 20.0f, 0.1f,
                   {0, 7, 300, 381}}),
    [](const ::testing::TestParamInfo<OptionCase>& info) { return info.param.name; });

class DeviceRingBackward : public GpuTest {};

// Gradients rounded to the input dtype (the service's case): once, at the end, on the device.
TEST_F(DeviceRingBackward, GradientsInTheInputDtype) {
  for (const std::string& backend : Backends()) {
    Problem pr;
    pr.grad_dtype = DType::kBF16;
    pr.batch = 2;
    pr.options.causal = true;
    const BackwardInputs in = MakeInputs(pr);
    const ReferenceBackwardResult ref = Reference(pr, in);
    const Grads one = RunRing(pr, in, 1, Layout::kZigzag, backend);
    test::ExpectClose(one, ref.dq, ref.dk, ref.dv, VsReference(pr.dtype), backend + " W=1 bf16");
    for (Layout layout : {Layout::kZigzag, Layout::kStripe}) {
      const Grads ring = RunRing(pr, in, 3, layout, backend);
      const std::string name = RingName(backend, 3, layout);
      test::ExpectClose(ring, ref.dq, ref.dk, ref.dv, VsReference(pr.dtype), name + " vs fp64");
      // Both rounded once to bf16 from nearly equal fp32 values: at most a flip of the last
      // bit here and there (2^-8 relative), on top of the fp32 differences.
      test::ExpectCloseGrads(ring, one, VsOneRank(backend) + 4e-3, name + " vs W = 1");
    }
  }
}

// dQ accumulates in fp32 on its rank and dK/dV in fp32 around the ring; nothing is rounded to
// bf16 before the end, so the bf16 error against fp64 stays that of one rounding.
TEST_F(DeviceRingBackward, ErrorDoesNotGrowWithRanks) {
  Problem pr;
  pr.grad_dtype = DType::kBF16;
  pr.seqlen = 512;
  pr.heads = 4;
  pr.heads_k = 4;
  pr.options.causal = true;
  const BackwardInputs in = MakeInputs(pr);
  const ReferenceBackwardResult ref = Reference(pr, in);
  std::vector<double> errs;
  for (int world : {1, 2, 4, 8}) {
    errs.push_back(test::ExpectClose(RunRing(pr, in, world, Layout::kZigzag, kCuda), ref.dq, ref.dk,
                                     ref.dv, VsReference(pr.dtype), absl::StrCat("w", world)));
  }
  std::printf("    bf16 device ring backward vs fp64, W = 1, 2, 4, 8: %.4g %.4g %.4g %.4g\n",
              errs[0], errs[1], errs[2], errs[3]);
  for (size_t i = 1; i < errs.size(); ++i) {
    EXPECT_LE(errs[i], errs[0] * 1.1 + 1e-5)
        << "W index " << i << ": error " << errs[0] << " at W = 1 grew to " << errs[i];
  }
}

// ---- 4. Refusals, failures, workspace reuse -------------------------------------------------

class DeviceRingBackwardFailures : public GpuTest {};

// Runs a small problem that must fail with InvalidArgument containing `expect`, promptly.
void ExpectRefused(const Problem& pr, int world, const BackendFactory& factory,
                   const std::string& expect) {
  SCOPED_TRACE(expect);
  // Values do not matter for a refusal (and the reference refuses what the ring must).
  const BackwardInputs in = test::MakeSyntheticBackwardInputs(pr);
  GradBuffers grads = GradBuffers::Poisoned(pr);
  const auto start = Clock::now();
  absl::StatusOr<std::vector<RingTimings>> r = RunDeviceRingBackwardInProcess(
      test::WholeBackwardView(pr, in, &grads), world, Layout::kZigzag, pr.options, factory,
      std::chrono::seconds(30));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_NE(r.status().message().find(expect), std::string_view::npos) << r.status();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5)) << "a refusal must not wait out peers";
}

// cuDNN cannot express softcap or ALiBi: its first backward call refuses, and every rank is
// released at once (the refusing rank aborts the group) rather than waiting for the timeout.
TEST_F(DeviceRingBackwardFailures, CudnnRefusesSoftcapAndAlibiWithoutHanging) {
#if !RINGATTN_HAVE_CUDNN
  GTEST_SKIP() << "this build has no cuDNN";
#else
  Problem pr;
  pr.seqlen = 64;
  pr.options.causal = true;
  Problem softcap = pr;
  softcap.options.softcap = 20.0f;
  ExpectRefused(softcap, 3, Factory(kCudnn), "softcap");
  ExpectRefused(softcap, 1, Factory(kCudnn), "softcap");
  Problem alibi = pr;
  AddAlibi(&alibi);
  ExpectRefused(alibi, 3, Factory(kCudnn), "alibi");
#endif
}

TEST_F(DeviceRingBackwardFailures, RefusedOptionsFailFast) {
  Problem pr;
  pr.seqlen = 16;
  for (const test::RefusedOptions& b : test::RefusedOptionCases()) {
    Problem p = pr;
    p.options = b.options;
    ExpectRefused(p, 3, Factory(kCuda), b.expect);
  }
  Problem fp16_grads = pr;
  fp16_grads.grad_dtype = DType::kF16;  // neither bf16 (the input) nor fp32
  ExpectRefused(fp16_grads, 2, Factory(kCuda), "grad_dtype");
}

TEST_F(DeviceRingBackwardFailures, RefusesAHostBackend) {
  Problem pr;
  pr.seqlen = 8;
  ExpectRefused(
      pr, 2, [] { return MakeBackend("cpu"); }, "CUDA backward backend");
}

TEST_F(DeviceRingBackwardFailures, UnsupportedHeadDim) {
  Problem pr;
  pr.head_dim = 96;
  pr.seqlen = 8;
  ExpectRefused(pr, 2, Factory(kCuda), "head_dim 96");
}

// A rank that fails (its backend cannot be made) must not leave the others waiting for its
// blocks until their timeout.
TEST_F(DeviceRingBackwardFailures, OneFailingRankReleasesTheOthers) {
  Problem pr;
  pr.seqlen = 64;
  std::atomic<int> made{0};
  BackendFactory flaky = [&]() -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    if (made.fetch_add(1) == 1) return absl::InternalError("planted backend failure");
    return MakeBackend(kCuda);
  };
  const BackwardInputs in = MakeInputs(pr);
  GradBuffers grads = GradBuffers::Poisoned(pr);
  const auto start = Clock::now();
  absl::StatusOr<std::vector<RingTimings>> r =
      RunDeviceRingBackwardInProcess(test::WholeBackwardView(pr, in, &grads), 4, Layout::kZigzag,
                                     pr.options, flaky, std::chrono::seconds(30));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("planted backend failure"), std::string_view::npos)
      << r.status();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
}

// Shards of a whole problem on the device, for DeviceInProcessRingBackward directly.
struct DeviceShards {
  std::vector<DeviceBuffer> buffers;  // per rank: q, k, v, out, dout, lse, dq, dk, dv
  std::vector<RingBackwardTensors> views;

  DeviceShards(const Problem& pr, const BackwardInputs& whole, const ShardPlan& plan) {
    const size_t es = DTypeSize(pr.dtype), gs = DTypeSize(pr.grad_dtype);
    const size_t q_row = static_cast<size_t>(pr.heads) * pr.head_dim;
    const size_t kv_row = static_cast<size_t>(pr.heads_k) * pr.head_dim;
    const int64_t lse_outer = static_cast<int64_t>(pr.batch) * pr.heads;
    for (int r = 0; r < plan.world; ++r) {
      const int64_t rows = plan.shards[r].rows;
      auto upload = [&](const void* src, int64_t outer, size_t row_bytes) {
        std::vector<std::byte> host(outer * rows * row_bytes);
        ExtractShard(plan, r, src, outer, row_bytes, host.data());
        buffers.emplace_back(host.size());
        buffers.back().Upload(host.data());
        return buffers.back().get();
      };
      auto gradient = [&](size_t row_elems) {
        buffers.emplace_back(pr.batch * rows * row_elems * gs);
        buffers.back().Poison();
        return buffers.back().get();
      };
      RingBackwardTensors t;
      t.dtype = pr.dtype;
      t.grad_dtype = pr.grad_dtype;
      t.batch = pr.batch;
      t.heads = pr.heads;
      t.heads_k = pr.heads_k;
      t.head_dim = pr.head_dim;
      t.q = upload(whole.q.data(), pr.batch, q_row * es);
      t.k = upload(whole.k.data(), pr.batch, kv_row * es);
      t.v = upload(whole.v.data(), pr.batch, kv_row * es);
      t.out = upload(whole.out.data(), pr.batch, q_row * es);
      t.dout = upload(whole.dout.data(), pr.batch, q_row * es);
      t.lse = static_cast<const float*>(upload(whole.lse.data(), lse_outer, sizeof(float)));
      t.dq = gradient(q_row);
      t.dk = gradient(kv_row);
      t.dv = gradient(kv_row);
      views.push_back(t);
    }
    // cudaMemcpy from pageable memory may return before its DMA lands, and the poisoning
    // memsets are asynchronous: the ring's non-blocking streams must not overtake them.
    const cudaError_t synced = cudaDeviceSynchronize();
    if (synced != cudaSuccess) ADD_FAILURE() << "upload: " << cudaGetErrorString(synced);
  }
  // Every rank's dq, dk, dv as fp32, concatenated in rank order (for comparing two runs).
  std::vector<float> AllGradients(const Problem& pr) const {
    std::vector<float> all;
    for (size_t i = 0; i < buffers.size(); ++i) {
      if (i % 9 < 6) continue;  // inputs
      std::vector<std::byte> bytes(buffers[i].bytes());
      buffers[i].Download(bytes.data());
      const int64_t n = static_cast<int64_t>(bytes.size() / DTypeSize(pr.grad_dtype));
      for (int64_t e = 0; e < n; ++e) all.push_back(LoadAsFloat(bytes.data(), e, pr.grad_dtype));
    }
    return all;
  }
};

// A second call of the same size allocates nothing and reproduces the first; a larger call
// grows the workspaces, a smaller one reuses them.
TEST_F(DeviceRingBackwardFailures, WorkspaceIsReusedAcrossCalls) {
  absl::StatusOr<std::unique_ptr<DeviceInProcessRingBackward>> ring =
      DeviceInProcessRingBackward::Create(3, Factory(kCuda), std::chrono::seconds(30));
  ASSERT_TRUE(ring.ok()) << ring.status();
  Problem pr;
  pr.grad_dtype = DType::kBF16;  // the workspace's dq accumulator and rounding too
  pr.options.causal = true;
  const BackwardInputs whole = MakeInputs(pr);
  absl::StatusOr<ShardPlan> plan = PlanShards(pr.seqlen, 3, Layout::kZigzag);
  ASSERT_TRUE(plan.ok());
  DeviceShards shards(pr, whole, *plan);
  absl::StatusOr<std::vector<RingTimings>> first = (*ring)->Run(*plan, shards.views, pr.options);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::vector<float> first_grads = shards.AllGradients(pr);
  const size_t bytes = (*ring)->workspace_bytes();
  EXPECT_GT(bytes, 0u);
  absl::StatusOr<std::vector<RingTimings>> second = (*ring)->Run(*plan, shards.views, pr.options);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*ring)->workspace_bytes(), bytes) << "the same call again must not grow anything";
  const std::vector<float> second_grads = shards.AllGradients(pr);
  ASSERT_EQ(second_grads.size(), first_grads.size());
  const ErrorStats again = CompareTensor(second_grads.data(), DType::kF32, first_grads.data(),
                                         static_cast<int64_t>(first_grads.size()));
  EXPECT_EQ(again.nan_count, 0);
  // Equal up to the order of the kernel's fp32 additions (if it adds atomically) and one bf16
  // rounding of nearly equal values.
  EXPECT_LE(again.rel_l2, 5e-3) << "the second call differs from the first: " << again.ToString();

  Problem bigger = pr;
  bigger.seqlen = 1000;
  const BackwardInputs whole_big = MakeInputs(bigger);
  absl::StatusOr<ShardPlan> plan_big = PlanShards(bigger.seqlen, 3, Layout::kZigzag);
  ASSERT_TRUE(plan_big.ok());
  DeviceShards shards_big(bigger, whole_big, *plan_big);
  ASSERT_TRUE((*ring)->Run(*plan_big, shards_big.views, bigger.options).ok());
  EXPECT_GT((*ring)->workspace_bytes(), bytes);
  const size_t big_bytes = (*ring)->workspace_bytes();
  ASSERT_TRUE((*ring)->Run(*plan, shards.views, pr.options).ok());
  EXPECT_EQ((*ring)->workspace_bytes(), big_bytes);
}

// A failed Run leaves the ring usable: the next Run forms a fresh group.
TEST_F(DeviceRingBackwardFailures, RingRecoversAfterAFailedRun) {
  std::atomic<bool> fail{true};
  BackendFactory once = [&]() -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    if (fail.exchange(false)) return absl::InternalError("planted first failure");
    return MakeBackend(kCuda);
  };
  absl::StatusOr<std::unique_ptr<DeviceInProcessRingBackward>> ring =
      DeviceInProcessRingBackward::Create(2, once, std::chrono::seconds(30));
  ASSERT_TRUE(ring.ok()) << ring.status();
  Problem pr;
  const BackwardInputs whole = MakeInputs(pr);
  absl::StatusOr<ShardPlan> plan = PlanShards(pr.seqlen, 2, Layout::kContiguous);
  ASSERT_TRUE(plan.ok());
  DeviceShards shards(pr, whole, *plan);
  EXPECT_FALSE((*ring)->Run(*plan, shards.views, pr.options).ok());
  absl::StatusOr<std::vector<RingTimings>> again = (*ring)->Run(*plan, shards.views, pr.options);
  EXPECT_TRUE(again.ok()) << again.status();
}

// ---- 5. NCCL with one rank ------------------------------------------------------------------

#if RINGATTN_HAVE_NCCL

class DeviceRingBackwardNccl : public GpuTest {};

// The backward through NCCL with one rank (what a one-GPU worker runs) is the in-process
// one-rank ring: the same single backward call, so the same gradients bit for bit.
TEST_F(DeviceRingBackwardNccl, OneRankEqualsInProcess) {
  absl::StatusOr<std::string> id = NcclCommunicator::GetUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  absl::StatusOr<std::unique_ptr<NcclCommunicator>> comm =
      NcclCommunicator::Create(0, 1, *id, absl::Seconds(30));
  ASSERT_TRUE(comm.ok()) << comm.status();
  Problem pr;
  pr.grad_dtype = DType::kBF16;
  pr.options.causal = true;
  AddAlibi(&pr);
  const BackwardInputs whole = MakeInputs(pr);
  const Grads in_process = RunRing(pr, whole, 1, Layout::kZigzag, kCuda);
  absl::StatusOr<ShardPlan> plan = PlanShards(pr.seqlen, 1, Layout::kZigzag);
  ASSERT_TRUE(plan.ok());
  DeviceShards shards(pr, whole, *plan);
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend(kCuda);
  ASSERT_TRUE(backend.ok());
  DeviceRingWorkspace ws;
  absl::StatusOr<RingTimings> timings =
      RingFlashAttnBackwardDevice(**comm, **backend, *plan, shards.views[0], pr.options, &ws);
  ASSERT_TRUE(timings.ok()) << timings.status();
  CheckTimings({*timings}, 1, *plan);
  const std::vector<float> nccl = shards.AllGradients(pr);
  std::vector<float> want = in_process.dq;  // one rank: shard order is sequence order
  want.insert(want.end(), in_process.dk.begin(), in_process.dk.end());
  want.insert(want.end(), in_process.dv.begin(), in_process.dv.end());
  ASSERT_EQ(nccl.size(), want.size());
  const ErrorStats e =
      CompareTensor(nccl.data(), DType::kF32, want.data(), static_cast<int64_t>(want.size()));
  EXPECT_EQ(e.nan_count, 0);
  // The same call twice; exact unless the kernel adds atomically (then within one rounding).
  EXPECT_LE(e.rel_l2, 5e-3) << e.ToString();
  EXPECT_TRUE((*comm)->CheckHealth().ok());
}

#endif  // RINGATTN_HAVE_NCCL

}  // namespace
}  // namespace ringattn
