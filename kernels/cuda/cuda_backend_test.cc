// The CUDA backends on a GPU: the fast kernel ("cuda") and the simple kernel ("cuda_reference")
// against the fp64 CPU reference at awkward sizes with every option alone and combined; the
// merge mode against one call; fully masked rows, empty calls, strided and misaligned layouts;
// the fast kernel against the simple one at a larger size; refused inputs; streams.
//
// Without a CUDA device (cudaGetDeviceCount fails or finds none) every test is skipped, which
// gtest reports as success, so ctest passes on a machine without a GPU.
//
// Outputs are poisoned before every call (cudaMemset 0xff: NaN in fp32, fp16 and bf16), so an
// element a kernel fails to write shows up as NaN, and NaN anywhere fails a comparison.
//
// Tolerances, against the fp64 reference fed the same dtype-rounded inputs:
//   fast kernel: relative L2 of o <= 1e-2 when bf16 is involved (inputs or output), <= 2e-3
//     for fp16. Its error is P rounded to the input dtype for the P.V mma (relative error up
//     to the unit roundoff u: 2^-8 in bf16, 2^-11 in fp16, per probability; the row maximum's
//     P = 1 is exact) and the output's rounding. Per element, |got - want| <= atol +
//     u(o_dtype) |want| with atol about 8 u(dtype) (3e-2 bf16, 4e-3 fp16): a few standard
//     deviations of that rounding noise for |v| up to ~5 and a row dominated by two keys, far
//     below the O(|o|) errors of a wrong index. lse (from fp32 probabilities):
//     |got - want| <= 1e-3 + 1e-5 |want|.
//   simple kernel: fp32 arithmetic throughout, so much tighter: relative L2 <= 1e-4 + u(o),
//     per element 1e-4 * max(1, softmax_scale sqrt(head_dim)) + u(o) |want|, lse 1e-4.
// A failure prints the error statistics, the first violating element and the worst one as
// (batch, row, head, column) with got and want, the first NaN and how many rows are affected.
#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/attention_backend.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/cpu/test_util.h"
#include "kernels/cuda/gpu_test_util.h"
#include "kernels/cuda/non_finite_guard.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

using kernel_testing::AttentionBuffers;
using kernel_testing::Causal;
using kernel_testing::Dropout;
using kernel_testing::Packed;
using kernel_testing::DeviceBuffer;
using kernel_testing::DeviceTensors;
using kernel_testing::ExpectEmptyRowsKeepThePartial;
using kernel_testing::ExpectNothingWrittenOutsideTheView;
using kernel_testing::FromDevice;
using kernel_testing::GatherLse;
using kernel_testing::GatherO;
using kernel_testing::GpuAvailable;
using kernel_testing::GpuTest;
using kernel_testing::KeyRange;
using kernel_testing::LsePlace;
using kernel_testing::MakeAttentionBuffers;
using kernel_testing::OPlace;
using kernel_testing::PadStrides;
using kernel_testing::Positions;
using kernel_testing::Runs;
using kernel_testing::Shape;
using kernel_testing::StridedBuffers;
using kernel_testing::ToDevice;
using kernel_testing::TypedBuffer;
using kernel_testing::UnitRoundoff;
using kernel_testing::Window;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr const char* kFast = "cuda";
constexpr const char* kSimple = "cuda_reference";

// ---- Device plumbing ------------------------------------------------------------------------

std::unique_ptr<AttentionBackend> Backend(const char* name) {
  absl::StatusOr<std::unique_ptr<AttentionBackend>> b = MakeBackend(name);
  if (!b.ok()) {
    ADD_FAILURE() << b.status();
    return nullptr;
  }
  return *std::move(b);
}

// Runs `p` (device pointers) on backend `name` and waits for it.
absl::Status RunOnDevice(const char* name, const AttentionParams& p) {
  std::unique_ptr<AttentionBackend> backend = Backend(name);
  if (backend == nullptr) return absl::InternalError("no backend");
  if (absl::Status s = backend->Forward(p); !s.ok()) return s;
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    return absl::InternalError(absl::StrCat(name, ": kernel failed: ", cudaGetErrorName(e), " (",
                                            cudaGetErrorString(e), ")"));
  }
  return absl::OkStatus();
}

// ---- Checking -------------------------------------------------------------------------------

struct Tolerance {
  double o_rel_l2;
  double o_atol;
  double o_rtol;
  double lse_atol;
  double lse_rtol;
};

// See the top of the file.
Tolerance ToleranceFor(const char* backend, const AttentionParams& p) {
  const double u_out = UnitRoundoff(p.o_dtype);
  if (std::string(backend) == kSimple) {
    const double spread =
        std::max(1.0, p.softmax_scale * std::sqrt(static_cast<double>(p.head_dim)));
    return {1e-4 + u_out, 1e-4 * spread, 1.01 * u_out, 1e-4, 1e-5};
  }
  const bool bf16 = p.dtype == DType::kBF16 || p.o_dtype == DType::kBF16;
  return {bf16 ? 1e-2 : 2e-3, p.dtype == DType::kBF16 ? 3e-2 : 4e-3, 1.01 * u_out, 1e-3, 1e-5};
}

// Compares got(i) with want[i] for i < n: every element within atol + rtol |want| (infinities
// must match exactly), no NaN, and the relative L2 error within rel_l2 (< 0: not checked).
// `place` names an index; `row_of` maps it to its query row (b, head, row) for the row count.
::testing::AssertionResult TensorMatches(const char* what, int64_t n,
                                         const std::function<double(int64_t)>& got,
                                         const std::vector<double>& want, double atol, double rtol,
                                         double rel_l2,
                                         const std::function<std::string(int64_t)>& place,
                                         const std::function<int64_t(int64_t)>& row_of) {
  ErrorAccumulator acc;
  int64_t violations = 0, first_bad = -1, first_nan = -1, worst = -1;
  double worst_err = -1.0;
  std::set<int64_t> bad_rows;
  for (int64_t i = 0; i < n; ++i) {
    const double g = got(i);
    const double w = want[i];
    acc.Add(g, w);
    bool bad;
    if (std::isnan(g)) {
      bad = true;
      if (first_nan < 0) first_nan = i;
    } else if (std::isinf(g) || std::isinf(w)) {
      bad = g != w;
    } else {
      const double e = std::abs(g - w);
      if (e > worst_err) {
        worst_err = e;
        worst = i;
      }
      bad = e > atol + rtol * std::abs(w);
    }
    if (bad) {
      if (violations++ == 0) first_bad = i;
      bad_rows.insert(row_of(i));
    }
  }
  const ErrorStats stats = acc.Finish();
  const bool l2_ok = rel_l2 < 0 || stats.rel_l2 <= rel_l2;
  if (violations == 0 && l2_ok) return ::testing::AssertionSuccess();
  ::testing::AssertionResult r = ::testing::AssertionFailure();
  r << what << ": " << stats.ToString() << " (allowed rel_l2 " << rel_l2 << ", per element " << atol
    << " + " << rtol << "|want|); " << violations << " bad elements in " << bad_rows.size()
    << " rows";
  if (first_bad >= 0) {
    r << "; first bad " << place(first_bad) << " got " << got(first_bad) << " want "
      << want[first_bad];
  }
  if (worst >= 0)
    r << "; worst " << place(worst) << " got " << got(worst) << " want " << want[worst];
  if (first_nan >= 0) r << "; first NaN at " << place(first_nan);
  return r;
}

// o and lse of `t` (laid out by p's strides) against the reference.
void ExpectMatches(const char* backend, const AttentionParams& p, const AttentionBuffers& t,
                   const ReferenceResult& ref, const Tolerance& tol) {
  const std::vector<double> o = GatherO(p, t.o);
  EXPECT_TRUE(TensorMatches(
      "o", static_cast<int64_t>(o.size()), [&](int64_t i) { return o[i]; }, ref.o, tol.o_atol,
      tol.o_rtol, tol.o_rel_l2, [&](int64_t i) { return OPlace(p, i); },
      [&](int64_t i) { return i / p.head_dim; }))
      << backend;
  if (p.lse == nullptr) return;
  const std::vector<double> lse = GatherLse(p, t.lse);
  EXPECT_TRUE(TensorMatches(
      "lse", static_cast<int64_t>(lse.size()), [&](int64_t i) { return lse[i]; }, ref.lse,
      tol.lse_atol, tol.lse_rtol, -1.0, [&](int64_t i) { return LsePlace(p, i); },
      [&](int64_t i) { return i; }))
      << backend;
}

// ---- Building cases -------------------------------------------------------------------------

AttentionParams Softcap(AttentionParams p, float cap, float sharpen = 1.0f) {
  p.softcap = cap;
  p.softmax_scale *= sharpen;
  return p;
}
AttentionParams Batch(AttentionParams p, int batch) {
  p.batch = batch;
  return p;
}

struct Case {
  std::string name;
  AttentionParams p;  // sizes and options; tensors are attached per test
  bool alibi = false;
};

uint32_t SeedOf(const std::string& name) {
  return static_cast<uint32_t>(std::hash<std::string>{}(name));
}

// ---- Sweep: both kernels against the fp64 reference -----------------------------------------

std::vector<Case> SweepCases() {
  const DType f32 = DType::kF32, f16 = DType::kF16, bf16 = DType::kBF16;
  constexpr int64_t kNone = kUnboundedWindow;
  std::vector<Case> cases = {
      // Sizes: single rows, sizes off every tile multiple, 5 heads, GQA and MQA, head dims.
      {"Seq1", Shape(1, 1, 2, 2, 64)},
      {"Seq1Q255K", Shape(1, 255, 2, 1, 128)},
      {"Seq7Heads5", Shape(7, 7, 5, 5, 64, f16, f16)},
      {"Seq255Heads5D128", Shape(255, 255, 5, 5, 128)},
      {"Gqa8to2D64F16", Shape(255, 255, 8, 2, 64, f16, f16)},
      {"Gqa8to1D128", Shape(255, 255, 8, 1, 128)},
      {"Gqa8to2D256", Shape(255, 255, 8, 2, 256)},
      {"Mqa8to1D256F16Batch2", Shape(130, 67, 8, 1, 256, f16, f16, 2)},
      {"Batch3D128", Shape(129, 200, 4, 2, 128, bf16, bf16, 3)},
      {"Seq255QSeq7K", Shape(255, 7, 2, 2, 64)},
      {"Seq7QSeq255K", Shape(7, 255, 2, 2, 256)},
      {"Seq100QSeq1000K", Shape(100, 1000, 2, 1, 64, f16, f16)},
      {"Seq1000QSeq100K", Shape(1000, 100, 2, 1, 128)},
      {"ExactTiles", Shape(256, 256, 2, 2, 128)},
      // Output dtypes.
      {"Bf16InF32Out", Shape(129, 200, 4, 4, 64, bf16, f32)},
      {"F16InF32Out", Shape(129, 200, 4, 2, 128, f16, f32)},
      {"F16InBf16Out", Shape(129, 200, 4, 2, 256, f16, bf16)},
      {"Bf16InF16Out", Shape(129, 200, 4, 2, 64, bf16, f16)},
      // fp32 inputs: the simple kernel computes them, the fast kernel refuses (checked).
      {"F32", Shape(129, 200, 4, 2, 128, f32, f32)},
      {"F32InBf16Out", Shape(77, 133, 2, 2, 64, f32, bf16), true},
      // Options alone.
      {"Causal", Causal(Shape(255, 255, 5, 5, 64))},
      {"CausalD128F16", Causal(Shape(255, 255, 4, 2, 128, f16, f16))},
      {"CausalD256", Causal(Shape(255, 255, 2, 2, 256))},
      {"CausalQShorter", Causal(Shape(100, 255, 2, 2, 64))},
      {"CausalKShorter", Causal(Shape(255, 100, 2, 2, 128))},
      {"CausalStripeOffsets", Causal(Positions(Shape(255, 255, 4, 2, 64), 1, 2, 0, 2))},
      // Two runs of positions per call (the ring's zigzag step in one call).
      {"RunsCausal", Causal(Runs(Shape(200, 180, 4, 2, 64), 100, 300, 64, 250))},
      {"RunsWindowD128", Window(Runs(Shape(200, 180, 4, 4, 128), 100, 300, 64, 250), 40, 10)},
      {"CausalOffsetsStride3", Causal(Positions(Shape(200, 150, 2, 2, 128), 37, 3, 5, 2))},
      {"CausalKeysAfterSomeQueries", Causal(Positions(Shape(300, 300, 2, 2, 64), 0, 1, 150, 1))},
      {"CausalQueriesAfterKeys", Causal(Positions(Shape(200, 300, 2, 2, 128), 1000, 1, 0, 1))},
      {"Window0x0", Window(Shape(255, 255, 2, 2, 64), 0, 0)},
      {"Window0x0D128Strides2x3", Window(Positions(Shape(200, 150, 2, 2, 128), 0, 2, 0, 3), 0, 0)},
      {"WindowLeftOnly", Window(Shape(255, 255, 2, 2, 64), 17, kNone)},
      {"WindowRightOnly", Window(Shape(255, 255, 2, 2, 128, f16, f16), kNone, 17)},
      {"Window5x3D256", Window(Shape(255, 255, 2, 2, 256), 5, 3)},
      {"WindowLiveRangeMidSequence", Window(Shape(300, 700, 2, 2, 64), 40, 40)},
      {"Alibi", Shape(255, 255, 8, 8, 64), true},
      {"AlibiD128F16", Shape(255, 255, 4, 2, 128, f16, f16), true},
      {"Softcap", Softcap(Shape(255, 255, 4, 4, 64), 5.0f, 4.0f)},
      {"SoftcapD256F16", Softcap(Shape(130, 200, 2, 2, 256, f16, f16), 20.0f, 2.0f)},
      {"Sharp", Softcap(Shape(255, 255, 4, 4, 128), 0.0f, 8.0f)},
      // Options combined.
      {"CausalWindow", Window(Causal(Shape(255, 255, 4, 2, 64)), 40, kNone)},
      {"CausalAlibiSoftcap", Softcap(Causal(Shape(255, 300, 8, 2, 128)), 20.0f), true},
      {"WindowAlibiOffsets",
       Window(Positions(Shape(150, 200, 4, 4, 64, f16, f16), 300, 2, 100, 3), 64, 32), true},
      {"AllOptionsBf16D256",
       Softcap(Window(Causal(Positions(Shape(200, 250, 8, 2, 256), 90, 3, 7, 2)), 150, 0), 30.0f),
       true},
      {"AllOptionsF16D64",
       Softcap(Window(Causal(Positions(Shape(77, 133, 5, 5, 64, f16, f16), 500, 1, 420, 1)), 60, 2),
               10.0f),
       true},
      {"AllOptionsBf16D128F32Out",
       Softcap(Window(Causal(Positions(Shape(300, 260, 8, 2, 128, bf16, f32), 0, 2, 0, 3)), 90, 4),
               25.0f),
       true},
      // Long rows: few configs at 3816 (not a tile multiple); the fp64 reference dominates.
      {"Long3816CausalGqa", Causal(Shape(3816, 3816, 2, 1, 64))},
      {"Long3816F16WindowAlibiSoftcap",
       Softcap(Window(Shape(3816, 3816, 1, 1, 128, f16, f32), 300, 100), 30.0f), true},
      // Dropout: the CPU path's mask (DropoutFactor of each pair's global positions), which
      // the fp64 reference applies too; any other mask would be far outside the tolerance.
      {"DropoutSeq1", Dropout(Shape(1, 1, 5, 5, 64), 0.3f, 11)},
      {"DropoutSeq7CausalGqa", Dropout(Causal(Shape(7, 7, 5, 1, 128, f16, f16)), 0.2f, 12)},
      {"DropoutLong3816CausalGqa", Dropout(Causal(Shape(3816, 3816, 5, 1, 64)), 0.1f, 13)},
      // Packed sequences (seq_bounds): runs of 1, 7 and 3816 positions, an empty one, GQA and
      // MQA, with masks, mods, dropout and a ring step's positions.
      {"PackedSeq1And7", Causal(Packed(Shape(8, 8, 5, 5, 64), {0, 1, 8}))},
      {"PackedEmptyAnd7Gqa", Packed(Shape(7, 7, 5, 1, 128, f16, f32), {0, 0, 7})},
      {"PackedLong3816CausalGqa",
       Causal(Packed(Shape(3816 + 7 + 1, 3816 + 7 + 1, 5, 1, 64), {0, 3816, 3823, 3824}))},
      {"PackedRingStepWindowAlibiSoftcapDropout",
       Dropout(Softcap(Window(Causal(Packed(Positions(Shape(200, 260, 8, 2, 128), 500, 1, 300, 1),
                                            {0, 350, 420, 640, 800})),
                              90, -1),
                       25.0f),
               0.1f, 15),
       true},
      {"DropoutRingStepWindowAlibiSoftcap",
       Dropout(Softcap(Window(Positions(Shape(200, 260, 8, 2, 256), 500, 1, 300, 1), 90, 4),
                       25.0f),
               0.25f, 14),
       true},
  };
  // Every pair of mask and score options on a small strided ring-step shape.
  const AttentionParams ring_step = Positions(Shape(77, 133, 4, 2, 64), 200, 3, 150, 2);
  const struct {
    const char* name;
    AttentionParams (*apply)(AttentionParams);
  } masks[] = {
      {"NoMask", [](AttentionParams p) { return p; }},
      {"Causal", [](AttentionParams p) { return Causal(p); }},
      {"Window", [](AttentionParams p) { return Window(p, 30, 20); }},
      {"CausalWindow", [](AttentionParams p) { return Window(Causal(p), 50, 10); }},
  };
  for (const auto& mask : masks) {
    for (int mods = 0; mods < 4; ++mods) {
      const bool alibi = (mods & 1) != 0;
      const bool softcap = (mods & 2) != 0;
      AttentionParams p = mask.apply(ring_step);
      if (softcap) p = Softcap(p, 8.0f, 3.0f);
      cases.push_back(
          {std::string("Combo") + mask.name + (alibi ? "Alibi" : "") + (softcap ? "Softcap" : ""),
           p, alibi});
    }
  }
  return cases;
}

class CudaVsReferenceTest : public GpuTest, public ::testing::WithParamInterface<Case> {};

// Computes the fp64 reference once and checks both kernels against it (the fast kernel takes
// fp32 inputs on fp16 copies: fp16's tolerances, ToleranceFor).
TEST_P(CudaVsReferenceTest, BothKernelsMatchFp64Reference) {
  const Case& c = GetParam();
  AttentionParams host = c.p;
  AttentionBuffers t = MakeAttentionBuffers(&host, SeedOf(c.name), c.alibi);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
  ASSERT_TRUE(ref.ok()) << ref.status();
  for (const char* backend : {kFast, kSimple}) {
    SCOPED_TRACE(backend);
    DeviceTensors d;
    const AttentionParams p = ToDevice(host, t, &d);
    const absl::Status s = RunOnDevice(backend, p);
    ASSERT_TRUE(s.ok()) << s;
    FromDevice(d, &t);
    ExpectMatches(backend, host, t, *ref, ToleranceFor(backend, host));
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, CudaVsReferenceTest, ::testing::ValuesIn(SweepCases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

// ---- The fast kernel against the simple one at a larger size ---------------------------------

class FastVsSimpleTest : public GpuTest, public ::testing::WithParamInterface<Case> {};

// Both run on the GPU; the simple kernel's fp32 result stands in for the reference (its own
// error, ~1e-5, is far below the fast kernel's tolerance).
TEST_P(FastVsSimpleTest, AgreeAtLargeSize) {
  const Case& c = GetParam();
  AttentionParams host = c.p;
  AttentionBuffers t = MakeAttentionBuffers(&host, SeedOf(c.name), c.alibi);
  AttentionBuffers simple_out = t;

  DeviceTensors d;
  const AttentionParams p = ToDevice(host, t, &d);
  ASSERT_TRUE(RunOnDevice(kSimple, p).ok());
  FromDevice(d, &simple_out);
  d.o.Poison();
  d.lse.Poison();
  ASSERT_TRUE(RunOnDevice(kFast, p).ok());
  FromDevice(d, &t);

  ReferenceResult simple;
  for (int64_t i = 0; i < simple_out.o.size(); ++i) simple.o.push_back(simple_out.o.Get(i));
  simple.lse.assign(simple_out.lse.begin(), simple_out.lse.end());
  // The simple kernel's output was rounded to o_dtype too: allow one more rounding.
  Tolerance tol = ToleranceFor(kFast, host);
  tol.o_rtol *= 2;
  ExpectMatches(kFast, host, t, simple, tol);
}

INSTANTIATE_TEST_SUITE_P(
    Large, FastVsSimpleTest,
    ::testing::Values(
        Case{"B2S2048H8D128CausalBf16",
             Causal(Shape(2048, 2048, 8, 8, 128, DType::kBF16, DType::kF32, 2))},
        Case{"B1S2048H8Gqa4D64F16", Shape(2048, 2048, 8, 2, 64, DType::kF16, DType::kF32)},
        Case{"B1S1536H4D256CausalWindowAlibi",
             Window(Causal(Shape(1536, 1536, 4, 2, 256, DType::kBF16, DType::kF32)), 700, 0),
             true}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// ---- Merge mode -----------------------------------------------------------------------------

struct MergeCase {
  std::string name;
  AttentionParams p;  // o_dtype fp32
  int64_t split;
  bool second_half_first;
  bool alibi = false;
};

class CudaMergeTest : public GpuTest, public ::testing::WithParamInterface<MergeCase> {};

// Keys in two calls, the second merging into the first's (o, lse) on the device, against one
// call over all keys and against the fp64 reference. Rows the second call adds nothing to must
// keep the first call's partial bit for bit.
TEST_P(CudaMergeTest, TwoHalvesEqualOneCall) {
  const MergeCase& c = GetParam();
  AttentionParams host = c.p;
  AttentionBuffers t = MakeAttentionBuffers(&host, SeedOf(c.name), c.alibi);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
  ASSERT_TRUE(ref.ok()) << ref.status();
  for (const char* backend : {kFast, kSimple}) {
    SCOPED_TRACE(backend);
    DeviceTensors d;
    const AttentionParams whole = ToDevice(host, t, &d);
    ASSERT_TRUE(RunOnDevice(backend, whole).ok());
    AttentionBuffers single = t;
    FromDevice(d, &single);

    d.o.Poison();
    d.lse.Poison();
    AttentionParams first = KeyRange(whole, 0, c.split);
    AttentionParams second = KeyRange(whole, c.split, whole.seqlen_k);
    if (c.second_half_first) std::swap(first, second);
    ASSERT_TRUE(RunOnDevice(backend, first).ok());
    AttentionBuffers partial = t;
    FromDevice(d, &partial);
    second.merge_into_output = true;
    const absl::Status merged = RunOnDevice(backend, second);
    ASSERT_TRUE(merged.ok()) << merged;
    FromDevice(d, &t);

    // Against one call (both fp32 outputs of the same kernel: differences are the fp32
    // arithmetic of the merge and the P rounding of each call).
    std::vector<double> single_o(single.o.size()), single_lse(single.lse.begin(), single.lse.end());
    for (int64_t i = 0; i < single.o.size(); ++i) single_o[i] = single.o.Get(i);
    ReferenceResult one_call{single_o, single_lse};
    ExpectMatches(backend, host, t, one_call, ToleranceFor(backend, host));
    // Against the fp64 reference.
    ExpectMatches(backend, host, t, *ref, ToleranceFor(backend, host));

    // Rows the second call adds nothing to keep the partial exactly.
    AttentionParams second_host = KeyRange(host, c.split, host.seqlen_k);
    if (c.second_half_first) second_host = KeyRange(host, 0, c.split);
    absl::StatusOr<ReferenceResult> second_ref = ReferenceForward(second_host);
    ASSERT_TRUE(second_ref.ok());
    const int64_t dim = host.head_dim;
    int64_t untouched_rows = 0;
    for (size_t r = 0; r < second_ref->lse.size(); ++r) {
      if (std::isfinite(second_ref->lse[r])) continue;
      ++untouched_rows;
      // lse index r = (b * heads + h) * seqlen_q + i; o row (b, i, h).
      const int64_t i = static_cast<int64_t>(r) % host.seqlen_q;
      const int64_t bh = static_cast<int64_t>(r) / host.seqlen_q;
      const int64_t b = bh / host.heads, h = bh % host.heads;
      ASSERT_EQ(std::memcmp(&t.lse[r], &partial.lse[r], sizeof(float)), 0)
          << "lse of row " << LsePlace(host, r) << " changed by a merge that adds nothing";
      const int64_t o_at = ((b * host.seqlen_q + i) * host.heads + h) * dim;
      ASSERT_EQ(
          std::memcmp(static_cast<const float*>(t.o.data()) + o_at,
                      static_cast<const float*>(partial.o.data()) + o_at, dim * sizeof(float)),
          0)
          << "o of row " << LsePlace(host, r) << " changed by a merge that adds nothing";
    }
    RecordProperty(absl::StrCat(backend, "_untouched_rows"), static_cast<int>(untouched_rows));
  }
}

// The ring's last step on the device: the first call writes a separate fp32 partial (o's
// layout) and lse, the second merges with it (read only) and writes o in o_dtype (fp32, bf16)
// and lse. Against the fp64 reference over all keys; rows the second call masks wholly get the
// partial as it is (rounded to o_dtype; bit for bit for the lse).
TEST_P(CudaMergeTest, PartialInputThenWriteMatchesReference) {
  const MergeCase& c = GetParam();
  for (const DType o_dtype : {DType::kF32, DType::kBF16}) {
    AttentionParams host = c.p;
    host.o_dtype = o_dtype;
    AttentionBuffers t = MakeAttentionBuffers(&host, SeedOf(c.name) + 1, c.alibi);
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
    ASSERT_TRUE(ref.ok()) << ref.status();
    for (const char* backend : {kFast, kSimple}) {
      SCOPED_TRACE(absl::StrCat(backend, " o ", std::string(DTypeName(o_dtype))));
      DeviceTensors d;
      const AttentionParams whole = ToDevice(host, t, &d);
      kernel_testing::DeviceBuffer partial_o(static_cast<size_t>(t.o.size()) * sizeof(float));
      kernel_testing::DeviceBuffer partial_lse(t.lse.size() * sizeof(float));
      partial_o.Poison();
      partial_lse.Poison();
      AttentionParams first = KeyRange(whole, 0, c.split);
      AttentionParams second = KeyRange(whole, c.split, whole.seqlen_k);
      if (c.second_half_first) std::swap(first, second);
      first.o = partial_o.get();
      first.o_dtype = DType::kF32;
      first.lse = static_cast<float*>(partial_lse.get());
      ASSERT_TRUE(RunOnDevice(backend, first).ok());
      second.partial_o = static_cast<const float*>(partial_o.get());
      second.partial_lse = static_cast<const float*>(partial_lse.get());
      const absl::Status written = RunOnDevice(backend, second);
      ASSERT_TRUE(written.ok()) << written;
      FromDevice(d, &t);
      ExpectMatches(backend, host, t, *ref, ToleranceFor(backend, host));

      std::vector<float> p_o(static_cast<size_t>(t.o.size())), p_lse(t.lse.size());
      partial_o.Download(p_o.data());
      partial_lse.Download(p_lse.data());
      AttentionParams second_host = KeyRange(host, c.split, host.seqlen_k);
      if (c.second_half_first) second_host = KeyRange(host, 0, c.split);
      absl::StatusOr<ReferenceResult> second_ref = ReferenceForward(second_host);
      ASSERT_TRUE(second_ref.ok());
      ExpectEmptyRowsKeepThePartial(host, second_ref->lse, t, p_o, p_lse);
    }
  }
}

std::vector<MergeCase> MergeCases() {
  const AttentionParams base = Shape(255, 255, 4, 2, 64, DType::kBF16, DType::kF32);
  const AttentionParams d128 = Shape(200, 300, 4, 2, 128, DType::kF16, DType::kF32);
  return {
      {"MidSplit", base, 100, false},
      {"MidSplitReversed", base, 100, true},
      {"TileAlignedSplitD128", d128, 128, false},
      {"EmptyFirstCall", base, 0, false},
      {"EmptySecondCall", base, 255, false},
      {"CausalSplit", Causal(base), 120, false},  // rows < 120 see nothing of the second half
      {"CausalSplitReversed", Causal(base), 120, true},  // ... and nothing of the first call
      {"WindowSplitAlibiD128", Window(d128, 20, 5), 140, true, true},
      {"StripeCausalSoftcap", Softcap(Causal(Positions(base, 1, 2, 0, 2)), 10.0f), 60, false},
      {"AllOptionsD256",
       Softcap(Window(Causal(Positions(Shape(200, 300, 8, 2, 256, DType::kBF16, DType::kF32), 250,
                                       2, 0, 2)),
                      100, 0),
               15.0f),
       170, false, true},
  };
}

INSTANTIATE_TEST_SUITE_P(Merge, CudaMergeTest, ::testing::ValuesIn(MergeCases()),
                         [](const ::testing::TestParamInfo<MergeCase>& info) {
                           return info.param.name;
                         });

class CudaBackendTest : public GpuTest {};

TEST_F(CudaBackendTest, MergeIntoEmptyPartialIgnoresItsStaleOutput) {
  // An lse of -inf marks an empty partial; whatever its o holds (here NaN) must not leak.
  for (const char* backend : {kFast, kSimple}) {
    SCOPED_TRACE(backend);
    AttentionParams host = Causal(Shape(140, 150, 2, 2, 128, DType::kBF16, DType::kF32));
    AttentionBuffers t = MakeAttentionBuffers(&host, 41);
    std::fill(t.lse.begin(), t.lse.end(), kNegInf);  // o stays NaN-poisoned
    host.merge_into_output = true;
    DeviceTensors d;
    const AttentionParams p = ToDevice(host, t, &d, /*upload_outputs=*/true);
    ASSERT_TRUE(RunOnDevice(backend, p).ok());
    FromDevice(d, &t);
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
    ASSERT_TRUE(ref.ok());
    ExpectMatches(backend, host, t, *ref, ToleranceFor(backend, host));
  }
}

// ---- Fully masked rows, empty calls ----------------------------------------------------------

TEST_F(CudaBackendTest, FullyMaskedRowsAreZeroWithNegInfLse) {
  for (const char* backend : {kFast, kSimple}) {
    SCOPED_TRACE(backend);
    // Causal with every key after every query: nothing is allowed anywhere.
    AttentionParams host = Causal(Positions(Shape(170, 90, 2, 2, 64), 0, 1, 1000, 1));
    AttentionBuffers t = MakeAttentionBuffers(&host, 11);
    DeviceTensors d;
    ASSERT_TRUE(RunOnDevice(backend, ToDevice(host, t, &d)).ok());
    FromDevice(d, &t);
    for (int64_t i = 0; i < t.o.size(); ++i) ASSERT_EQ(t.o.Get(i), 0.0f) << OPlace(host, i);
    for (size_t i = 0; i < t.lse.size(); ++i) ASSERT_EQ(t.lse[i], kNegInf) << LsePlace(host, i);
  }
}

TEST_F(CudaBackendTest, SomeRowsFullyMasked) {
  // Window (0, 0) with query positions between the keys': odd query positions see no key.
  for (const char* backend : {kFast, kSimple}) {
    SCOPED_TRACE(backend);
    AttentionParams host = Window(Positions(Shape(150, 150, 2, 2, 128), 0, 1, 0, 2), 0, 0);
    AttentionBuffers t = MakeAttentionBuffers(&host, 12);
    DeviceTensors d;
    ASSERT_TRUE(RunOnDevice(backend, ToDevice(host, t, &d)).ok());
    FromDevice(d, &t);
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
    ASSERT_TRUE(ref.ok());
    ExpectMatches(backend, host, t, *ref, ToleranceFor(backend, host));
    EXPECT_EQ(t.lse[1], kNegInf);
    EXPECT_EQ(t.o.Get(host.heads * host.head_dim), 0.0f);  // row 1, head 0, column 0
  }
}

TEST_F(CudaBackendTest, NoKeysGivesFullyMaskedRows) {
  for (const char* backend : {kFast, kSimple}) {
    SCOPED_TRACE(backend);
    AttentionParams host = Shape(33, 0, 2, 2, 128, DType::kBF16, DType::kF16);
    AttentionBuffers t = MakeAttentionBuffers(&host, 13);
    host.k = nullptr;
    host.v = nullptr;
    DeviceTensors d;
    ASSERT_TRUE(RunOnDevice(backend, ToDevice(host, t, &d)).ok());
    FromDevice(d, &t);
    for (int64_t i = 0; i < t.o.size(); ++i) ASSERT_EQ(t.o.Get(i), 0.0f) << OPlace(host, i);
    for (size_t i = 0; i < t.lse.size(); ++i) ASSERT_EQ(t.lse[i], kNegInf) << LsePlace(host, i);
  }
}

TEST_F(CudaBackendTest, NoQueriesIsANoOp) {
  for (const char* backend : {kFast, kSimple}) {
    SCOPED_TRACE(backend);
    AttentionParams host = Shape(0, 50, 2, 2, 64);
    AttentionBuffers t = MakeAttentionBuffers(&host, 14);
    host.q = nullptr;
    host.o = nullptr;
    DeviceTensors d;
    EXPECT_TRUE(RunOnDevice(backend, ToDevice(host, t, &d)).ok());
  }
}

TEST_F(CudaBackendTest, NullLseIsAllowedWithoutMerge) {
  for (const char* backend : {kFast, kSimple}) {
    SCOPED_TRACE(backend);
    AttentionParams host = Causal(Shape(65, 65, 2, 2, 64));
    AttentionBuffers t = MakeAttentionBuffers(&host, 15);
    host.lse = nullptr;
    DeviceTensors d;
    ASSERT_TRUE(RunOnDevice(backend, ToDevice(host, t, &d)).ok());
    FromDevice(d, &t);
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
    ASSERT_TRUE(ref.ok());
    ExpectMatches(backend, host, t, *ref, ToleranceFor(backend, host));
  }
}

// ---- Strided (non-contiguous) and misaligned layouts ----------------------------------------

// q/k/v/o inside buffers with padding between heads and rows (as in a packed QKV layout), strides
// multiples of 8 elements. The kernels must read through the strides and leave the padding of o
// and lse untouched (still NaN).
TEST_F(CudaBackendTest, HonoursStridesAndWritesNothingOutsideTheView) {
  for (const char* backend : {kFast, kSimple}) {
    SCOPED_TRACE(backend);
    const int heads = 4, heads_k = 2, dim = 128, batch = 2;
    const int64_t sq = 150, sk = 90, head_pad = 16, row_pad = 8;
    AttentionParams host = Causal(Positions(
        Shape(sq, sk, heads, heads_k, dim, DType::kF16, DType::kF32, batch), 40, 1, 0, 1));
    PadStrides(&host, head_pad, row_pad);
    AttentionBuffers t = StridedBuffers(&host);
    DeviceTensors d;
    ASSERT_TRUE(RunOnDevice(backend, ToDevice(host, t, &d)).ok());
    FromDevice(d, &t);
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
    ASSERT_TRUE(ref.ok());

    ExpectMatches(backend, host, t, *ref, ToleranceFor(backend, host));

    // Everything outside the view is still the NaN it was poisoned with.
    ASSERT_NO_FATAL_FAILURE(ExpectNothingWrittenOutsideTheView(host, t));
  }
}

TEST_F(CudaBackendTest, FastKernelRefusesMisalignedRowsSimpleKernelComputesThem) {
  // Head stride 68: rows start 8-byte but not 16-byte aligned.
  const int heads = 2, dim = 64;
  const int64_t s = 50;
  AttentionParams host = Shape(s, s, heads, heads, dim);
  host.q_head_stride = host.k_head_stride = host.v_head_stride = host.o_head_stride = dim + 4;
  host.q_row_stride = host.k_row_stride = host.v_row_stride = host.o_row_stride = heads * (dim + 4);
  host.q_batch_stride = host.k_batch_stride = host.v_batch_stride = host.o_batch_stride =
      s * heads * (dim + 4);
  host.lse_head_stride = s;
  host.lse_batch_stride = s * heads;
  AttentionBuffers t;
  t.q = TypedBuffer(DType::kBF16, host.q_batch_stride);
  t.k = TypedBuffer(DType::kBF16, host.k_batch_stride);
  t.v = TypedBuffer(DType::kBF16, host.v_batch_stride);
  t.o = TypedBuffer(DType::kBF16, host.o_batch_stride);
  t.lse.assign(s * heads, 0.0f);
  kernel_testing::FillRandomNormal(&t.q, 31);
  kernel_testing::FillRandomNormal(&t.k, 32);
  kernel_testing::FillRandomNormal(&t.v, 33);
  host.q = t.q.data();
  host.k = t.k.data();
  host.v = t.v.data();
  host.o = t.o.data();
  host.lse = t.lse.data();
  DeviceTensors d;
  const AttentionParams p = ToDevice(host, t, &d);
  const absl::Status fast = RunOnDevice(kFast, p);
  EXPECT_EQ(fast.code(), absl::StatusCode::kInvalidArgument) << fast;
  EXPECT_NE(fast.message().find("multiples of 8"), std::string::npos) << fast;
  ASSERT_TRUE(RunOnDevice(kSimple, p).ok());
  FromDevice(d, &t);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
  ASSERT_TRUE(ref.ok());
  ExpectMatches(kSimple, host, t, *ref, ToleranceFor(kSimple, host));  // lse is contiguous
}

// ---- Determinism, streams, refusals ---------------------------------------------------------

TEST_F(CudaBackendTest, FastKernelIsDeterministic) {
  AttentionParams host = Causal(Shape(700, 700, 4, 2, 128));
  AttentionBuffers t = MakeAttentionBuffers(&host, 51, /*with_alibi=*/true);
  AttentionBuffers again = t;
  DeviceTensors d;
  const AttentionParams p = ToDevice(host, t, &d);
  ASSERT_TRUE(RunOnDevice(kFast, p).ok());
  FromDevice(d, &t);
  d.o.Poison();
  ASSERT_TRUE(RunOnDevice(kFast, p).ok());
  FromDevice(d, &again);
  EXPECT_TRUE(t.o == again.o);
  EXPECT_EQ(std::memcmp(t.lse.data(), again.lse.data(), t.lse.size() * sizeof(float)), 0);
}

TEST_F(CudaBackendTest, RunsOnTheStreamItIsGiven) {
  cudaStream_t stream = nullptr;
  ASSERT_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (const char* name : {kFast, kSimple}) {
    SCOPED_TRACE(name);
    std::unique_ptr<AttentionBackend> backend = Backend(name);
    ASSERT_NE(backend, nullptr);
    EXPECT_EQ(backend->name(), name);
    EXPECT_EQ(backend->memory_space(), MemorySpace::kDevice);

    AttentionParams host = Causal(Shape(300, 300, 4, 2, 64, DType::kF16, DType::kF16));
    AttentionBuffers t = MakeAttentionBuffers(&host, 52);
    DeviceTensors d;
    const AttentionParams p = ToDevice(host, t, &d);
    ASSERT_TRUE(backend->Forward(p, ExecutionContext{stream}).ok());
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream));  // the stream alone carries the work
    FromDevice(d, &t);
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
    ASSERT_TRUE(ref.ok());
    ExpectMatches(name, host, t, *ref, ToleranceFor(name, host));
  }
  ASSERT_CUDA_OK(cudaStreamDestroy(stream));
}

TEST_F(CudaBackendTest, RefusesWhatItDoesNotSupport) {
  AttentionParams host = Shape(8, 8, 2, 2, 64, DType::kF32, DType::kF32);
  AttentionBuffers t = MakeAttentionBuffers(&host, 71);
  DeviceTensors d;
  const AttentionParams p = ToDevice(host, t, &d);
  for (const char* name : {kFast, kSimple}) {
    SCOPED_TRACE(name);
    std::unique_ptr<AttentionBackend> backend = Backend(name);
    ASSERT_NE(backend, nullptr);
    AttentionParams bad = p;
    bad.head_dim = 96;
    const absl::Status s = backend->Forward(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find("unsupported head_dim 96"), std::string::npos) << s;
    AttentionParams merge_f16 = p;
    merge_f16.dtype = DType::kF16;
    merge_f16.o_dtype = DType::kF16;
    merge_f16.merge_into_output = true;
    EXPECT_EQ(backend->Forward(merge_f16).code(), absl::StatusCode::kInvalidArgument);
  }
}

// fp32 inputs at awkward sizes (seq 1, 7, 3816; 5 heads; GQA and MQA) through the fast
// backend's fp16 copies, within fp16's tolerances of the fp64 reference; and inputs beyond
// fp16's range (|v| of 1e6 or 1e7, |q| and |k| of 1e4 or 1e5), which the guard sends to the
// careful kernel on the fp32 originals: then within the simple kernel's own tolerances.
TEST_F(CudaBackendTest, Fp32InputsOnTheFastBackend) {
  struct Fp32Case {
    const char* name;
    AttentionParams p;
    float big;  // > 0: one v element and one q and k row set to this size
  };
  const DType f32 = DType::kF32;
  const std::vector<Fp32Case> cases = {
      {"Seq1", Shape(1, 1, 5, 5, 64, f32, f32), 0},
      {"Seq7CausalGqa", Causal(Shape(7, 7, 5, 1, 128, f32, f32)), 0},
      {"Seq3816CausalMqa", Causal(Shape(3816, 3816, 5, 1, 64, f32, f32)), 0},
      {"Seq7BeyondFp16", Causal(Shape(7, 7, 5, 5, 64, f32, f32)), 1e6f},
      {"Seq300BeyondFp16Gqa", Shape(300, 300, 4, 2, 128, f32, f32), 1e7f},
  };
  for (const Fp32Case& c : cases) {
    SCOPED_TRACE(c.name);
    AttentionParams host = c.p;
    AttentionBuffers t = MakeAttentionBuffers(&host, SeedOf(c.name));
    if (c.big > 0) {
      t.v.Set(3 * host.v_row_stride + 5, c.big);  // row 3, head 0, element 5
      for (int e = 0; e < host.head_dim; ++e) {   // q row 2 . k row 1 = head_dim * big^2 / 1e4
        t.q.Set(2 * host.q_row_stride + e, c.big / 100);
        t.k.Set(1 * host.k_row_stride + e, c.big / 100);
      }
    }
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
    ASSERT_TRUE(ref.ok()) << ref.status();
    DeviceTensors d;
    const AttentionParams p = ToDevice(host, t, &d);
    const absl::Status s = RunOnDevice(kFast, p);
    ASSERT_TRUE(s.ok()) << s;
    FromDevice(d, &t);
    // Beyond fp16 the careful kernel's fp32 arithmetic on scores of 1e5..1e11 and outputs of
    // 1e5: relative bounds (its rel_l2 stays ~1e-6; fp16 copies would give inf or NaN).
    const Tolerance careful{1e-4, 1e-4, 1e-5, 1e-3, 1e-4};
    ExpectMatches(kFast, host, t, *ref, c.big > 0 ? careful : ToleranceFor(kFast, host));
  }
}

// ---- The non-finite guard's scan (non_finite_guard.h) ----------------------------------------

class NonFiniteScanTest : public GpuTest {
 protected:
  // The scan's decision (the careful word) for `host` over t, on q rows `q_rows` and k/v rows
  // `kv_rows` (the whole call when not given).
  uint32_t Careful(const AttentionParams& host, const AttentionBuffers& t, RowSpan q_rows = {-1},
                   RowSpan kv_rows = {-1}) {
    if (q_rows.begin < 0) q_rows = {0, host.seqlen_q};
    if (kv_rows.begin < 0) kv_rows = {0, host.seqlen_k};
    DeviceTensors d;
    const AttentionParams p = ToDevice(host, t, &d);
    DeviceBuffer scratch(kGuardWords * sizeof(uint32_t));
    EXPECT_EQ(cudaMemset(scratch.get(), 0, scratch.bytes()), cudaSuccess);
    const absl::Status s =
        LaunchNonFiniteScan(p, q_rows, kv_rows, static_cast<uint32_t*>(scratch.get()), nullptr);
    EXPECT_TRUE(s.ok()) << s;
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    uint32_t words[kGuardWords] = {};
    scratch.Download(words);
    return words[kGuardCarefulWord];
  }
};

TEST_F(NonFiniteScanTest, FiniteInputsAreClean) {
  for (const DType dtype : {DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(std::string(DTypeName(dtype)));
    // 3816 rows, 5 heads against one K/V head: no multiple of the scan's grid.
    AttentionParams host = Shape(3816, 3816, 5, 1, 64, dtype, dtype);
    AttentionBuffers t = MakeAttentionBuffers(&host, 81);
    EXPECT_EQ(Careful(host, t), 0u);
    // Large but harmless: |q.k| <= 64 * (6 x)^2 < 1e30, x = 1e12 (bf16) or 1e3 (fp16, whose
    // largest finite value is 65504).
    const float x = dtype == DType::kBF16 ? 1e12f : 1e3f;
    for (int64_t i = 0; i < t.q.size(); ++i) t.q.Set(i, t.q.Get(i) * x);
    for (int64_t i = 0; i < t.k.size(); ++i) t.k.Set(i, t.k.Get(i) * x);
    EXPECT_EQ(Careful(host, t), 0u);
  }
}

TEST_F(NonFiniteScanTest, EveryNonFiniteElementIsFound) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (const DType dtype : {DType::kBF16, DType::kF16}) {
    AttentionParams host = Shape(7, 130, 5, 1, 64, dtype, dtype);
    const AttentionBuffers clean = MakeAttentionBuffers(&host, 82);
    for (const char tensor : {'q', 'k', 'v'}) {
      for (const float value : {nan, inf, -inf}) {
        for (const bool last : {false, true}) {
          SCOPED_TRACE(absl::StrCat(std::string(DTypeName(dtype)), " ", std::string(1, tensor), " ",
                                    value, last ? " last" : " first"));
          AttentionBuffers t = clean;
          TypedBuffer* b = tensor == 'q' ? &t.q : tensor == 'k' ? &t.k : &t.v;
          b->Set(last ? b->size() - 1 : 0, value);
          EXPECT_EQ(Careful(host, t), 1u);
        }
      }
    }
  }
}

TEST_F(NonFiniteScanTest, ScoresThatMayPassTheBoundAreFound) {
  AttentionParams host = Shape(130, 130, 4, 2, 64);  // bf16
  AttentionBuffers t = MakeAttentionBuffers(&host, 83);
  auto fill = [](TypedBuffer* b, float x) {
    for (int64_t i = 0; i < b->size(); ++i) b->Set(i, x);
  };
  fill(&t.q, 1e15f);  // 64 * 1e15 * 1e15 > 1e30
  fill(&t.k, -1e15f);
  EXPECT_EQ(Careful(host, t), 1u);
  fill(&t.q, 1e12f);  // 64 * 1e12 * 1e15 = 6.4e28: within, until scaled by 1e6
  EXPECT_EQ(Careful(host, t), 0u);
  host.softmax_scale = 1e6f;
  EXPECT_EQ(Careful(host, t), 1u);

  AttentionParams alibi = Shape(130, 130, 4, 2, 64);
  AttentionBuffers a = MakeAttentionBuffers(&alibi, 84, /*with_alibi=*/true);
  EXPECT_EQ(Careful(alibi, a), 0u);
  a.alibi[3] = 1e29f;  // 1e29 * 129 > 1e30
  EXPECT_EQ(Careful(alibi, a), 1u);
  a.alibi[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(Careful(alibi, a), 1u);
}

// Padding between heads and rows, and rows outside the spans, are not the call's: NaN there
// is not found; inside the view it is.
TEST_F(NonFiniteScanTest, ReadsOnlyTheView) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  AttentionParams host = Shape(150, 90, 4, 2, 128, DType::kF16, DType::kF32, /*batch=*/2);
  PadStrides(&host, /*head_pad=*/16, /*row_pad=*/8);
  AttentionBuffers t = StridedBuffers(&host);
  EXPECT_EQ(Careful(host, t), 0u);
  t.q.Set(host.head_dim, nan);                                  // after head 0 of row 0
  t.k.Set(host.heads_k * host.k_head_stride, nan);              // after the heads of row 0
  t.v.Set(host.k_batch_stride - 1, nan);                        // the last row's padding
  EXPECT_EQ(Careful(host, t), 0u) << "padding";
  t.q.Set(host.q_batch_stride + 149 * host.q_row_stride, nan);  // batch 1, row 149
  EXPECT_EQ(Careful(host, t), 1u) << "a row of the whole view";
  EXPECT_EQ(Careful(host, t, RowSpan{0, 149}), 0u) << "a row outside the span";
  EXPECT_EQ(Careful(host, t, RowSpan{1, 149}), 1u) << "the same row inside it";
}

}  // namespace
}  // namespace ringattn
