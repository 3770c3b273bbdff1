// The backward, in two layers:
//  1. The fp64 reference backward against central finite differences of the fp64 reference
//     forward, loss = sum(O * dO) with a random dO, every element of dq, dk and dv, on tiny
//     sizes with every option. This anchors the oracle to the forward's definition.
//  2. The fast CPU backward against the fp64 reference backward at awkward sizes, every option
//     alone and combined, every dtype; accumulate mode, key splits with the whole forward's LSE
//     (a ring step's call), fully masked rows, strided views, NaN-poisoned outputs, thread-count
//     determinism, refusals and the two backends.
//
// Tolerances of layer 2. The reference reads the same dtype-rounded q, k, v and dO as the
// kernel, and the kernel gets the forward's output in fp32, so what is left is the fp32
// arithmetic of the forward (its LSE and O, through P and D) and of the backward:
//   rel L2 <= kRelL2 per gradient tensor, and per element
//   |got - want| <= kAbsOfMax * max|want| + kRel * |want|.
// Measured on this suite (each case prints its rel L2): up to 6e-7 in fp32 and with fp16/bf16
// inputs, 2e-6 with 8x sharpened scores; per element well inside the bounds.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention_backward_params.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/flash_cpu_backward.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/cpu/reference_backward.h"
#include "kernels/cpu/test_util.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

using kernel_testing::Causal;
using kernel_testing::CompareWithTolerance;
using kernel_testing::Dropout;
using kernel_testing::FillRandomNormal;
using kernel_testing::Packed;
using kernel_testing::Positions;
using kernel_testing::Runs;
using kernel_testing::Sharpen;
using kernel_testing::Softcap;
using kernel_testing::ToleranceReport;
using kernel_testing::TypedBuffer;
using kernel_testing::Window;

constexpr double kRelL2 = 1e-5;
constexpr double kAbsOfMax = 2e-5;
constexpr double kRel = 1e-4;

// ---- Building cases -------------------------------------------------------------------------

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
AttentionParams Dtype(AttentionParams p, DType in) {
  p.dtype = in;
  return p;
}
struct Case {
  std::string name;
  AttentionParams p;  // sizes and options; tensors are attached per test
  bool alibi = false;
  DType out_dtype = DType::kF32;  // of out and dout
};

// FNV-1a of the name: a fixed seed per case on every platform.
uint32_t SeedFromName(const std::string& name) {
  uint32_t h = 2166136261u;
  for (const char c : name) h = (h ^ static_cast<uint8_t>(c)) * 16777619u;
  return h;
}

std::vector<float> AlibiSlopes(int heads) {
  std::vector<float> s;
  for (int h = 0; h < heads; ++h) s.push_back(std::exp2(-8.0f * (h + 1.0f) / heads));
  return s;
}

// Every tensor of one backward call, contiguous. The gradients are poisoned with NaN so that a
// test can tell whether every element was written.
struct Buffers {
  TypedBuffer q, k, v;     // [batch, seq, heads(_k), head_dim], dtype
  TypedBuffer out, dout;   // [batch, seqlen_q, heads, head_dim], out_dtype
  std::vector<float> lse;  // [batch, heads, seqlen_q]
  std::vector<float> dq;   // [batch, seqlen_q, heads, head_dim]
  std::vector<float> dk;   // [batch, seqlen_k, heads_k, head_dim]
  std::vector<float> dv;   // [batch, seqlen_k, heads_k, head_dim]
  std::vector<float> alibi;
};

// Allocates and fills the tensors of `c` (random q, k, v, dout from `seed`; out and lse from
// the fast forward) and points *bp at them.
std::unique_ptr<Buffers> MakeBuffers(const Case& c, uint32_t seed, AttentionBackwardParams* bp) {
  auto t = std::make_unique<Buffers>();
  *bp = AttentionBackwardParams{};
  bp->fwd = c.p;
  bp->out_dtype = c.out_dtype;
  AttentionParams& p = bp->fwd;
  const int64_t d = p.head_dim;
  const int64_t q_elems = p.batch * p.seqlen_q * p.heads * d;
  const int64_t kv_elems = p.batch * p.seqlen_k * p.heads_k * d;
  t->q = TypedBuffer(p.dtype, q_elems);
  t->k = TypedBuffer(p.dtype, kv_elems);
  t->v = TypedBuffer(p.dtype, kv_elems);
  t->out = TypedBuffer(c.out_dtype, q_elems);
  t->dout = TypedBuffer(c.out_dtype, q_elems);
  FillRandomNormal(&t->q, seed * 5 + 1);
  FillRandomNormal(&t->k, seed * 5 + 2);
  FillRandomNormal(&t->v, seed * 5 + 3);
  FillRandomNormal(&t->dout, seed * 5 + 4);
  t->lse.assign(p.batch * p.heads * p.seqlen_q, std::nanf(""));
  t->dq.assign(q_elems, std::nanf(""));
  t->dk.assign(kv_elems, std::nanf(""));
  t->dv.assign(kv_elems, std::nanf(""));
  if (c.alibi) t->alibi = AlibiSlopes(p.heads);
  p.q = t->q.data();
  p.k = t->k.data();
  p.v = t->v.data();
  p.alibi_slopes = c.alibi ? t->alibi.data() : nullptr;
  bp->out = t->out.data();
  bp->dout = t->dout.data();
  bp->lse = t->lse.data();
  bp->dq = t->dq.data();
  bp->dk = t->dk.data();
  bp->dv = t->dv.data();
  SetContiguousBackwardStrides(bp);

  // The forward, writing out (out_dtype) and lse.
  AttentionParams f = p;
  f.o = t->out.data();
  f.o_dtype = c.out_dtype;
  f.lse = t->lse.data();
  EXPECT_TRUE(FlashCpuForward(f).ok());
  return t;
}

// ---- Checking -------------------------------------------------------------------------------

double MaxAbs(const std::vector<double>& x) {
  double m = 0.0;
  for (double v : x) m = std::max(m, std::abs(v));
  return m;
}

// Compares one gradient with the reference: every element within kAbsOfMax * max|want| +
// kRel * |want|, rel L2 within `rel_l2`, no NaN left. Returns the rel L2.
double ExpectGradientMatches(const char* name, const std::vector<float>& got,
                             const std::vector<double>& want, double rel_l2 = kRelL2) {
  const ToleranceReport r = CompareWithTolerance(
      static_cast<int64_t>(got.size()), [&](int64_t i) { return got[i]; }, want,
      kAbsOfMax * MaxAbs(want) + 1e-30, kRel);
  EXPECT_TRUE(r.Clean()) << name << ": " << r.ToString();
  EXPECT_LE(r.stats.rel_l2, rel_l2) << name << ": " << r.ToString();
  return r.stats.rel_l2;
}

void ExpectMatches(const Buffers& t, const ReferenceBackwardResult& ref, double rel_l2 = kRelL2) {
  const double eq = ExpectGradientMatches("dq", t.dq, ref.dq, rel_l2);
  const double ek = ExpectGradientMatches("dk", t.dk, ref.dk, rel_l2);
  const double ev = ExpectGradientMatches("dv", t.dv, ref.dv, rel_l2);
  // The measured errors, for the tolerances at the top of the file.
  std::printf("    rel L2: dq %.2e  dk %.2e  dv %.2e\n", eq, ek, ev);
}

// ---- 1. The reference against finite differences --------------------------------------------

// Rounds x to a multiple of 2^-12 in [-4, 4]: then x +- 2^-7 and x +- 2^-8 are exact in fp32,
// so the finite-difference steps are exactly the intended ones.
float OnGrid(float x) { return std::clamp(std::round(x * 4096.0f) / 4096.0f, -4.0f, 4.0f); }

struct FdCase {
  std::string name;
  AttentionParams p;
  bool alibi = false;
};

void PrintTo(const FdCase& c, std::ostream* os) { *os << c.name; }

class ReferenceVsFiniteDifferences : public ::testing::TestWithParam<FdCase> {};

// loss(q, k, v) = sum(O * dO) by the fp64 reference forward.
double Loss(const AttentionParams& p, const std::vector<float>& dout) {
  absl::StatusOr<ReferenceResult> r = ReferenceForward(p);
  EXPECT_TRUE(r.ok()) << r.status();
  double loss = 0.0;
  for (size_t i = 0; i < dout.size(); ++i) loss += r->o[i] * dout[i];
  return loss;
}

TEST_P(ReferenceVsFiniteDifferences, EveryElement) {
  const FdCase& c = GetParam();
  AttentionParams p = c.p;
  std::mt19937 rng(SeedFromName(c.name));
  std::normal_distribution<float> normal;
  auto fill = [&](std::vector<float>* x, int64_t n) {
    x->resize(n);
    for (float& e : *x) e = OnGrid(normal(rng));
  };
  std::vector<float> q, k, v, dout, o(p.batch * p.seqlen_q * p.heads * p.head_dim);
  fill(&q, p.batch * p.seqlen_q * p.heads * p.head_dim);
  fill(&k, p.batch * p.seqlen_k * p.heads_k * p.head_dim);
  fill(&v, p.batch * p.seqlen_k * p.heads_k * p.head_dim);
  fill(&dout, static_cast<int64_t>(o.size()));
  const std::vector<float> alibi = AlibiSlopes(p.heads);
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.o = o.data();
  p.alibi_slopes = c.alibi ? alibi.data() : nullptr;
  SetContiguousStrides(&p);

  AttentionBackwardParams bp;
  bp.fwd = p;
  bp.dout = dout.data();
  SetContiguousBackwardStrides(&bp);
  absl::StatusOr<ReferenceBackwardResult> grads = ReferenceBackward(bp);
  ASSERT_TRUE(grads.ok()) << grads.status();

  // Central differences with Richardson extrapolation: D(h) = (L(x+h) - L(x-h)) / 2h has error
  // c h^2 + O(h^4); (4 D(h/2) - D(h)) / 3 cancels the h^2 term.
  constexpr float kStep = 0x1p-7f;
  double worst = 0.0;
  auto check = [&](const char* name, std::vector<float>* x, const std::vector<double>& grad) {
    const double scale = MaxAbs(grad);
    for (size_t i = 0; i < x->size(); ++i) {
      const float x0 = (*x)[i];
      auto central = [&](float h) {
        (*x)[i] = x0 + h;
        const double up = Loss(p, dout);
        (*x)[i] = x0 - h;
        const double down = Loss(p, dout);
        (*x)[i] = x0;
        return (up - down) / (2.0 * h);
      };
      const double fd = (4.0 * central(kStep / 2) - central(kStep)) / 3.0;
      const double err = std::abs(fd - grad[i]);
      worst = std::max(worst, err / (std::abs(grad[i]) + 1e-3 * scale));
      ASSERT_LE(err, 1e-6 * std::abs(grad[i]) + 1e-7 * scale)
          << name << "[" << i << "]: reference " << grad[i] << " finite differences " << fd;
    }
  };
  check("dq", &q, grads->dq);
  check("dk", &k, grads->dk);
  check("dv", &v, grads->dv);
  std::printf("    worst |fd - reference| / (|reference| + 1e-3 max): %.2e\n", worst);
}

INSTANTIATE_TEST_SUITE_P(
    Tiny, ReferenceVsFiniteDifferences,
    ::testing::Values(
        FdCase{"Seq1", Shape(1, 1, 2, 1, 64)},  // one key: P = 1, dq = dk = 0, dv = dO
        FdCase{"Seq1Q3K", Shape(1, 3, 2, 1, 64)},
        FdCase{"Seq3Causal", Causal(Shape(3, 3, 2, 1, 64))},
        FdCase{"Seq7Mha", Shape(7, 7, 2, 2, 64)},
        FdCase{"Seq7GqaCausal", Causal(Shape(7, 7, 2, 1, 64))},
        FdCase{"Seq7Window", Window(Shape(7, 7, 2, 1, 64), 2, 1)},
        FdCase{"Seq7AlibiCausal", Causal(Shape(7, 7, 2, 1, 64)), true},
        FdCase{"Seq7Softcap", Softcap(Sharpen(Shape(7, 7, 2, 1, 64), 4.0f), 2.0f)},
        // Offsets put some query rows before every key: fully masked rows, no gradient.
        FdCase{"Seq7x5AllOptions",
               Softcap(Window(Causal(Positions(Shape(7, 5, 2, 1, 64), 1, 2, 3, 1)), 4, 0), 3.0f),
               true},
        // Dropout: the mask is fixed by the seed, so the loss is differentiable in q, k, v.
        FdCase{"Seq7DropoutCausal", Dropout(Causal(Shape(7, 7, 2, 1, 64)), 0.3f, 5)},
        FdCase{"Seq7DropoutAlibiSoftcap", Dropout(Softcap(Shape(7, 7, 2, 1, 64), 3.0f), 0.5f, 9),
               true}),
    [](const ::testing::TestParamInfo<FdCase>& info) { return info.param.name; });

// ---- 2. The fast backward against the reference ---------------------------------------------

// Runs the fast backward and the exact reference on the case's inputs and compares them.
void RunAgainstReference(const Case& c, int num_threads = 0) {
  AttentionBackwardParams bp;
  std::unique_ptr<Buffers> t = MakeBuffers(c, SeedFromName(c.name), &bp);
  const absl::Status s = FlashCpuBackward(bp, {.num_threads = num_threads});
  ASSERT_TRUE(s.ok()) << s;
  absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(bp);
  ASSERT_TRUE(ref.ok()) << ref.status();
  ExpectMatches(*t, *ref);
}

std::vector<Case> SweepCases() {
  const DType f16 = DType::kF16, bf16 = DType::kBF16;
  std::vector<Case> cases = {
      // Sizes: single rows, sizes off every block multiple, heads, GQA ratios, head dims.
      {"Seq1", Shape(1, 1, 5, 5, 64)},
      {"Seq7Heads5", Shape(7, 7, 5, 5, 128)},
      {"Seq255Heads5", Shape(255, 255, 5, 5, 64)},
      {"Seq1000", Shape(1000, 1000, 2, 1, 64)},
      {"Seq1000Heads5D128Causal", Causal(Shape(1000, 1000, 5, 5, 128))},
      {"Gqa8to1Seq1000CausalWindow", Window(Causal(Shape(1000, 1000, 8, 1, 64)), 200, 0)},
      {"Gqa8to2D64", Shape(255, 255, 8, 2, 64)},
      {"Gqa8to1D128", Shape(255, 255, 8, 1, 128)},
      {"Mqa8to1Batch2", Shape(130, 67, 8, 1, 64, /*batch=*/2)},
      {"D256", Shape(100, 130, 2, 1, 256)},
      {"Seq1QSeq255K", Shape(1, 255, 2, 1, 128)},
      {"Seq255QSeq7K", Shape(255, 7, 2, 2, 64)},
      {"Seq100QSeq1000K", Shape(100, 1000, 2, 1, 64)},
      // Dtypes of q, k, v and dO (rounded; the reference reads the same values).
      {"F16", Dtype(Shape(255, 255, 5, 5, 64), f16)},
      {"Bf16Gqa", Dtype(Shape(255, 255, 8, 2, 128), bf16)},
      {"Bf16Seq1000Causal", Causal(Dtype(Shape(1000, 1000, 2, 1, 64), bf16))},
      // Packed variable-length sequences: gradients stay inside each sequence.
      {"PackedSeq1And7Heads5", Packed(Shape(8, 8, 5, 5, 64), {0, 1, 8})},
      {"PackedCausalGqa", Causal(Packed(Shape(255, 255, 8, 2, 64), {0, 1, 8, 100, 100, 255}))},
      {"PackedWindowAlibiSoftcap",
       Softcap(Window(Packed(Shape(255, 255, 4, 2, 128), {0, 90, 91, 255}), 30, 5), 10.0f), true},
      {"PackedRunsCausal",
       Causal(Packed(Runs(Shape(200, 180, 4, 2, 64), 100, 300, 64, 250), {0, 40, 260, 310, 500}))},
      {"PackedDropout", Dropout(Causal(Packed(Shape(255, 255, 4, 4, 64), {0, 77, 255})), 0.3f, 5)},
      {"Packed3816Causal", Causal(Packed(Shape(3816, 3816, 2, 1, 64), {0, 1, 7, 1000, 3816}))},
      // Options alone.
      {"Causal", Causal(Shape(255, 255, 5, 5, 64))},
      {"CausalQShorter", Causal(Shape(100, 255, 2, 2, 64))},
      {"CausalStripeOffsets", Causal(Positions(Shape(255, 255, 4, 2, 64), 1, 2, 0, 2))},
      {"CausalOffsetsStride3", Causal(Positions(Shape(200, 150, 2, 2, 128), 37, 3, 5, 2))},
      {"CausalKeysAfterSomeQueries", Causal(Positions(Shape(100, 100, 2, 2, 64), 0, 1, 50, 1))},
      {"Window0x0", Window(Shape(255, 255, 2, 2, 64), 0, 0)},
      {"WindowLeftOnly", Window(Shape(255, 255, 2, 2, 64), 17, kUnboundedWindow)},
      {"WindowRightOnly", Window(Shape(255, 255, 2, 2, 64), kUnboundedWindow, 17)},
      {"Window5x3Strides", Window(Positions(Shape(200, 150, 2, 2, 64), 0, 2, 0, 3), 5, 3)},
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
       Dtype(Softcap(Window(Causal(Positions(Shape(200, 250, 8, 2, 128), 90, 3, 7, 2)), 150, 0),
                     30.0f),
             bf16),
       true},
      {"AllOptionsF16Seq1000",
       Dtype(Softcap(Window(Causal(Shape(1000, 1000, 2, 1, 64)), 300, 0), 10.0f), f16), true},
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

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class FastVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(FastVsReference, MatchesReference) { RunAgainstReference(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Sweep, FastVsReference, ::testing::ValuesIn(SweepCases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

// With out and dO in fp16/bf16 the kernel's D comes from the rounded out, the exact reference's
// from the exact O; the reference with the forward's statistics reads the same rounded out, so
// against it only fp32 arithmetic remains.
TEST(FlashCpuBackwardTest, Fp16AndBf16OutputsAgainstReferenceWithSameStats) {
  for (DType out_dtype : {DType::kF16, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(out_dtype));
    Case c{"LowPrecisionOut", Softcap(Causal(Dtype(Shape(255, 255, 4, 2, 64), out_dtype)), 20.0f),
           true, out_dtype};
    AttentionBackwardParams bp;
    std::unique_ptr<Buffers> t = MakeBuffers(c, 3, &bp);
    ASSERT_TRUE(FlashCpuBackward(bp).ok());
    absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackwardWithForwardStats(bp);
    ASSERT_TRUE(ref.ok()) << ref.status();
    ExpectMatches(*t, *ref);
  }
}

// ---- Accumulate mode and key splits ----------------------------------------------------------

TEST(FlashCpuBackwardTest, AccumulateAddsToWhatIsThere) {
  Case c{"Accumulate", Window(Causal(Shape(130, 200, 4, 2, 64)), 70, kUnboundedWindow), true};
  AttentionBackwardParams bp;
  std::unique_ptr<Buffers> t = MakeBuffers(c, 5, &bp);
  absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(bp);
  ASSERT_TRUE(ref.ok());
  // Start from random gradients; the expected result is start + reference.
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  auto start = [&](std::vector<float>* g, std::vector<double>* want) {
    for (size_t i = 0; i < g->size(); ++i) {
      (*g)[i] = normal(rng);
      (*want)[i] += (*g)[i];
    }
  };
  start(&t->dq, &ref->dq);
  start(&t->dk, &ref->dk);
  start(&t->dv, &ref->dv);
  bp.accumulate = true;
  ASSERT_TRUE(FlashCpuBackward(bp).ok());
  ExpectMatches(*t, *ref);
}

// Points `part` at keys [begin, end) of `whole` (K/V pointers down the rows, dk/dv likewise;
// positions keep their global values).
AttentionBackwardParams KeyRange(const AttentionBackwardParams& whole, int64_t begin, int64_t end) {
  AttentionBackwardParams part = whole;
  const AttentionParams& w = whole.fwd;
  part.fwd.seqlen_k = end - begin;
  part.fwd.k = static_cast<const char*>(w.k) + begin * w.k_row_stride * DTypeSize(w.dtype);
  part.fwd.v = static_cast<const char*>(w.v) + begin * w.v_row_stride * DTypeSize(w.dtype);
  part.fwd.k_pos_offset = w.k_pos_offset + begin * w.k_pos_stride;
  part.dk = whole.dk + begin * whole.dk_row_stride;
  part.dv = whole.dv + begin * whole.dv_row_stride;
  return part;
}

// What a ring does: the keys in two calls that see the whole forward's LSE and D, dq
// accumulated across them. Equals one call over all keys.
TEST(FlashCpuBackwardTest, KeySplitsWithTheWholeLseAddUpToOneCall) {
  for (const Case& c :
       {Case{"Split", Shape(200, 300, 4, 2, 64)},
        Case{"SplitCausalAlibiSoftcap", Softcap(Causal(Shape(300, 300, 4, 1, 128)), 10.0f), true},
        Case{"SplitStripe", Causal(Positions(Shape(150, 150, 2, 2, 64), 1, 2, 0, 2))}}) {
    SCOPED_TRACE(c.name);
    AttentionBackwardParams bp;
    std::unique_ptr<Buffers> t = MakeBuffers(c, 7, &bp);
    absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(bp);
    ASSERT_TRUE(ref.ok());
    std::vector<float> delta(t->lse.size());
    ASSERT_TRUE(FlashCpuBackwardDelta(bp, delta.data()).ok());
    bp.delta = delta.data();
    const int64_t split = 110;
    AttentionBackwardParams first = KeyRange(bp, 0, split);
    AttentionBackwardParams second = KeyRange(bp, split, bp.fwd.seqlen_k);
    ASSERT_TRUE(FlashCpuBackward(second).ok());  // any order
    first.accumulate = true;
    std::fill(t->dk.begin(), t->dk.begin() + split * bp.dk_row_stride, 0.0f);
    std::fill(t->dv.begin(), t->dv.begin() + split * bp.dv_row_stride, 0.0f);
    ASSERT_TRUE(FlashCpuBackward(first).ok());
    ExpectMatches(*t, *ref);
  }
}

// ---- Fully masked rows, empty calls ----------------------------------------------------------

TEST(FlashCpuBackwardTest, FullyMaskedEverythingGivesZeroGradients) {
  // Causal with every key after every query: nothing allowed, lse -inf everywhere.
  Case c{"AllMasked", Causal(Positions(Shape(70, 90, 2, 2, 64), 0, 1, 1000, 1))};
  AttentionBackwardParams bp;
  std::unique_ptr<Buffers> t = MakeBuffers(c, 11, &bp);
  ASSERT_TRUE(FlashCpuBackward(bp).ok());
  for (float g : t->dq) ASSERT_EQ(g, 0.0f);
  for (float g : t->dk) ASSERT_EQ(g, 0.0f);
  for (float g : t->dv) ASSERT_EQ(g, 0.0f);
}

TEST(FlashCpuBackwardTest, NoKeysZeroesDqAndNoQueriesZeroesDkDv) {
  {
    Case c{"NoKeys", Shape(33, 0, 2, 2, 128)};
    AttentionBackwardParams bp;
    std::unique_ptr<Buffers> t = MakeBuffers(c, 12, &bp);
    bp.fwd.k = bp.fwd.v = nullptr;
    bp.dk = bp.dv = nullptr;
    ASSERT_TRUE(FlashCpuBackward(bp).ok());
    for (float g : t->dq) ASSERT_EQ(g, 0.0f);
  }
  {
    Case c{"NoQueries", Shape(0, 50, 2, 2, 64)};
    AttentionBackwardParams bp;
    std::unique_ptr<Buffers> t = MakeBuffers(c, 13, &bp);
    bp.fwd.q = nullptr;
    bp.out = bp.dout = nullptr;
    bp.lse = nullptr;
    bp.dq = nullptr;
    ASSERT_TRUE(FlashCpuBackward(bp).ok());
    for (float g : t->dk) ASSERT_EQ(g, 0.0f);
    for (float g : t->dv) ASSERT_EQ(g, 0.0f);
  }
}

// ---- Strided views --------------------------------------------------------------------------

TEST(FlashCpuBackwardTest, HonoursStridesAndWritesNothingOutsideTheViews) {
  // Every tensor with padding between heads and rows (and lse between heads); the gradients'
  // padding must stay NaN.
  const int heads = 4, heads_k = 2, dim = 64;
  const int64_t sq = 70, sk = 90, head_pad = 16, row_pad = 8;
  Case c{"Strided", Causal(Positions(Shape(sq, sk, heads, heads_k, dim), 40, 1, 0, 1)), true};
  // Contiguous twin for the reference.
  AttentionBackwardParams dense;
  std::unique_ptr<Buffers> t = MakeBuffers(c, 21, &dense);
  absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(dense);
  ASSERT_TRUE(ref.ok());

  auto q_like = [&](int64_t* b, int64_t* r, int64_t* h) {
    *h = dim + head_pad;
    *r = heads * *h + row_pad;
    *b = sq * *r;
  };
  auto kv_like = [&](int64_t* b, int64_t* r, int64_t* h) {
    *h = dim + head_pad;
    *r = heads_k * *h + row_pad;
    *b = sk * *r;
  };
  AttentionBackwardParams bp = dense;
  AttentionParams& p = bp.fwd;
  q_like(&p.q_batch_stride, &p.q_row_stride, &p.q_head_stride);
  q_like(&bp.out_batch_stride, &bp.out_row_stride, &bp.out_head_stride);
  q_like(&bp.dout_batch_stride, &bp.dout_row_stride, &bp.dout_head_stride);
  q_like(&bp.dq_batch_stride, &bp.dq_row_stride, &bp.dq_head_stride);
  kv_like(&p.k_batch_stride, &p.k_row_stride, &p.k_head_stride);
  kv_like(&p.v_batch_stride, &p.v_row_stride, &p.v_head_stride);
  kv_like(&bp.dk_batch_stride, &bp.dk_row_stride, &bp.dk_head_stride);
  kv_like(&bp.dv_batch_stride, &bp.dv_row_stride, &bp.dv_head_stride);
  bp.lse_head_stride = sq + 3;
  bp.lse_batch_stride = heads * bp.lse_head_stride;

  // Copies of the dense tensors into the strided buffers (NaN padding).
  auto spread = [&](const void* src, DType type, int64_t rows, int nheads, int64_t row_stride,
                    int64_t head_stride, int64_t size) {
    TypedBuffer b(type, size);
    b.FillWithNan();
    for (int64_t i = 0; i < rows; ++i) {
      for (int h = 0; h < nheads; ++h) {
        for (int d = 0; d < dim; ++d) {
          b.Set(i * row_stride + h * head_stride + d,
                LoadAsFloat(src, (i * nheads + h) * dim + d, type));
        }
      }
    }
    return b;
  };
  TypedBuffer q =
      spread(t->q.data(), p.dtype, sq, heads, p.q_row_stride, p.q_head_stride, p.q_batch_stride);
  TypedBuffer k =
      spread(t->k.data(), p.dtype, sk, heads_k, p.k_row_stride, p.k_head_stride, p.k_batch_stride);
  TypedBuffer v =
      spread(t->v.data(), p.dtype, sk, heads_k, p.v_row_stride, p.v_head_stride, p.v_batch_stride);
  TypedBuffer out = spread(t->out.data(), bp.out_dtype, sq, heads, bp.out_row_stride,
                           bp.out_head_stride, bp.out_batch_stride);
  TypedBuffer dout = spread(t->dout.data(), bp.out_dtype, sq, heads, bp.dout_row_stride,
                            bp.dout_head_stride, bp.dout_batch_stride);
  std::vector<float> lse(bp.lse_batch_stride, std::nanf(""));
  for (int h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < sq; ++i) lse[h * bp.lse_head_stride + i] = t->lse[h * sq + i];
  }
  std::vector<float> dq(bp.dq_batch_stride, std::nanf("")), dk(bp.dk_batch_stride, std::nanf("")),
      dv(bp.dv_batch_stride, std::nanf(""));
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  bp.out = out.data();
  bp.dout = dout.data();
  bp.lse = lse.data();
  bp.dq = dq.data();
  bp.dk = dk.data();
  bp.dv = dv.data();
  ASSERT_TRUE(FlashCpuBackward(bp).ok());

  // Gather the views back and compare; the padding must be untouched.
  auto gather = [&](const std::vector<float>& g, int64_t rows, int nheads, int64_t row_stride,
                    int64_t head_stride) {
    std::vector<float> dense_g;
    std::vector<bool> in_view(g.size(), false);
    for (int64_t i = 0; i < rows; ++i) {
      for (int h = 0; h < nheads; ++h) {
        for (int d = 0; d < dim; ++d) {
          const int64_t at = i * row_stride + h * head_stride + d;
          in_view[at] = true;
          dense_g.push_back(g[at]);
        }
      }
    }
    for (size_t at = 0; at < g.size(); ++at) {
      EXPECT_TRUE(in_view[at] || std::isnan(g[at])) << "padding written at " << at;
    }
    return dense_g;
  };
  t->dq = gather(dq, sq, heads, bp.dq_row_stride, bp.dq_head_stride);
  t->dk = gather(dk, sk, heads_k, bp.dk_row_stride, bp.dk_head_stride);
  t->dv = gather(dv, sk, heads_k, bp.dv_row_stride, bp.dv_head_stride);
  ExpectMatches(*t, *ref);
}

// ---- Threads --------------------------------------------------------------------------------

TEST(FlashCpuBackwardTest, ThreadCountDoesNotChangeAnyBit) {
  for (const Case& c :
       {Case{"Causal", Causal(Shape(300, 300, 5, 5, 64))},
        Case{"GqaAllOptions",
             Dtype(Softcap(Window(Shape(200, 260, 8, 2, 128), 70, 3), 9.0f), DType::kF16), true},
        Case{"Mqa", Shape(400, 400, 4, 1, 64)}}) {
    SCOPED_TRACE(c.name);
    AttentionBackwardParams b1, b4;
    std::unique_ptr<Buffers> t1 = MakeBuffers(c, 51, &b1);
    std::unique_ptr<Buffers> t4 = MakeBuffers(c, 51, &b4);
    ASSERT_TRUE(FlashCpuBackward(b1, {.num_threads = 1}).ok());
    ASSERT_TRUE(FlashCpuBackward(b4, {.num_threads = 4}).ok());
    auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
      return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
    };
    EXPECT_TRUE(same(t1->dq, t4->dq));
    EXPECT_TRUE(same(t1->dk, t4->dk));
    EXPECT_TRUE(same(t1->dv, t4->dv));
  }
}

TEST(FlashCpuBackwardTest, MoreThreadsThanWorkItems) {
  AttentionBackwardParams bp;
  std::unique_ptr<Buffers> t = MakeBuffers({"Tiny", Shape(3, 5, 1, 1, 64)}, 61, &bp);
  ASSERT_TRUE(FlashCpuBackward(bp, {.num_threads = 16}).ok());
  absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(bp);
  ASSERT_TRUE(ref.ok());
  ExpectMatches(*t, *ref);
}

// ---- The seed's bar: bf16 against fp64 on unrounded inputs ----------------------------------

// The seed asks for gradient error below 5e-2 (rel L2) in bf16 against an fp64 reference. Here
// the reference runs on the fp32 inputs, the kernel on their bf16 roundings with a bf16
// forward output and dO, and the gradients are rounded to bf16 as a bf16 model would store them.
TEST(FlashCpuBackwardTest, Bf16GradientErrorAgainstFp64IsFarBelowTheSeedsBar) {
  const AttentionParams shape = Causal(Shape(512, 512, 4, 2, 64));
  AttentionBackwardParams exact;
  std::unique_ptr<Buffers> t32 = MakeBuffers({"Exact", shape}, 77, &exact);
  absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(exact);
  ASSERT_TRUE(ref.ok());

  AttentionBackwardParams bp;
  std::unique_ptr<Buffers> t16 =
      MakeBuffers({"Bf16", Dtype(shape, DType::kBF16), false, DType::kBF16}, 77, &bp);
  // The same values, rounded: MakeBuffers draws the same normals for the same seed.
  for (int64_t i = 0; i < t32->q.size(); ++i)
    ASSERT_EQ(t16->q.Get(i), RoundThrough(t32->q.Get(i), DType::kBF16));
  ASSERT_TRUE(FlashCpuBackward(bp).ok());
  for (std::vector<float>* g : {&t16->dq, &t16->dk, &t16->dv}) {
    for (float& x : *g) x = RoundThrough(x, DType::kBF16);
  }
  double worst = 0.0;
  for (const auto& [name, got, want] :
       {std::tuple{"dq", &t16->dq, &ref->dq}, std::tuple{"dk", &t16->dk, &ref->dk},
        std::tuple{"dv", &t16->dv, &ref->dv}}) {
    const ErrorStats e =
        CompareTensor(got->data(), DType::kF32, want->data(), static_cast<int64_t>(want->size()));
    std::printf("    bf16 %s vs fp64 on fp32 inputs: %s\n", name, e.ToString().c_str());
    EXPECT_EQ(e.nan_count, 0);
    worst = std::max(worst, e.rel_l2);
  }
  // Far below the seed's 5e-2: bf16 input rounding alone gives ~4e-3.
  EXPECT_LT(worst, 1e-2) << "seed bar 5e-2";
}

// ---- Refusals and the backends --------------------------------------------------------------

TEST(FlashCpuBackwardTest, Refusals) {
  AttentionBackwardParams bp;
  std::unique_ptr<Buffers> t = MakeBuffers({"Refusals", Shape(8, 8, 2, 2, 64)}, 71, &bp);
  {
    AttentionBackwardParams bad = bp;
    bad.fwd.head_dim = 96;
    const absl::Status s = FlashCpuBackward(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("head_dim 96"), std::string::npos) << s;
  }
  for (const char* field : {"dout", "lse", "dq", "dk"}) {
    AttentionBackwardParams bad = bp;
    if (std::string(field) == "dout") bad.dout = nullptr;
    if (std::string(field) == "lse") bad.lse = nullptr;
    if (std::string(field) == "dq") bad.dq = nullptr;
    if (std::string(field) == "dk") bad.dk = nullptr;
    const absl::Status s = FlashCpuBackward(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(s.message().find(field), std::string::npos) << s;
  }
  {
    AttentionBackwardParams bad = bp;
    bad.out = nullptr;
    EXPECT_EQ(FlashCpuBackward(bad).code(), absl::StatusCode::kInvalidArgument);
    std::vector<float> delta(t->lse.size());
    ASSERT_TRUE(FlashCpuBackwardDelta(bp, delta.data()).ok());
    bad.delta = delta.data();  // out is not needed once D is given
    EXPECT_TRUE(FlashCpuBackward(bad).ok());
  }
  const absl::Status s = FlashCpuBackward(bp, {.num_threads = -1});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("num_threads"), std::string::npos) << s;
}

// Both backends, called as a ring step calls them: a key split, D precomputed by the backend,
// accumulate into the second call.
TEST(CpuBackwardBackendTest, BothBackendsComputeTheSameGradients) {
  for (const char* name : {"cpu", "cpu_reference"}) {
    SCOPED_TRACE(name);
    absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend(name);
    ASSERT_TRUE(backend.ok()) << backend.status();
    EXPECT_EQ((*backend)->name(), name);
    EXPECT_EQ((*backend)->memory_space(), MemorySpace::kHost);

    Case c{"Backend", Softcap(Causal(Dtype(Shape(90, 90, 4, 2, 128), DType::kBF16)), 15.0f), true};
    AttentionBackwardParams bp;
    std::unique_ptr<Buffers> t = MakeBuffers(c, 81, &bp);
    absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(bp);
    ASSERT_TRUE(ref.ok());
    std::vector<float> delta(t->lse.size());
    ASSERT_TRUE((*backend)->ComputeDelta(bp, delta.data()).ok());
    bp.delta = delta.data();
    AttentionBackwardParams second = KeyRange(bp, 40, 90);
    ASSERT_TRUE((*backend)->Backward(KeyRange(bp, 0, 40)).ok());
    second.accumulate = true;
    std::fill(t->dk.begin() + 40 * bp.dk_row_stride, t->dk.end(), 0.0f);
    std::fill(t->dv.begin() + 40 * bp.dv_row_stride, t->dv.end(), 0.0f);
    ASSERT_TRUE((*backend)->Backward(second).ok());
    ExpectMatches(*t, *ref);

    AttentionBackwardParams bad = bp;
    bad.fwd.head_dim = 96;
    EXPECT_EQ((*backend)->Backward(bad).code(), absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace ringattn
