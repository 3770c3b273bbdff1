// The fast CPU kernel against the fp64 reference, at awkward sizes and with every option alone
// and in combination; the merge mode against one call over all keys; thread-count determinism;
// refused inputs; and the two CPU backends behind AttentionBackend.
//
// Tolerances. The reference reads the same dtype-rounded inputs as the kernel, so the only
// error left is the kernel's fp32 arithmetic (dot products, exp, the running sums), plus, for
// an fp16/bf16 output, the rounding of the output itself:
//   o:   |got - want| <= kAccumAbs + u(o_dtype) * |want|  per element, and
//        rel L2 <= kAccumRelL2 + u(o_dtype)               over the tensor,
//   lse: |got - want| <= kLseAbs + kLseRel * |want|       per element (lse is always fp32),
// where u is the unit roundoff (2^-24, 2^-11, 2^-8 for fp32, fp16, bf16). Inputs are
// standard normal, so outputs (convex combinations of V rows) are O(1) and an absolute bound
// is meaningful. kAccumAbs is scaled by the typical score magnitude, softmax_scale *
// sqrt(head_dim) for unit inputs (1 by default): fp32 rounds a score relative to its size, and
// a score error d moves the output by about d * |v|. Measured on this suite: fp32 outputs have
// max abs error ~1e-6 (1.3e-5 at 8x sharpened scores) and rel L2 <= 1e-6; LSEs ~1e-6.
#include "kernels/cpu/flash_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention_backend.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/cpu/test_util.h"
#include "kernels/params_check.h"
#include "kernels/score_mod.h"

namespace ringattn {
namespace {

using kernel_testing::AttentionBuffers;
using kernel_testing::Causal;
using kernel_testing::CompareWithTolerance;
using kernel_testing::Dropout;
using kernel_testing::ExpectEmptyRowsKeepThePartial;
using kernel_testing::ForEachEmptyRow;
using kernel_testing::MakeAttentionBuffers;
using kernel_testing::Packed;
using kernel_testing::Positions;
using kernel_testing::Runs;
using kernel_testing::Sharpen;
using kernel_testing::Softcap;
using kernel_testing::ToleranceReport;
using kernel_testing::TypedBuffer;
using kernel_testing::UnitRoundoff;
using kernel_testing::Window;

constexpr double kAccumAbs = 1e-5;
constexpr double kAccumRelL2 = 1e-5;
constexpr double kLseAbs = 1e-5;
constexpr double kLseRel = 2e-6;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- Building cases -------------------------------------------------------------------------

// Sizes of one call, default scale 1/sqrt(head_dim), no options.
AttentionParams Shape(int64_t seqlen_q, int64_t seqlen_k, int heads, int heads_k, int head_dim,
                      int batch = 1) {
  AttentionParams p;
  p.batch = batch;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.heads = heads;
  p.heads_k = heads_k;
  p.head_dim = head_dim;
  p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  return p;
}
AttentionParams Dtypes(AttentionParams p, DType in, DType out) {
  p.dtype = in;
  p.o_dtype = out;
  return p;
}
struct Case {
  std::string name;
  AttentionParams p;  // sizes and options; tensors are attached per test
  bool alibi = false;
};

// ---- Checking -------------------------------------------------------------------------------

const void* OffsetElements(const void* base, DType t, int64_t elements) {
  return static_cast<const char*>(base) + elements * DTypeSize(t);
}

// The absolute fp32 error budget of an output element (see the top of the file).
double AccumAbs(const AttentionParams& p) {
  const double score_spread = p.softmax_scale * std::sqrt(static_cast<double>(p.head_dim));
  return kAccumAbs * std::max(1.0, score_spread);
}

// Expects o and lse of `t` (contiguous) to match the reference within the tolerances above,
// with every element written (no NaN poison left) and -inf LSEs exactly where expected.
void ExpectMatchesReference(const AttentionParams& p, const AttentionBuffers& t,
                            const ReferenceResult& ref) {
  const double u = UnitRoundoff(p.o_dtype);
  // 1.01: the output rounding applies to the kernel's fp32 value, itself off by kAccumAbs.
  const ToleranceReport o_err = CompareWithTolerance(
      t.o.size(), [&](int64_t i) { return t.o.Get(i); }, ref.o, 1.01 * AccumAbs(p), u);
  EXPECT_TRUE(o_err.Clean()) << "o: " << o_err.ToString();
  EXPECT_LE(o_err.stats.rel_l2, kAccumRelL2 + u) << "o: " << o_err.ToString();
  const ToleranceReport lse_err = CompareWithTolerance(
      static_cast<int64_t>(t.lse.size()), [&](int64_t i) { return t.lse[i]; }, ref.lse, kLseAbs,
      kLseRel);
  EXPECT_TRUE(lse_err.Clean()) << "lse: " << lse_err.ToString();
}

// Runs the kernel and the reference on fresh random inputs and compares them.
void RunAgainstReference(const Case& c, uint32_t seed, int num_threads = 0) {
  AttentionParams p = c.p;
  AttentionBuffers t = MakeAttentionBuffers(&p, seed, c.alibi);
  ASSERT_TRUE(FlashCpuForward(p, {.num_threads = num_threads}).ok());
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
  ASSERT_TRUE(ref.ok()) << ref.status();
  ExpectMatchesReference(p, t, *ref);
}

// ---- Sweep: awkward sizes and every option --------------------------------------------------

std::vector<Case> SweepCases() {
  const DType f32 = DType::kF32, f16 = DType::kF16, bf16 = DType::kBF16;
  std::vector<Case> cases = {
      // Sizes: single rows, sizes off every block multiple, heads and GQA ratios, head dims.
      {"Seq1", Shape(1, 1, 2, 2, 64)},
      {"Seq1Q255K", Shape(1, 255, 2, 1, 128)},
      {"Seq7Heads5", Shape(7, 7, 5, 5, 64)},
      {"Seq255Heads5", Shape(255, 255, 5, 5, 128)},
      {"Gqa8to2D64", Shape(255, 255, 8, 2, 64)},
      {"Gqa8to1D256", Shape(255, 255, 8, 1, 256)},
      {"Mqa8to1D128Batch2", Shape(130, 67, 8, 1, 128, /*batch=*/2)},
      {"Seq255QSeq7K", Shape(255, 7, 2, 2, 64)},
      {"Seq7QSeq255K", Shape(7, 255, 2, 2, 256)},
      {"Seq100QSeq1000K", Shape(100, 1000, 2, 1, 64)},
      // Dtypes: inputs rounded to the dtype; fp16/bf16 output adds its rounding.
      {"F16", Dtypes(Shape(255, 255, 5, 5, 64), f16, f16)},
      {"Bf16", Dtypes(Shape(255, 255, 8, 2, 128), bf16, bf16)},
      {"F16InF32Out", Dtypes(Shape(129, 200, 4, 2, 256), f16, f32)},
      {"Bf16InF32Out", Dtypes(Shape(129, 200, 4, 4, 64), bf16, f32)},
      {"F32InBf16Out", Dtypes(Shape(129, 200, 4, 4, 64), f32, bf16)},
      // Options alone.
      {"Causal", Causal(Shape(255, 255, 5, 5, 64))},
      {"CausalQShorter", Causal(Shape(100, 255, 2, 2, 64))},
      {"CausalStripeOffsets", Causal(Positions(Shape(255, 255, 4, 2, 64), 1, 2, 0, 2))},
      {"CausalOffsetsStride3", Causal(Positions(Shape(200, 150, 2, 2, 128), 37, 3, 5, 2))},
      {"CausalKeysAfterQueries", Causal(Positions(Shape(100, 100, 2, 2, 64), 0, 1, 50, 1))},
      {"Window0x0", Window(Shape(255, 255, 2, 2, 64), 0, 0)},
      {"Window0x0Strides2x3", Window(Positions(Shape(200, 150, 2, 2, 64), 0, 2, 0, 3), 0, 0)},
      {"WindowLeftOnly", Window(Shape(255, 255, 2, 2, 64), 17, kUnboundedWindow)},
      {"WindowRightOnly", Window(Shape(255, 255, 2, 2, 64), kUnboundedWindow, 17)},
      {"Window5x3", Window(Shape(255, 255, 2, 2, 128), 5, 3)},
      {"Alibi", Shape(255, 255, 8, 8, 64), /*alibi=*/true},
      {"Softcap", Softcap(Sharpen(Shape(255, 255, 4, 4, 64), 4.0f), 5.0f)},
      {"Sharp", Sharpen(Shape(255, 255, 4, 4, 64), 8.0f)},
      // Dropout (the mask a hash of global positions): with the mask options and two runs.
      {"DropoutCausal", Dropout(Causal(Shape(255, 255, 4, 2, 64)), 0.2f, 3)},
      {"DropoutRunsWindowD128",
       Dropout(Window(Runs(Shape(200, 180, 4, 4, 128), 100, 300, 64, 250), 40, 10), 0.5f, 8)},
      // Two runs of positions per call (the ring's zigzag step): q rows 0-99 at 0.., 100-199
      // at 300..; keys 0-63 at 0.., 64-179 at 250.. (and strided, offset variants).
      {"RunsCausal", Causal(Runs(Shape(200, 180, 4, 2, 64), 100, 300, 64, 250))},
      {"RunsWindow", Window(Runs(Shape(200, 180, 4, 4, 128), 100, 300, 64, 250), 40, 10)},
      {"RunsStridedCausalAlibiSoftcap",
       Softcap(Causal(Runs(Positions(Shape(150, 170, 8, 2, 64), 5, 2, 0, 2), 70, 400, 90, 300)),
               10.0f),
       true},
      // Options combined.
      {"CausalWindow", Window(Causal(Shape(255, 255, 4, 2, 64)), 40, kUnboundedWindow)},
      {"CausalAlibiSoftcap", Softcap(Causal(Shape(255, 300, 8, 2, 128)), 20.0f), true},
      {"WindowAlibiOffsets", Window(Positions(Shape(150, 200, 4, 4, 64), 300, 2, 100, 3), 64, 32),
       true},
      {"AllOptionsBf16",
       Dtypes(Softcap(Window(Causal(Positions(Shape(200, 250, 8, 2, 256), 90, 3, 7, 2)), 150, 0),
                      30.0f),
              bf16, bf16),
       true},
      {"AllOptionsF16",
       Dtypes(Softcap(Window(Causal(Positions(Shape(77, 133, 5, 5, 64), 500, 1, 420, 1)), 60, 2),
                      10.0f),
              f16, f16),
       true},
      // Packed variable-length sequences (an empty one, single rows, sizes off the blocks).
      {"PackedSeq1And7Heads5", Packed(Shape(8, 8, 5, 5, 64), {0, 1, 8})},
      {"PackedCausalGqa", Causal(Packed(Shape(255, 255, 8, 2, 64), {0, 1, 8, 100, 100, 255}))},
      {"PackedNoMaskD128", Packed(Shape(300, 300, 4, 4, 128), {0, 64, 65, 200, 300})},
      {"PackedWindowAlibiSoftcap",
       Softcap(Window(Packed(Shape(255, 255, 4, 2, 64), {0, 90, 91, 255}), 30, 5), 10.0f), true},
      {"PackedStridedOffsets",
       Causal(Packed(Positions(Shape(200, 150, 2, 2, 128), 37, 3, 5, 2), {0, 120, 121, 400, 700}))},
      {"PackedRunsCausal",
       Causal(Packed(Runs(Shape(200, 180, 4, 2, 64), 100, 300, 64, 250), {0, 40, 260, 310, 500}))},
      {"PackedDropoutBf16",
       Dropout(Dtypes(Causal(Packed(Shape(255, 255, 4, 4, 64), {0, 77, 255})), bf16, bf16), 0.3f,
               5)},
      {"Packed3816CausalGqa",
       Causal(Packed(Shape(3816, 3816, 5, 1, 64), {0, 1, 7, 1000, 1001, 2900, 3816}))},
      // Long: a couple of configs at 3816 (not a block multiple) to exercise long rows.
      {"Long3816Causal", Causal(Shape(3816, 3816, 2, 1, 64))},
      {"Long3816Bf16WindowAlibi",
       Dtypes(Softcap(Window(Shape(3816, 3816, 2, 2, 128), 300, 100), 30.0f), bf16, f32), true},
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
      if (softcap) p = Softcap(Sharpen(p, 3.0f), 8.0f);
      cases.push_back(
          {std::string("Combo") + mask.name + (alibi ? "Alibi" : "") + (softcap ? "Softcap" : ""),
           p, alibi});
    }
  }
  return cases;
}

class FlashVsReferenceTest : public ::testing::TestWithParam<Case> {};

// A fixed seed per case, from its name (FNV-1a: the same on every platform, unlike std::hash).
uint32_t SeedFromName(const std::string& name) {
  uint32_t h = 2166136261u;
  for (const char c : name) h = (h ^ static_cast<uint8_t>(c)) * 16777619u;
  return h;
}

TEST_P(FlashVsReferenceTest, MatchesReference) {
  RunAgainstReference(GetParam(), SeedFromName(GetParam().name));
}

INSTANTIATE_TEST_SUITE_P(Sweep, FlashVsReferenceTest, ::testing::ValuesIn(SweepCases()),
                         [](const ::testing::TestParamInfo<Case>& param_info) {
                           return param_info.param.name;
                         });

// ---- Packed variable-length sequences -------------------------------------------------------

// The fp64 reference over a packed call equals the reference over each sequence alone (its rows
// and keys, its own positions, no seq_bounds): the packing only separates sequences. Checks the
// reference's sequence mask by a route that does not use it; the kernels are checked against
// the reference in the sweep above.
TEST(PackedSequencesTest, ReferenceEqualsEachSequenceAlone) {
  const std::vector<int64_t> bounds = {0, 1, 8, 8, 130, 255};
  for (AttentionParams shape :
       {Causal(Shape(255, 255, 5, 1, 64)), Window(Shape(255, 255, 4, 2, 64), 20, 3),
        Shape(255, 255, 2, 2, 128)}) {
    AttentionParams packed = Packed(shape, bounds);
    AttentionBuffers t = MakeAttentionBuffers(&packed, 61, /*with_alibi=*/true);
    absl::StatusOr<ReferenceResult> whole = ReferenceForward(packed);
    ASSERT_TRUE(whole.ok()) << whole.status();
    const int64_t d = packed.head_dim;
    for (size_t i = 0; i + 1 < bounds.size(); ++i) {
      const int64_t start = bounds[i], len = bounds[i + 1] - bounds[i];
      if (len == 0) continue;
      AttentionParams alone = packed;  // the same tensors, strides and options
      alone.seq_bounds = nullptr;
      alone.num_seqs = 0;
      alone.seqlen_q = alone.seqlen_k = len;
      alone.q = OffsetElements(packed.q, packed.dtype, start * packed.q_row_stride);
      alone.k = OffsetElements(packed.k, packed.dtype, start * packed.k_row_stride);
      alone.v = OffsetElements(packed.v, packed.dtype, start * packed.v_row_stride);
      alone.q_pos_offset = alone.k_pos_offset = start;
      absl::StatusOr<ReferenceResult> part = ReferenceForward(alone);
      ASSERT_TRUE(part.ok()) << part.status();
      for (int64_t r = 0; r < len; ++r) {
        for (int h = 0; h < packed.heads; ++h) {
          // o [1, rows, heads, d]; lse [1, heads, rows].
          for (int64_t e = 0; e < d; ++e) {
            ASSERT_EQ(whole->o[((start + r) * packed.heads + h) * d + e],
                      part->o[(r * packed.heads + h) * d + e])
                << "sequence " << i << " row " << r << " head " << h;
          }
          ASSERT_EQ(whole->lse[h * packed.seqlen_q + start + r], part->lse[h * len + r])
              << "lse of sequence " << i << " row " << r << " head " << h;
        }
      }
    }
  }
}

TEST(PackedSequencesTest, BadBoundsAreRefusedNamingThem) {
  AttentionParams p = Shape(10, 10, 1, 1, 64);
  AttentionBuffers t = MakeAttentionBuffers(&p, 3);
  const struct {
    AttentionParams p;
    const char* needle;
  } cases[] = {
      {Packed(p, {0, 6, 4, 10}), "non-decreasing"},
      {Packed(p, {0, 5, 9}), "cover every query position"},
      {Packed(p, {1, 10}), "cover every query position"},
      {Packed(p, {0}), "num_seqs must be >= 1"},
      {[&] {
         AttentionParams q = p;
         q.num_seqs = 2;
         return q;
       }(),
       "seq_bounds is null"},
  };
  for (const auto& c : cases) {
    const absl::Status s = FlashCpuForward(c.p);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(c.needle), std::string::npos) << s;
  }
  EXPECT_TRUE(FlashCpuForward(Packed(p, {0, 0, 10, 10})).ok());  // empty sequences are fine
}

// ---- Fully masked rows and empty calls ------------------------------------------------------

// The dropout mask: the kept share is 1 - p within 4 standard deviations over 10^6 pairs, a
// kept probability is scaled by 1 / (1 - p), the mask depends on the seed, and p = 0 keeps all.
TEST(DropoutFactorTest, RateScaleSeedAndDeterminism) {
  AttentionParams p;
  p.dropout_p = 0.3f;
  p.dropout_seed = 42;
  int64_t kept = 0, same_as_other_seed = 0;
  const int64_t n = 1000 * 1000;
  AttentionParams other = p;
  other.dropout_seed = 43;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t q = i / 1000, k = i % 1000;
    const float f = DropoutFactor(p, 1, 3, q, k);
    ASSERT_TRUE(f == 0.0f || f == 1.0f / 0.7f) << f;
    ASSERT_EQ(f, DropoutFactor(p, 1, 3, q, k));  // a pure function of its arguments
    kept += f != 0.0f;
    same_as_other_seed += f == DropoutFactor(other, 1, 3, q, k);
  }
  const double share = static_cast<double>(kept) / n;
  const double sigma = std::sqrt(0.7 * 0.3 / n);
  EXPECT_NEAR(share, 0.7, 4 * sigma);
  // Two seeds agree where both keep or both drop: 0.7^2 + 0.3^2 = 0.58 of pairs.
  EXPECT_NEAR(static_cast<double>(same_as_other_seed) / n, 0.58, 0.01);
  p.dropout_p = 0.0f;
  EXPECT_EQ(DropoutFactor(p, 0, 0, 5, 9), 1.0f);
}

TEST(FlashCpuTest, FullyMaskedRowsAreZeroWithNegInfLse) {
  // Causal with every key after every query: nothing is allowed anywhere.
  AttentionParams p = Causal(Positions(Shape(70, 90, 2, 2, 64), 0, 1, 1000, 1));
  AttentionBuffers t = MakeAttentionBuffers(&p, 11);
  ASSERT_TRUE(FlashCpuForward(p).ok());
  for (int64_t i = 0; i < t.o.size(); ++i) ASSERT_EQ(t.o.Get(i), 0.0f) << i;
  for (float lse : t.lse) ASSERT_EQ(lse, kNegInf);
}

TEST(FlashCpuTest, NoKeysGivesFullyMaskedRows) {
  AttentionParams p = Dtypes(Shape(33, 0, 2, 2, 128), DType::kBF16, DType::kF16);
  AttentionBuffers t = MakeAttentionBuffers(&p, 12);
  p.k = nullptr;
  p.v = nullptr;
  ASSERT_TRUE(FlashCpuForward(p).ok());
  for (int64_t i = 0; i < t.o.size(); ++i) ASSERT_EQ(t.o.Get(i), 0.0f) << i;
  for (float lse : t.lse) ASSERT_EQ(lse, kNegInf);
}

TEST(FlashCpuTest, NoQueriesIsANoOp) {
  AttentionParams p = Shape(0, 50, 2, 2, 64);
  AttentionBuffers t = MakeAttentionBuffers(&p, 13);
  p.q = nullptr;
  p.o = nullptr;
  EXPECT_TRUE(FlashCpuForward(p).ok());
}

TEST(FlashCpuTest, NullLseIsAllowedWithoutMerge) {
  AttentionParams p = Causal(Shape(65, 65, 2, 2, 64));
  AttentionBuffers t = MakeAttentionBuffers(&p, 14);
  p.lse = nullptr;
  ASSERT_TRUE(FlashCpuForward(p).ok());
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
  ASSERT_TRUE(ref.ok());
  const ToleranceReport e = CompareWithTolerance(
      t.o.size(), [&](int64_t i) { return t.o.Get(i); }, ref->o, kAccumAbs, 0.0);
  EXPECT_TRUE(e.Clean()) << e.ToString();
}

// ---- Strided (non-contiguous) tensors -------------------------------------------------------

TEST(FlashCpuTest, HonoursStridesAndWritesNothingOutsideTheView) {
  // q/k/v/o live in buffers with padding between heads and rows, as in a packed QKV layout;
  // the kernel must read through the strides and leave the padding of o untouched (NaN).
  const int heads = 4, heads_k = 2, dim = 64;
  const int64_t sq = 70, sk = 90;
  const int64_t head_pad = 16, row_pad = 8;
  AttentionParams p = Causal(Positions(Shape(sq, sk, heads, heads_k, dim), 40, 1, 0, 1));
  p.dtype = DType::kF16;
  p.q_head_stride = p.o_head_stride = dim + head_pad;
  p.q_row_stride = p.o_row_stride = heads * p.q_head_stride + row_pad;
  p.q_batch_stride = p.o_batch_stride = sq * p.q_row_stride;
  p.k_head_stride = p.v_head_stride = dim + head_pad;
  p.k_row_stride = p.v_row_stride = heads_k * p.k_head_stride + row_pad;
  p.k_batch_stride = p.v_batch_stride = sk * p.k_row_stride;
  p.lse_head_stride = sq + 3;
  p.lse_batch_stride = heads * p.lse_head_stride;

  TypedBuffer q(DType::kF16, p.q_batch_stride), k(DType::kF16, p.k_batch_stride),
      v(DType::kF16, p.v_batch_stride), o(DType::kF32, p.o_batch_stride);
  kernel_testing::FillRandomNormal(&q, 21);
  kernel_testing::FillRandomNormal(&k, 22);
  kernel_testing::FillRandomNormal(&v, 23);
  o.FillWithNan();
  std::vector<float> lse(p.lse_batch_stride, std::numeric_limits<float>::quiet_NaN());
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.o = o.data();
  p.lse = lse.data();
  ASSERT_TRUE(FlashCpuForward(p).ok());
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
  ASSERT_TRUE(ref.ok());

  std::vector<bool> in_view(o.size(), false);
  std::vector<double> got, want;
  for (int64_t i = 0; i < sq; ++i) {
    for (int h = 0; h < heads; ++h) {
      for (int d = 0; d < dim; ++d) {
        const int64_t at = i * p.o_row_stride + h * p.o_head_stride + d;
        in_view[at] = true;
        got.push_back(o.Get(at));
        want.push_back(ref->o[(i * heads + h) * dim + d]);
      }
    }
  }
  const ToleranceReport e = CompareWithTolerance(
      static_cast<int64_t>(got.size()), [&](int64_t i) { return got[i]; }, want, kAccumAbs, 0.0);
  EXPECT_TRUE(e.Clean()) << e.ToString();
  for (int64_t at = 0; at < o.size(); ++at) {
    if (!in_view[at]) {
      ASSERT_TRUE(std::isnan(o.Get(at))) << "padding written at " << at;
    }
  }
  for (int h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < sq; ++i) {
      EXPECT_NEAR(lse[h * p.lse_head_stride + i], ref->lse[h * sq + i], kLseAbs * 10);
    }
    for (int64_t i = sq; i < p.lse_head_stride; ++i) {
      ASSERT_TRUE(std::isnan(lse[h * p.lse_head_stride + i])) << "lse padding written";
    }
  }
}

// ---- Merge mode -----------------------------------------------------------------------------

// Points `part` at keys [begin, end) of `whole`: the K/V pointers move down the rows and the
// key positions keep their global values.
AttentionParams KeyRange(const AttentionParams& whole, int64_t begin, int64_t end) {
  AttentionParams part = whole;
  part.seqlen_k = end - begin;
  part.k = OffsetElements(whole.k, whole.dtype, begin * whole.k_row_stride);
  part.v = OffsetElements(whole.v, whole.dtype, begin * whole.v_row_stride);
  part.k_pos_offset = whole.k_pos_offset + begin * whole.k_pos_stride;
  return part;
}

struct MergeCase {
  std::string name;
  AttentionParams p;
  int64_t split;
  bool second_half_first;
  bool alibi = false;
};

class FlashMergeTest : public ::testing::TestWithParam<MergeCase> {};

// Computes the keys in two calls, the second merging into the first's (o, lse), and compares
// with one call over all keys and with the reference. Rows whose second call is fully masked
// must keep the first call's partial bit for bit.
TEST_P(FlashMergeTest, TwoHalvesEqualOneCall) {
  const MergeCase& c = GetParam();
  AttentionParams whole = c.p;
  AttentionBuffers t = MakeAttentionBuffers(&whole, 31, c.alibi);
  ASSERT_TRUE(FlashCpuForward(whole).ok());
  const std::vector<float> single_o(static_cast<const float*>(whole.o),
                                    static_cast<const float*>(whole.o) + t.o.size());
  const std::vector<float> single_lse = t.lse;
  t.o.FillWithNan();
  std::fill(t.lse.begin(), t.lse.end(), std::numeric_limits<float>::quiet_NaN());

  AttentionParams first = KeyRange(whole, 0, c.split);
  AttentionParams second = KeyRange(whole, c.split, whole.seqlen_k);
  if (c.second_half_first) std::swap(first, second);
  ASSERT_TRUE(FlashCpuForward(first).ok());
  const std::vector<float> partial_o(static_cast<const float*>(whole.o),
                                     static_cast<const float*>(whole.o) + t.o.size());
  const std::vector<float> partial_lse = t.lse;
  second.merge_into_output = true;
  ASSERT_TRUE(FlashCpuForward(second).ok());

  // Against one call over all keys (both fp32, so the fp32 tolerance applies on each side).
  std::vector<double> single_o_d(single_o.begin(), single_o.end());
  std::vector<double> single_lse_d(single_lse.begin(), single_lse.end());
  const ToleranceReport o_err = CompareWithTolerance(
      t.o.size(), [&](int64_t i) { return t.o.Get(i); }, single_o_d, 2 * kAccumAbs, 0.0);
  EXPECT_TRUE(o_err.Clean()) << "o vs single call: " << o_err.ToString();
  EXPECT_LE(o_err.stats.rel_l2, 2 * kAccumRelL2) << o_err.ToString();
  const ToleranceReport lse_err = CompareWithTolerance(
      static_cast<int64_t>(t.lse.size()), [&](int64_t i) { return t.lse[i]; }, single_lse_d,
      2 * kLseAbs, 2 * kLseRel);
  EXPECT_TRUE(lse_err.Clean()) << "lse vs single call: " << lse_err.ToString();

  // Against the reference.
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(whole);
  ASSERT_TRUE(ref.ok());
  ExpectMatchesReference(whole, t, *ref);

  // Rows the second call adds nothing to keep the first call's partial exactly.
  absl::StatusOr<ReferenceResult> second_ref = ReferenceForward(second);
  ASSERT_TRUE(second_ref.ok());
  const int64_t dim = whole.head_dim;
  ForEachEmptyRow(whole, second_ref->lse, [&](size_t r, int64_t o_at) {
    EXPECT_EQ(std::memcmp(&t.lse[r], &partial_lse[r], sizeof(float)), 0) << "row " << r;
    EXPECT_EQ(std::memcmp(static_cast<const float*>(whole.o) + o_at, &partial_o[o_at],
                          dim * sizeof(float)),
              0)
        << "row " << r;
  });
}

// The ring's last step: the first call's result is a read-only fp32 partial (separate
// buffers), the second call merges with it and writes o in o_dtype (fp32 and bf16) and lse.
// Compared with the fp64 reference over all keys; rows the second call masks wholly get the
// partial as it is (rounded to o_dtype; bit for bit in fp32 and for the lse).
TEST_P(FlashMergeTest, PartialInputThenWriteMatchesReference) {
  const MergeCase& c = GetParam();
  for (const DType o_dtype : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(o_dtype));
    AttentionParams whole = c.p;
    whole.o_dtype = o_dtype;
    AttentionBuffers t = MakeAttentionBuffers(&whole, 37, c.alibi);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> partial_o(static_cast<size_t>(t.o.size()), nan);  // o's layout, fp32
    std::vector<float> partial_lse(t.lse.size(), nan);
    AttentionParams first = KeyRange(whole, 0, c.split);
    AttentionParams second = KeyRange(whole, c.split, whole.seqlen_k);
    if (c.second_half_first) std::swap(first, second);
    first.o = partial_o.data();
    first.o_dtype = DType::kF32;
    first.lse = partial_lse.data();
    ASSERT_TRUE(FlashCpuForward(first).ok());
    second.partial_o = partial_o.data();
    second.partial_lse = partial_lse.data();
    ASSERT_TRUE(FlashCpuForward(second).ok());

    absl::StatusOr<ReferenceResult> ref = ReferenceForward(whole);
    ASSERT_TRUE(ref.ok());
    ExpectMatchesReference(whole, t, *ref);

    absl::StatusOr<ReferenceResult> second_ref = ReferenceForward(second);
    ASSERT_TRUE(second_ref.ok());
    ExpectEmptyRowsKeepThePartial(whole, second_ref->lse, t, partial_o, partial_lse);
  }
}

std::vector<MergeCase> MergeCases() {
  const AttentionParams base = Shape(255, 255, 4, 2, 64);
  return {
      {"MidSplit", base, 100, false},
      {"MidSplitReversed", base, 100, true},
      {"BlockAlignedSplit", Shape(130, 256, 2, 1, 128), 128, false},
      {"EmptyFirstCall", base, 0, false},
      {"EmptySecondCall", base, 255, false},
      {"CausalSplit", Causal(base), 120, false},  // rows < 120 see nothing of the second half
      {"CausalSplitReversed", Causal(base), 120, true},
      {"WindowSplitAlibi", Window(base, 20, 5), 140, true, true},
      {"StripeCausalSoftcap", Softcap(Causal(Positions(base, 1, 2, 0, 2)), 10.0f), 60, false},
      {"Bf16InputsAllOptions",
       Dtypes(Softcap(Window(Causal(Positions(Shape(200, 300, 8, 2, 256), 250, 2, 0, 2)), 100, 0),
                      15.0f),
              DType::kBF16, DType::kF32),
       170, false, true},
  };
}

INSTANTIATE_TEST_SUITE_P(Merge, FlashMergeTest, ::testing::ValuesIn(MergeCases()),
                         [](const ::testing::TestParamInfo<MergeCase>& param_info) {
                           return param_info.param.name;
                         });

TEST(FlashCpuTest, MergeIntoEmptyPartialIgnoresItsStaleOutput) {
  // An lse of -inf marks an empty partial; whatever its o holds (here NaN) must not leak.
  AttentionParams p = Shape(40, 50, 2, 2, 64);
  AttentionBuffers t = MakeAttentionBuffers(&p, 41);
  std::fill(t.lse.begin(), t.lse.end(), kNegInf);  // o stays NaN-poisoned
  p.merge_into_output = true;
  ASSERT_TRUE(FlashCpuForward(p).ok());
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
  ASSERT_TRUE(ref.ok());
  ExpectMatchesReference(p, t, *ref);
}

// ---- Non-finite inputs (reference_attention.h) ------------------------------------------------

using kernel_testing::ApplyNonFinite;
using kernel_testing::NonFiniteCase;
using kernel_testing::NonFiniteCases;
using kernel_testing::TwoKeyCall;

// Every case of NonFiniteCases, every input dtype: NaN exactly where the reference has it (the
// comparison counts NaN on one side only), infinities equal, the rest within tolerance.
TEST(FlashCpuNonFiniteTest, MatchesTheReference) {
  for (const DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (const NonFiniteCase& c : NonFiniteCases(t)) {
      SCOPED_TRACE(absl::StrCat(c.name, " ", std::string(DTypeName(t))));
      AttentionParams p = c.p;
      AttentionBuffers buffers = MakeAttentionBuffers(&p, 5);
      ApplyNonFinite(c, &buffers);
      ASSERT_TRUE(FlashCpuForward(p).ok());
      absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
      ASSERT_TRUE(ref.ok());
      ExpectMatchesReference(p, buffers, *ref);
    }
  }
}

// Runs `whole` (fp32 o) as two calls over keys [0, split) and [split, seqlen_k): the second
// merging into the first's o and lse, or (partial_input) taking them, in buffers of their own,
// as a read-only partial.
void RunInTwoHalves(const AttentionParams& whole, int64_t split, bool partial_input) {
  AttentionParams first = KeyRange(whole, 0, split);
  AttentionParams second = KeyRange(whole, split, whole.seqlen_k);
  const size_t rows = static_cast<size_t>(whole.batch) * whole.heads * whole.seqlen_q;
  std::vector<float> partial_o(rows * whole.head_dim), partial_lse(rows);
  if (partial_input) {
    first.o = partial_o.data();
    first.lse = partial_lse.data();
    second.partial_o = partial_o.data();
    second.partial_lse = partial_lse.data();
  } else {
    second.merge_into_output = true;
  }
  ASSERT_TRUE(FlashCpuForward(first).ok());
  ASSERT_TRUE(FlashCpuForward(second).ok());
}

// A poisoned row stays poisoned through the merges of a ring (merge_into_output, then a
// read-only partial), whichever half holds the poison; clean rows are untouched.
TEST(FlashCpuNonFiniteTest, MergesCarryNan) {
  for (const NonFiniteCase& c : NonFiniteCases(DType::kF32)) {
    for (const bool partial_input : {false, true}) {
      SCOPED_TRACE(absl::StrCat(c.name, partial_input ? " partial input" : " merge"));
      AttentionParams whole = c.p;
      whole.o_dtype = DType::kF32;
      AttentionBuffers t = MakeAttentionBuffers(&whole, 6);
      ApplyNonFinite(c, &t);
      ASSERT_NO_FATAL_FAILURE(RunInTwoHalves(whole, 45, partial_input));
      absl::StatusOr<ReferenceResult> ref = ReferenceForward(whole);
      ASSERT_TRUE(ref.ok());
      ExpectMatchesReference(whole, t, *ref);
    }
  }
}

// A partial whose weight underflows next to the other's (its scores 200 below) still carries
// its NaN: a negligible partial is read, only an empty one is not.
TEST(FlashCpuNonFiniteTest, ANegligiblePartialStillCarriesItsNan) {
  for (const bool partial_input : {false, true}) {
    AttentionParams whole;  // scores -100 and 100; NaN in key 0's v
    AttentionBuffers t = TwoKeyCall(&whole, DType::kF32, 100.0f, -1.0f, 1.0f, 0,
                                    std::numeric_limits<float>::quiet_NaN());
    ASSERT_NO_FATAL_FAILURE(RunInTwoHalves(whole, 1, partial_input));
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(whole);
    ASSERT_TRUE(ref.ok());
    EXPECT_TRUE(std::isnan(ref->o[3]));
    ExpectMatchesReference(whole, t, *ref);
  }
}

// exp underflows to exactly 0 for the second key; its infinite v still adds 0 * inf = NaN when
// the key is visible, and nothing when it is masked (the block is then partly visible).
TEST(FlashCpuNonFiniteTest, InfiniteValueAtAZeroProbabilityKey) {
  for (const bool causal : {false, true}) {
    AttentionParams p;  // scores 1000 and -1000; inf in key 1's v
    AttentionBuffers t = TwoKeyCall(&p, DType::kF32, 1000.0f, 1.0f, -1.0f, 1,
                                    std::numeric_limits<float>::infinity());
    p.causal = causal;
    ASSERT_TRUE(FlashCpuForward(p).ok());
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
    ASSERT_TRUE(ref.ok());
    EXPECT_EQ(std::isnan(ref->o[3]), !causal);
    ExpectMatchesReference(p, t, *ref);
  }
}

// ---- Threads --------------------------------------------------------------------------------

TEST(FlashCpuTest, ThreadCountDoesNotChangeAnyBit) {
  for (const AttentionParams& shape :
       {Causal(Shape(300, 300, 5, 5, 64)),
        Dtypes(Softcap(Window(Shape(200, 260, 8, 2, 128), 70, 3), 9.0f), DType::kF16,
               DType::kBF16)}) {
    AttentionParams p1 = shape, p4 = shape;
    AttentionBuffers t1 = MakeAttentionBuffers(&p1, 51, /*with_alibi=*/true);
    AttentionBuffers t4 = MakeAttentionBuffers(&p4, 51, /*with_alibi=*/true);
    ASSERT_TRUE(FlashCpuForward(p1, {.num_threads = 1}).ok());
    ASSERT_TRUE(FlashCpuForward(p4, {.num_threads = 4}).ok());
    EXPECT_TRUE(t1.o == t4.o);
    ASSERT_EQ(t1.lse.size(), t4.lse.size());
    EXPECT_EQ(std::memcmp(t1.lse.data(), t4.lse.data(), t1.lse.size() * sizeof(float)), 0);
  }
}

TEST(FlashCpuTest, MoreThreadsThanWorkItems) {
  RunAgainstReference({"Tiny", Shape(3, 5, 1, 1, 64)}, 61, /*num_threads=*/16);
}

// ---- Refused inputs -------------------------------------------------------------------------

TEST(FlashCpuTest, RefusesUnsupportedHeadDim) {
  AttentionParams p = Shape(8, 8, 2, 2, 96);
  AttentionBuffers t = MakeAttentionBuffers(&p, 71);
  const absl::Status s = FlashCpuForward(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("head_dim 96"), std::string::npos) << s;
}

TEST(FlashCpuTest, RefusesHeadsNotAMultipleOfHeadsK) {
  AttentionParams p = Shape(8, 8, 5, 2, 64);
  AttentionBuffers t = MakeAttentionBuffers(&p, 72);
  const absl::Status s = FlashCpuForward(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("heads_k"), std::string::npos) << s;
}

TEST(FlashCpuTest, RefusesHalfAPartialAndAPartialWithMerge) {
  AttentionParams p = Shape(8, 8, 1, 1, 64);
  AttentionBuffers t = MakeAttentionBuffers(&p, 3);
  std::vector<float> partial(t.o.size()), partial_lse(t.lse.size());
  AttentionParams half = p;
  half.partial_o = partial.data();
  const absl::Status s = FlashCpuForward(half);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("partial_lse"), std::string::npos) << s;
  AttentionParams both = Dtypes(p, DType::kF32, DType::kF32);
  both.partial_o = partial.data();
  both.partial_lse = partial_lse.data();
  both.merge_into_output = true;
  const absl::Status merged = FlashCpuForward(both);
  EXPECT_EQ(merged.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(merged.message().find("merge_into_output"), std::string::npos) << merged;
}

TEST(FlashCpuTest, RefusesMergeIntoNonFp32Output) {
  AttentionParams p = Dtypes(Shape(8, 8, 2, 2, 64), DType::kF16, DType::kF16);
  AttentionBuffers t = MakeAttentionBuffers(&p, 73);
  p.merge_into_output = true;
  EXPECT_EQ(FlashCpuForward(p).code(), absl::StatusCode::kInvalidArgument);
}

TEST(FlashCpuTest, RefusesNegativeThreadCount) {
  AttentionParams p = Shape(8, 8, 2, 2, 64);
  AttentionBuffers t = MakeAttentionBuffers(&p, 74);
  const absl::Status s = FlashCpuForward(p, {.num_threads = -1});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("num_threads"), std::string::npos) << s;
}

// ---- Kernel internals -----------------------------------------------------------------------

TEST(FlashCpuInternalsTest, BranchlessF16DecodeMatchesF16ToFloatForAllPatterns) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    ASSERT_EQ(FloatBits(F16ToFloatBranchless(h)), FloatBits(F16ToFloat(h))) << std::hex << bits;
  }
}

// Error of ExpForSoftmax in ulps of the correctly rounded result (computed in double).
double UlpError(float x) {
  const double want = std::exp(static_cast<double>(x));
  const float want_f = static_cast<float>(want);
  const double ulp = std::nextafter(want_f, std::numeric_limits<float>::infinity()) - want_f;
  return std::abs(ExpForSoftmax(x) - want) / ulp;
}

TEST(FlashCpuInternalsTest, ExpForSoftmaxIsAccurateOverItsRange) {
  // Every 61st float of [-87, 0] (about 18 million arguments, every exponent and many
  // mantissas), plus the positive side used by nobody but kept sane.
  double worst = 0.0;
  float worst_x = 0.0f;
  const uint32_t lo = FloatBits(-87.0f);  // negative floats: larger bits, more negative
  for (uint32_t bits = 0x80000000u; bits <= lo; bits += 61) {
    const float x = BitsFloat(bits);
    const double e = UlpError(x);
    if (e > worst) {
      worst = e;
      worst_x = x;
    }
  }
  for (float x = 0.0f; x <= 87.0f; x += 0.013f) worst = std::max(worst, UlpError(x));
  EXPECT_LE(worst, 4.0) << "worst at x=" << worst_x;
}

TEST(FlashCpuInternalsTest, ExpForSoftmaxSpecialValues) {
  EXPECT_EQ(ExpForSoftmax(0.0f), 1.0f);
  EXPECT_EQ(ExpForSoftmax(-0.0f), 1.0f);
  EXPECT_EQ(ExpForSoftmax(kNegInf), 0.0f);  // masked keys contribute exactly nothing
  EXPECT_EQ(ExpForSoftmax(-87.5f), 0.0f);
  EXPECT_EQ(ExpForSoftmax(-1e30f), 0.0f);
  EXPECT_GT(ExpForSoftmax(-87.0f), 0.0f);
  EXPECT_TRUE(std::isnan(ExpForSoftmax(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(std::isfinite(ExpForSoftmax(std::numeric_limits<float>::infinity())));
}

// ---- Backends -------------------------------------------------------------------------------

TEST(CpuBackendTest, BothBackendsComputeTheSameAttention) {
  for (const char* name : {"cpu", "cpu_reference"}) {
    SCOPED_TRACE(name);
    absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend(name);
    ASSERT_TRUE(backend.ok()) << backend.status();
    EXPECT_EQ((*backend)->name(), name);
    EXPECT_EQ((*backend)->memory_space(), MemorySpace::kHost);

    AttentionParams p = Dtypes(Causal(Shape(90, 90, 4, 2, 128)), DType::kBF16, DType::kF16);
    AttentionBuffers t = MakeAttentionBuffers(&p, 81, /*with_alibi=*/true);
    ASSERT_TRUE((*backend)->Forward(p).ok());
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
    ASSERT_TRUE(ref.ok());
    ExpectMatchesReference(p, t, *ref);

    AttentionParams bad = p;
    bad.head_dim = 96;
    EXPECT_EQ((*backend)->Forward(bad).code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(CpuBackendTest, BothBackendsMerge) {
  for (const char* name : {"cpu", "cpu_reference"}) {
    SCOPED_TRACE(name);
    absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend(name);
    ASSERT_TRUE(backend.ok());
    AttentionParams whole = Causal(Shape(100, 100, 2, 2, 64));
    AttentionBuffers t = MakeAttentionBuffers(&whole, 82);
    AttentionParams second = KeyRange(whole, 45, 100);
    second.merge_into_output = true;
    ASSERT_TRUE((*backend)->Forward(KeyRange(whole, 0, 45)).ok());
    ASSERT_TRUE((*backend)->Forward(second).ok());
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(whole);
    ASSERT_TRUE(ref.ok());
    ExpectMatchesReference(whole, t, *ref);
  }
}

}  // namespace
}  // namespace ringattn
