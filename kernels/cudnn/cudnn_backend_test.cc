// The cudnn backend.
//
// Host-only (run everywhere, no device needed):
//   - the expressibility rules: PlanCudnnCall against KeyAllowed (score_mod.h) for every
//     (query, key) pair of thousands of random calls (sizes, offsets, equal and unequal
//     position strides, causal, windows), with the plan's invariants (bounds cuDNN accepts,
//     no fully masked row handed to cuDNN, a tight live block), and named ring cases;
//   - refusals: InvalidArgument naming the option (dtype, alibi_slopes, softcap, strides,
//     alignment), from PlanCudnnCall, CudnnSupports and Forward alike (Forward refuses before
//     touching a device);
//   - the factory (name, memory space, AsCudnnBackend).
// GPU (every case skips without a CUDA device, so ctest passes here):
//   - a sweep against the fp64 CPU reference (ReferenceForward) at awkward sizes (seq 1, 7, 255,
//     1000; 5 heads; GQA 8:2, 8:1; d 64/128 (256 in its own suite); bf16/fp16; o in fp32/bf16/
//     fp16), causal top-left, the ring's diagonal / visible / masked steps, stripe steps, windows
//     (left, right, both, with s_q > s_k: the padding-mask path); every case also against the
//     "cuda_reference" backend (to tell a cuDNN failure from a reference one);
//   - merge_into_output: two key halves merged against one call (and rows the second call adds
//     nothing to stay bit-identical);
//   - the graph cache: a repeated shape does not rebuild (graph_builds());
//   - dynamic shapes (sdpa_graph_cache.h): which keys share a kernel class, the options from
//     the environment (host only); one backend per mode (static, dynamic, dynamic after
//     Prewarm) through calls of many lengths sharing classes (seq 1, 7, 3816; 5 heads; GQA;
//     other scales and band bounds), each against the fp64 reference;
//   - outputs poisoned with NaN before every call (cudaMemset 0xff), so an unwritten element
//     fails; strided views leave everything outside the view untouched;
//   - background builds: the first call of a shape runs our kernel while the graph builds, the
//     next one cuDNN (seq 7, 3816; 5:1 heads), both against the fp64 reference; off by default;
//   - fully masked rows, empty calls, null lse, streams, workspace growth.
// A failing case prints the mask plan (which cuDNN band/padding options were used) and the
// error statistics with the first and worst elements as (batch, row, head, column).
//
// Tolerances (against the fp64 reference fed the same dtype-rounded inputs):
//   o: relative L2 <= 1e-2 when bf16 is involved (input or output dtype), <= 2e-3 for fp16;
//      per element |got - want| <= atol + rtol |want| with atol 3e-2 (bf16 inputs) / 4e-3
//      (fp16 inputs) and rtol 1.01 * max(u(dtype), u(o_dtype)): cuDNN rounds P to the input
//      dtype for P.V and its O is always stored in the input dtype (then converted or merged);
//   lse: |got - want| <= 1e-3 + 1e-5 |want| (fp32 softmax statistics); -inf must match exactly.
#include "kernels/cudnn/cudnn_backend.h"

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
#include <optional>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_params.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/cpu/test_util.h"
#include "kernels/cuda/gpu_test_util.h"
#include "kernels/cudnn/cudnn_context.h"
#include "kernels/cudnn/graph_mode_test_util.h"
#include "kernels/cudnn/merge_kernel.h"
#include "kernels/cudnn/sdpa_graph_cache.h"
#include "kernels/params_check.h"
#include "kernels/score_mod.h"
#include "kernels/softmax_state.h"

namespace ringattn {

// gtest prints a class by its ToString.
void PrintTo(const SdpaKernelClass& c, std::ostream* os) { *os << c.ToString(); }

namespace {

using kernel_testing::AttentionBuffers;
using kernel_testing::Causal;
using kernel_testing::DeviceBuffer;
using kernel_testing::DeviceTensors;
using kernel_testing::ExpectGraphStatsOfMode;
using kernel_testing::ExpectNothingWrittenOutsideTheView;
using kernel_testing::FromDevice;
using kernel_testing::GatherLse;
using kernel_testing::GatherO;
using kernel_testing::GpuAvailable;
using kernel_testing::GpuTest;
using kernel_testing::GraphMode;
using kernel_testing::GraphModeName;
using kernel_testing::KeyRange;
using kernel_testing::LsePlace;
using kernel_testing::MakeAttentionBuffers;
using kernel_testing::MakeCudnnInMode;
using kernel_testing::OPlace;
using kernel_testing::PadStrides;
using kernel_testing::Positions;
using kernel_testing::Shape;
using kernel_testing::StridedBuffers;
using kernel_testing::ToDevice;
using kernel_testing::TypedBuffer;
using kernel_testing::UnitRoundoff;
using kernel_testing::Window;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kOpen = kUnboundedWindow;

// The registered "cudnn" backend.
std::unique_ptr<AttentionBackend> MakeCudnn() {
  absl::StatusOr<std::unique_ptr<AttentionBackend>> b = MakeBackend("cudnn");
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? *std::move(b) : nullptr;
}

// ---- Building params ------------------------------------------------------------------------

// Host-only rule tests: pointers that are 16-byte aligned and never read.
alignas(256) char g_fake_tensor[256];

AttentionParams WithFakePointers(AttentionParams p) {
  p.q = p.k = p.v = g_fake_tensor;
  p.o = g_fake_tensor;
  p.lse = reinterpret_cast<float*>(g_fake_tensor);
  SetContiguousStrides(&p);
  return p;
}

std::string Describe(const AttentionParams& p) {
  return absl::StrCat("{s_q=", p.seqlen_q, " s_k=", p.seqlen_k, " q_pos=", p.q_pos_offset, "+i*",
                      p.q_pos_stride, " k_pos=", p.k_pos_offset, "+j*", p.k_pos_stride,
                      " causal=", p.causal, " window=(", p.window_left, ",", p.window_right, ")}");
}

// ---- Host-only: the rules -------------------------------------------------------------------

// Checks a successful plan against KeyAllowed for every pair, and the plan's invariants.
::testing::AssertionResult PlanIsExact(const AttentionParams& p, const CudnnMaskPlan& plan) {
  auto fail = [&](const std::string& what) {
    return ::testing::AssertionFailure()
           << what << " for " << Describe(p) << " plan " << plan.ToString();
  };
  int64_t allowed = 0;
  for (int64_t i = 0; i < p.seqlen_q; ++i) {
    for (int64_t j = 0; j < p.seqlen_k; ++j) {
      const bool want = KeyAllowed(p, QueryPos(p, i), KeyPos(p, j));
      if (plan.Allows(i, j) != want) {
        return fail(absl::StrCat("pair (i=", i, ", j=", j, "): plan ", plan.Allows(i, j),
                                 ", KeyAllowed ", want));
      }
      allowed += want;
    }
  }
  if (plan.empty) {
    if (allowed != 0) return fail("empty plan with allowed pairs");
    return ::testing::AssertionSuccess();
  }
  if (plan.q_count <= 0 || plan.k_count <= 0 || plan.q_begin < 0 || plan.k_begin < 0 ||
      plan.q_begin + plan.q_count > p.seqlen_q || plan.k_begin + plan.k_count > p.seqlen_k) {
    return fail("live block outside the call");
  }
  if (plan.has_right_bound && plan.right_bound < 0) return fail("right_bound < 0");
  if (plan.has_left_bound && plan.left_bound < 1) return fail("left_bound < 1");
  if (plan.has_left_bound && !plan.has_right_bound) return fail("left bound without right bound");
  if (plan.padding_mask != (plan.has_left_bound && plan.q_count > plan.k_count)) {
    return fail("padding_mask not exactly (left bound and s_q > s_k)");
  }
  // cuDNN never sees a fully masked row; the block is tight (first/last key of the block used).
  for (int64_t i = plan.q_begin; i < plan.q_begin + plan.q_count; ++i) {
    bool any = false;
    for (int64_t j = plan.k_begin; j < plan.k_begin + plan.k_count && !any; ++j) {
      any = plan.Allows(i, j);
    }
    if (!any) return fail(absl::StrCat("live row ", i, " has no allowed key"));
  }
  for (int64_t j : {plan.k_begin, plan.k_begin + plan.k_count - 1}) {
    bool any = false;
    for (int64_t i = plan.q_begin; i < plan.q_begin + plan.q_count && !any; ++i) {
      any = plan.Allows(i, j);
    }
    if (!any) return fail(absl::StrCat("edge key ", j, " of the block is seen by no row"));
  }
  // A bound is only set when it masks something.
  if (plan.has_right_bound && plan.right_bound >= plan.k_count - 1 && !plan.has_left_bound) {
    return fail("vacuous right bound without a left bound");
  }
  if (plan.has_left_bound && plan.left_bound >= plan.q_count) return fail("vacuous left bound");
  return ::testing::AssertionSuccess();
}

TEST(CudnnRulesTest, PlanMatchesKeyAllowedForEveryPairOfRandomCalls) {
  std::mt19937 rng(20240611);
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  int empty = 0, unmasked = 0, right_only = 0, left = 0, padding = 0, refused = 0, trimmed = 0;
  for (int iter = 0; iter < 30000; ++iter) {
    const int64_t sq = uniform(1, 20), sk = uniform(1, 20);
    const int64_t qs = uniform(1, 3);
    const int64_t ks = uniform(0, 3) == 0 ? uniform(1, 3) : qs;  // mostly equal strides
    AttentionParams p =
        Positions(Shape(sq, sk, 2, 1, 64), uniform(-40, 40), qs, uniform(-40, 40), ks);
    p.causal = uniform(0, 1) == 1;
    p.window_left = uniform(0, 2) == 0 ? kOpen : uniform(0, 15);
    p.window_right = uniform(0, 2) == 0 ? kOpen : uniform(0, 15);
    p = WithFakePointers(p);
    const absl::StatusOr<CudnnMaskPlan> plan = PlanCudnnCall(p);
    if (!plan.ok()) {
      ++refused;
      ASSERT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << plan.status();
      ASSERT_NE(plan.status().message().find("q_pos_stride"), std::string::npos) << plan.status();
      ASSERT_NE(p.q_pos_stride, p.k_pos_stride) << "refused an equal-stride call " << Describe(p);
      int64_t allowed = 0;
      for (int64_t i = 0; i < sq; ++i) {
        for (int64_t j = 0; j < sk; ++j) allowed += KeyAllowed(p, QueryPos(p, i), KeyPos(p, j));
      }
      ASSERT_LT(allowed, sq * sk) << "refused a call whose every pair is allowed " << Describe(p);
      continue;
    }
    ASSERT_TRUE(PlanIsExact(p, *plan));
    if (plan->empty) {
      ++empty;
    } else if (!plan->has_left_bound && !plan->has_right_bound) {
      ++unmasked;
    } else if (!plan->has_left_bound) {
      ++right_only;
    } else {
      ++left;
    }
    padding += plan->padding_mask;
    trimmed += !plan->empty && (plan->q_count < sq || plan->k_count < sk);
  }
  // Every branch of the rules was exercised.
  EXPECT_GT(empty, 100);
  EXPECT_GT(unmasked, 100);
  EXPECT_GT(right_only, 100);
  EXPECT_GT(left, 100);
  EXPECT_GT(padding, 20);
  EXPECT_GT(refused, 20);
  EXPECT_GT(trimmed, 100);
  RecordProperty("empty", empty);
  RecordProperty("unmasked", unmasked);
  RecordProperty("right_only", right_only);
  RecordProperty("left", left);
  RecordProperty("padding", padding);
  RecordProperty("refused", refused);
}

TEST(CudnnRulesTest, HugePositionsDoNotOverflow) {
  const int64_t big = int64_t{1} << 61;
  for (const AttentionParams& base :
       {Causal(Positions(Shape(9, 11, 2, 2, 64), big, 1, big - 5, 1)),
        Window(Positions(Shape(9, 11, 2, 2, 64), -big, 3, -big + 4, 3), 7, 2),
        Window(Causal(Positions(Shape(9, 11, 2, 2, 64), big, 2, -big, 2)), 1000, kOpen),
        Window(Positions(Shape(9, 11, 2, 2, 64), 0, 1, 0, 1), big, big)}) {
    const AttentionParams p = WithFakePointers(base);
    const absl::StatusOr<CudnnMaskPlan> plan = PlanCudnnCall(p);
    ASSERT_TRUE(plan.ok()) << plan.status() << " " << Describe(p);
    EXPECT_TRUE(PlanIsExact(p, *plan));
  }
}

// The plans of the calls a ring makes, spelled out.
TEST(CudnnRulesTest, RingStepPlans) {
  const int64_t s = 256;
  struct Expect {
    const char* name;
    AttentionParams p;
    bool empty;
    bool right;
    int64_t right_bound;
    bool left;
    int64_t left_bound;
    int64_t q_begin, q_count, k_begin, k_count;
    bool padding;
  };
  const Expect cases[] = {
      // Contiguous causal ring: diagonal step = top-left causal, no trim.
      {"Diagonal", Causal(Positions(Shape(s, s, 4, 2, 64), 3 * s, 1, 3 * s, 1)), false, true, 0,
       false, 0, 0, s, 0, s, false},
      // Key shard before the query shard: every pair allowed, unmasked.
      {"Visible", Causal(Positions(Shape(s, s, 4, 2, 64), 3 * s, 1, s, 1)), false, false, 0, false,
       0, 0, s, 0, s, false},
      // Key shard after the query shard: nothing (the ring skips it; the plan is empty).
      {"Masked", Causal(Positions(Shape(s, s, 4, 2, 64), s, 1, 3 * s, 1)), true, false, 0, false, 0,
       0, 0, 0, 0, false},
      // Stripe (rank 1 of 4 against rank 0's keys): k_pos <= q_pos <=> j <= i.
      {"StripeAfter", Causal(Positions(Shape(s, s, 4, 2, 64), 1, 4, 0, 4)), false, true, 0, false,
       0, 0, s, 0, s, false},
      // Stripe (rank 0 against rank 1's keys): 4j + 1 <= 4i <=> j <= i - 1: row 0 sees nothing,
      // the last key nobody: trimmed to rows [1, s) and keys [0, s - 1), then j' <= i'.
      {"StripeBefore", Causal(Positions(Shape(s, s, 4, 2, 64), 0, 4, 1, 4)), false, true, 0, false,
       0, 1, s - 1, 0, s - 1, false},
      // Uneven shards (s_q = s_k + 1) on the diagonal, causal: top-left with s_q > s_k.
      {"DiagonalUneven", Causal(Positions(Shape(s + 1, s, 4, 2, 64), 0, 1, 0, 1)), false, true, 0,
       false, 0, 0, s + 1, 0, s, false},
      // Sliding window 100 on the diagonal: band [i - 100, i].
      {"WindowDiagonal", Window(Causal(Shape(s, s, 4, 2, 64)), 100, kOpen), false, true, 0, true,
       101, 0, s, 0, s, false},
      // Sliding window 100, previous shard: only the last 100 keys, for the first 100 rows.
      // Keys [s - 100, s) in live indices: j' >= i' (left bound 1), the right side is open (the
      // vacuous bound k_count - 1 = 99).
      {"WindowPrevShard", Window(Causal(Positions(Shape(s, s, 4, 2, 64), s, 1, 0, 1)), 100, kOpen),
       false, true, 99, true, 1, 0, 100, s - 100, 100, false},
      // Left-only window (not causal): right side open, paired with the vacuous bound s_k - 1.
      {"WindowLeftOnly", Window(Shape(s, s, 4, 2, 64), 17, kOpen), false, true, s - 1, true, 18, 0,
       s, 0, s, false},
      // Window with s_q > s_k: the full-length padding mask lifts cuDNN's s_q <= s_kv limit.
      {"WindowMoreRowsThanKeys", Window(Shape(255, 7, 4, 2, 64), 17, kOpen), false, true, 6, true,
       18, 0, 24, 0, 7, true},
      // Right-only window: j <= i + 5.
      {"WindowRightOnly", Window(Shape(s, s, 4, 2, 64), kOpen, 5), false, true, 5, false, 0, 0, s,
       0, s, false},
  };
  for (const Expect& c : cases) {
    SCOPED_TRACE(c.name);
    const AttentionParams p = WithFakePointers(c.p);
    const absl::StatusOr<CudnnMaskPlan> plan = PlanCudnnCall(p);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_TRUE(PlanIsExact(p, *plan));
    EXPECT_EQ(plan->empty, c.empty) << plan->ToString();
    if (c.empty) continue;
    EXPECT_EQ(plan->has_right_bound, c.right) << plan->ToString();
    if (c.right) EXPECT_EQ(plan->right_bound, c.right_bound) << plan->ToString();
    EXPECT_EQ(plan->has_left_bound, c.left) << plan->ToString();
    if (c.left) EXPECT_EQ(plan->left_bound, c.left_bound) << plan->ToString();
    EXPECT_EQ(plan->q_begin, c.q_begin) << plan->ToString();
    EXPECT_EQ(plan->q_count, c.q_count) << plan->ToString();
    EXPECT_EQ(plan->k_begin, c.k_begin) << plan->ToString();
    EXPECT_EQ(plan->k_count, c.k_count) << plan->ToString();
    EXPECT_EQ(plan->padding_mask, c.padding) << plan->ToString();
    EXPECT_TRUE(CudnnSupports(p).ok()) << CudnnSupports(p);
  }
}

struct Refusal {
  const char* name;
  AttentionParams p;
  const char* message;  // a substring the InvalidArgument message must hold
};

std::vector<Refusal> Refusals() {
  std::vector<Refusal> r;
  r.push_back({"Fp32", WithFakePointers(Shape(8, 8, 2, 2, 64, DType::kF32, DType::kF32)),
               "got dtype fp32"});
  {
    AttentionParams p = WithFakePointers(Shape(8, 8, 2, 2, 64));
    static const float slopes[2] = {0.5f, 0.25f};
    p.alibi_slopes = slopes;
    r.push_back(
        {"Alibi", p, "the cudnn backend does not support alibi_slopes; use the cuda backend"});
  }
  {
    AttentionParams p = WithFakePointers(Shape(8, 8, 2, 2, 64));
    p.partial_o = reinterpret_cast<const float*>(g_fake_tensor);
    p.partial_lse = reinterpret_cast<const float*>(g_fake_tensor);
    r.push_back({"PartialInput", p, "does not support partial_o"});
  }
  {
    AttentionParams p = WithFakePointers(Shape(8, 8, 2, 2, 64));
    p.softcap = 30.0f;
    r.push_back({"Softcap", p, "the cudnn backend does not support softcap"});
  }
  r.push_back({"UnequalStridesCausalCut",
               WithFakePointers(Causal(Positions(Shape(20, 20, 2, 2, 64), 0, 2, 0, 3))),
               "q_pos_stride (2) != k_pos_stride (3)"});
  r.push_back({"UnequalStridesWindow",
               WithFakePointers(Window(Positions(Shape(20, 20, 2, 2, 64), 0, 2, 0, 3), 0, 0)),
               "q_pos_stride"});
  {
    AttentionParams p = WithFakePointers(Shape(8, 8, 2, 2, 64));
    p.q_row_stride = 2 * 64 + 4;  // 8-byte aligned rows
    p.q_batch_stride = 8 * p.q_row_stride;
    r.push_back({"MisalignedQRows", p, "q_row_stride = 132"});
  }
  {
    AttentionParams p = WithFakePointers(Shape(8, 8, 2, 2, 64));
    p.k = g_fake_tensor + 2;
    r.push_back({"MisalignedKPointer", p, "got k (pointer not 16-byte aligned)"});
  }
  {
    AttentionParams p = WithFakePointers(Shape(8, 8, 2, 2, 64));
    p.v_head_stride = 68;
    p.v_row_stride = 2 * 68;
    p.v_batch_stride = 8 * p.v_row_stride;
    r.push_back({"MisalignedVHeads", p, "v_head_stride = 68"});
  }
  return r;
}

TEST(CudnnRulesTest, RefusesWhatCudnnCannotExpressNamingTheOption) {
  for (const Refusal& c : Refusals()) {
    SCOPED_TRACE(c.name);
    const absl::Status s = CudnnSupports(c.p);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(c.message), std::string::npos) << s;
  }
}

TEST(CudnnRulesTest, AcceptsWhatItShould) {
  const AttentionParams accepted[] = {
      Shape(1, 1, 2, 2, 64),
      Shape(7, 7, 5, 5, 64, DType::kF16, DType::kF16),
      Shape(255, 255, 8, 2, 128, DType::kBF16, DType::kF32),
      Shape(255, 255, 8, 1, 256, DType::kF16, DType::kBF16),
      // Unequal strides are fine unmasked, or when the mask allows every pair or none.
      Positions(Shape(20, 20, 2, 2, 64), 0, 2, 0, 3),
      Causal(Positions(Shape(20, 20, 2, 2, 64), 1000, 2, 0, 3)),
      Causal(Positions(Shape(20, 20, 2, 2, 64), 0, 2, 1000, 3)),
  };
  for (const AttentionParams& base : accepted) {
    const AttentionParams p = WithFakePointers(base);
    EXPECT_TRUE(CudnnSupports(p).ok()) << CudnnSupports(p) << " " << Describe(p);
  }
  // Misaligned q rows are irrelevant when the call computes nothing.
  AttentionParams nothing =
      WithFakePointers(Causal(Positions(Shape(8, 8, 2, 2, 64), 0, 1, 100, 1)));
  nothing.q_row_stride = 132;
  EXPECT_TRUE(CudnnSupports(nothing).ok()) << CudnnSupports(nothing);
  // Misaligned o is not refused (written through the scratch buffer instead).
  AttentionParams p = WithFakePointers(Shape(8, 8, 2, 2, 64));
  p.o = g_fake_tensor + 2;
  EXPECT_TRUE(CudnnSupports(p).ok()) << CudnnSupports(p);
  // And ValidateParams runs first.
  AttentionParams bad = WithFakePointers(Shape(8, 8, 2, 2, 96));
  const absl::Status s = CudnnSupports(bad);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("unsupported head_dim 96"), std::string::npos) << s;
}

TEST(CudnnBackendFactoryTest, NameMemorySpaceAndAccessors) {
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  ASSERT_NE(backend, nullptr);
  EXPECT_EQ(backend->name(), "cudnn");
  EXPECT_EQ(backend->memory_space(), MemorySpace::kDevice);
  CudnnBackend* cudnn = AsCudnnBackend(backend.get());
  ASSERT_NE(cudnn, nullptr);
  EXPECT_EQ(cudnn->graph_builds(), 0);
  EXPECT_EQ(cudnn->workspace_bytes(), 0);
}

// Refusals come from Forward too, before any device call (this runs without a GPU); with fp32
// inputs too, which Forward takes through 16-bit copies (fp32_inputs.h) but checks first.
TEST(CudnnBackendFactoryTest, ForwardRefusesBeforeTouchingTheDevice) {
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  for (const Refusal& c : Refusals()) {
    if (c.p.dtype == DType::kF32) continue;  // CudnnSupports' refusal; Forward rounds them
    // Misaligned inputs are no refusal in fp32: the aligned copies are what cuDNN reads.
    const bool layout = absl::StartsWith(c.name, "Misaligned");
    for (const DType dtype : {c.p.dtype, DType::kF32}) {
      if (layout && dtype == DType::kF32) continue;
      SCOPED_TRACE(absl::StrCat(c.name, " ", std::string(DTypeName(dtype))));
      AttentionParams p = c.p;
      p.dtype = dtype;
      const absl::Status s = backend->Forward(p);
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
      EXPECT_NE(s.message().find(c.message), std::string::npos) << s;
    }
  }
  EXPECT_EQ(AsCudnnBackend(backend.get())->graph_builds(), 0);
}

// ---- Dynamic shapes: kernel classes and options (host only) ----------------------------------

// The graph key the forward makes for `p` (o written in place, as with a bf16/fp16 o).
SdpaGraphKey ForwardKeyOf(const AttentionParams& p) {
  const absl::StatusOr<CudnnMaskPlan> plan = PlanCudnnCall(p);
  EXPECT_TRUE(plan.ok()) << plan.status();
  SdpaGraphKey key = PlannedGraphKey(p, plan.ok() ? *plan : CudnnMaskPlan());
  key.o_stride[0] = p.o_batch_stride;
  key.o_stride[1] = p.o_head_stride;
  key.o_stride[2] = p.o_row_stride;
  return key;
}

constexpr int64_t kCudnn919 = 91900;

TEST(CudnnKernelClassTest, SizesStridesAndScalarValuesShareAClass) {
  const SdpaGraphKey base = ForwardKeyOf(WithFakePointers(Causal(Shape(4096, 4096, 32, 8, 128))));
  const SdpaKernelClass cls = KernelClassOf(base, kCudnn919);
  EXPECT_TRUE(cls.has_right_bound && !cls.right_bound_shift) << cls.ToString();
  const AttentionParams others[] = {
      Causal(Shape(5000, 5000, 32, 8, 128)),
      Causal(Shape(7, 7, 5, 5, 128)),
      Causal(Shape(2, 2, 2, 1, 128)),
      Causal(Shape(12345, 12345, 32, 8, 128, DType::kBF16, DType::kBF16, /*batch=*/3)),
      Causal(Shape(3816, 3816, 8, 2, 128)),  // GQA is no class of its own forward
  };
  for (const AttentionParams& o : others) {
    SCOPED_TRACE(Describe(o));
    EXPECT_EQ(KernelClassOf(ForwardKeyOf(WithFakePointers(o)), kCudnn919), cls);
  }
  SdpaGraphKey scaled = base;  // the scale and the band bounds are by-value operands
  scaled.scale_bits ^= 0x1234;
  EXPECT_EQ(KernelClassOf(scaled, kCudnn919), cls);
  SdpaGraphKey scratch_o = base;  // a packed scratch O: other strides, same order
  scratch_o.o_stride[0] *= 2;
  EXPECT_EQ(KernelClassOf(scratch_o, kCudnn919), cls);
  const SdpaGraphKey w1 = ForwardKeyOf(WithFakePointers(Window(Shape(255, 255, 2, 2, 64), 17, 3)));
  const SdpaGraphKey w2 = ForwardKeyOf(WithFakePointers(Window(Shape(300, 300, 4, 4, 64), 40, 9)));
  ASSERT_TRUE(w1.has_left_bound && w1.left_bound != w2.left_bound);
  EXPECT_EQ(KernelClassOf(w1, kCudnn919), KernelClassOf(w2, kCudnn919));
}

TEST(CudnnKernelClassTest, WhatShapesTheKernelMakesAnotherClass) {
  const SdpaGraphKey base = ForwardKeyOf(WithFakePointers(Causal(Shape(4096, 4096, 32, 8, 128))));
  const SdpaKernelClass cls = KernelClassOf(base, kCudnn919);
  std::vector<std::pair<std::string, SdpaGraphKey>> variants;
  auto add = [&](const std::string& name, const std::function<void(SdpaGraphKey&)>& change) {
    SdpaGraphKey k = base;
    change(k);
    variants.emplace_back(name, k);
  };
  add("fp16", [](SdpaGraphKey& k) { k.dtype = DType::kF16; });
  add("d64", [](SdpaGraphKey& k) { k.head_dim = 64; });
  add("backward", [](SdpaGraphKey& k) { k.backward = true; });
  add("unmasked", [](SdpaGraphKey& k) { k.has_right_bound = false; });
  add("shifted right bound", [](SdpaGraphKey& k) { k.right_bound = 5; });
  add("left bound", [](SdpaGraphKey& k) {
    k.has_left_bound = true;
    k.left_bound = 17;
  });
  add("padding mask", [](SdpaGraphKey& k) { k.padding_mask = true; });
  add("q [b, h, s, d]", [](SdpaGraphKey& k) {
    k.q_stride[1] = k.seqlen_q * k.head_dim;
    k.q_stride[2] = k.head_dim;
  });
  std::unordered_set<SdpaKernelClass, SdpaKernelClassHash> seen = {cls};
  for (const auto& [name, key] : variants) {
    SCOPED_TRACE(name);
    EXPECT_TRUE(seen.insert(KernelClassOf(key, kCudnn919)).second)
        << KernelClassOf(key, kCudnn919).ToString();
  }
  // A [b, h, s, d] layout means nothing with one head.
  SdpaGraphKey one_head = base;
  one_head.heads = one_head.heads_k = 1;
  one_head.q_stride[1] = one_head.seqlen_q * one_head.head_dim;
  EXPECT_EQ(KernelClassOf(one_head, kCudnn919), cls);
  // The backward: GQA adds a reduction; cuDNN <= 9.15 a padding mask where s_kv % 128 != 0.
  SdpaGraphKey bwd = base;
  bwd.backward = true;
  SdpaGraphKey bwd_mha = bwd;
  bwd_mha.heads_k = bwd_mha.heads;
  EXPECT_NE(KernelClassOf(bwd, kCudnn919), KernelClassOf(bwd_mha, kCudnn919));
  SdpaGraphKey bwd_tail = bwd;
  bwd_tail.seqlen_k = 4000;
  EXPECT_EQ(KernelClassOf(bwd, kCudnn919), KernelClassOf(bwd_tail, kCudnn919));
  EXPECT_NE(KernelClassOf(bwd, 91500), KernelClassOf(bwd_tail, 91500));
}

// Prewarm must compile the classes real calls meet: one key per class, and the bf16/fp16
// d64/d128 causal and unmasked self-attention calls (GQA or not) land in them.
TEST(CudnnKernelClassTest, PrewarmKeysAreTheClassesOfRealCalls) {
  CudnnPrewarmSpec spec;
  spec.backward = true;
  const std::vector<SdpaGraphKey> keys = PrewarmKeys(spec);
  EXPECT_EQ(keys.size(), 2u * 2u * 2u * (1u + 2u));  // dtypes x dims x masks x (fwd + 2 bwd)
  std::unordered_set<SdpaKernelClass, SdpaKernelClassHash> classes;
  for (const SdpaGraphKey& k : keys) classes.insert(KernelClassOf(k, kCudnn919));
  EXPECT_EQ(classes.size(), keys.size());
  for (DType t : {DType::kBF16, DType::kF16}) {
    for (int d : {64, 128}) {
      for (bool causal : {false, true}) {
        for (int hk : {32, 8}) {
          AttentionParams p = Shape(5000, 5000, 32, hk, d, t, t);
          if (causal) p = Causal(p);
          SCOPED_TRACE(Describe(p));
          SdpaGraphKey fwd = ForwardKeyOf(WithFakePointers(p));
          EXPECT_EQ(classes.count(KernelClassOf(fwd, kCudnn919)), 1u)
              << KernelClassOf(fwd, kCudnn919).ToString();
          SdpaGraphKey bwd = fwd;  // out and dout laid out like o
          bwd.backward = true;
          for (int i = 0; i < 3; ++i) bwd.do_stride[i] = bwd.o_stride[i];
          EXPECT_EQ(classes.count(KernelClassOf(bwd, kCudnn919)), 1u)
              << KernelClassOf(bwd, kCudnn919).ToString();
        }
      }
    }
  }
}

// Sets an environment variable for one scope, restoring it after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name); old != nullptr) old_ = old;
    if (value == nullptr) {
      unsetenv(name);
    } else {
      setenv(name, value, 1);
    }
  }
  ~ScopedEnv() {
    if (old_.has_value()) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(CudnnBackendOptionsTest, DynamicShapesFromTheEnvironment) {
  for (const char* on : {"1", "true", "on"}) {
    ScopedEnv env(kCudnnDynamicEnv, on);
    absl::StatusOr<CudnnBackendOptions> o = CudnnBackendOptionsFromEnv();
    ASSERT_TRUE(o.ok()) << o.status();
    EXPECT_TRUE(o->dynamic_shapes) << on;
  }
  for (const char* off : {static_cast<const char*>(nullptr), "", "0", "false", "off"}) {
    ScopedEnv env(kCudnnDynamicEnv, off);
    absl::StatusOr<CudnnBackendOptions> o = CudnnBackendOptionsFromEnv();
    ASSERT_TRUE(o.ok()) << o.status();
    EXPECT_FALSE(o->dynamic_shapes) << (off == nullptr ? "unset" : off);
  }
  ScopedEnv env(kCudnnDynamicEnv, "maybe");
  const absl::Status s = CudnnBackendOptionsFromEnv().status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("RINGATTN_CUDNN_DYNAMIC='maybe'"), std::string::npos) << s;
  // The registered backend falls back to the defaults.
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  ASSERT_NE(backend, nullptr);
  EXPECT_FALSE(AsCudnnBackend(backend.get())->dynamic_shapes());
}

TEST(CudnnBackendFactoryTest, StaticBackendPrewarmsNothing) {
  std::unique_ptr<CudnnBackend> backend = MakeCudnnBackend({.dynamic_shapes = false});
  EXPECT_FALSE(backend->dynamic_shapes());
  EXPECT_TRUE(backend->Prewarm(CudnnPrewarmSpec()).ok());  // touches no device
  EXPECT_EQ(backend->graph_builds(), 0);
  EXPECT_FALSE(MakeCudnnBackend({})->dynamic_shapes());
  EXPECT_EQ(MakeCudnnBackend({.dynamic_shapes = true})->dynamic_shapes(),
            cudnnGetVersion() >= 90500);
}

// ---- Device plumbing ------------------------------------------------------------------------

TEST(CudnnBackendFactoryTest, WithoutADeviceForwardFailsCleanly) {
  if (GpuAvailable()) GTEST_SKIP() << "a CUDA device is present";
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  const absl::Status s = backend->Forward(WithFakePointers(Causal(Shape(8, 8, 2, 2, 64))));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

// Runs `p` on `backend` and waits for the device.
absl::Status RunAndWait(AttentionBackend& backend, const AttentionParams& p) {
  if (absl::Status s = backend.Forward(p); !s.ok()) return s;
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    return absl::InternalError(absl::StrCat(std::string(backend.name()), ": kernel failed: ",
                                            cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
  }
  return absl::OkStatus();
}

std::unique_ptr<AttentionBackend> CudaReference() {
  absl::StatusOr<std::unique_ptr<AttentionBackend>> b = MakeBackend("cuda_reference");
  if (!b.ok()) {
    ADD_FAILURE() << b.status();
    return nullptr;
  }
  return *std::move(b);
}

// The plan a failing case should print.
std::string PlanOf(const AttentionParams& p) {
  const absl::StatusOr<CudnnMaskPlan> plan = PlanCudnnCall(p);
  return plan.ok() ? plan->ToString() : std::string(plan.status().message());
}

// ---- Checking -------------------------------------------------------------------------------

struct Tolerance {
  double o_rel_l2, o_atol, o_rtol, lse_atol, lse_rtol;
};

// See the top of the file.
Tolerance CudnnTolerance(const AttentionParams& p) {
  const bool bf16 = p.dtype == DType::kBF16 || p.o_dtype == DType::kBF16;
  const double rtol = 1.01 * std::max(UnitRoundoff(p.dtype), UnitRoundoff(p.o_dtype));
  return {bf16 ? 1e-2 : 2e-3, p.dtype == DType::kBF16 ? 3e-2 : 4e-3, rtol, 1e-3, 1e-5};
}

// got[i] against want[i]: every element within atol + rtol |want| (infinities exactly), no NaN,
// relative L2 within rel_l2 (< 0: not checked).
::testing::AssertionResult Matches(const char* what, const std::vector<double>& got,
                                   const std::vector<double>& want, double atol, double rtol,
                                   double rel_l2,
                                   const std::function<std::string(int64_t)>& place) {
  ErrorAccumulator acc;
  int64_t violations = 0, first_bad = -1, first_nan = -1, worst = -1;
  double worst_err = -1.0;
  for (size_t n = 0; n < got.size(); ++n) {
    const int64_t i = static_cast<int64_t>(n);
    const double g = got[n], w = want[n];
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
    if (bad && violations++ == 0) first_bad = i;
  }
  const ErrorStats stats = acc.Finish();
  if (violations == 0 && (rel_l2 < 0 || stats.rel_l2 <= rel_l2)) {
    return ::testing::AssertionSuccess();
  }
  ::testing::AssertionResult r = ::testing::AssertionFailure();
  r << what << ": " << stats.ToString() << " (allowed rel_l2 " << rel_l2 << ", per element " << atol
    << " + " << rtol << "|want|); " << violations << " bad elements";
  if (first_bad >= 0) {
    r << "; first bad " << place(first_bad) << " got " << got[first_bad] << " want "
      << want[first_bad];
  }
  if (worst >= 0)
    r << "; worst " << place(worst) << " got " << got[worst] << " want " << want[worst];
  if (first_nan >= 0) r << "; first NaN at " << place(first_nan);
  return r;
}

void ExpectMatches(const char* against, const AttentionParams& p, const AttentionBuffers& t,
                   const ReferenceResult& want, const Tolerance& tol) {
  EXPECT_TRUE(Matches("o", GatherO(p, t.o), want.o, tol.o_atol, tol.o_rtol, tol.o_rel_l2,
                      [&](int64_t i) { return OPlace(p, i); }))
      << "against " << against << "; plan " << PlanOf(p);
  if (p.lse == nullptr) return;
  EXPECT_TRUE(Matches("lse", GatherLse(p, t.lse), want.lse, tol.lse_atol, tol.lse_rtol, -1.0,
                      [&](int64_t i) { return LsePlace(p, i); }))
      << "against " << against << "; plan " << PlanOf(p);
}

ReferenceResult AsResult(const AttentionParams& p, const AttentionBuffers& t) {
  ReferenceResult r;
  r.o = GatherO(p, t.o);
  r.lse = GatherLse(p, t.lse);
  return r;
}

uint32_t SeedOf(const std::string& name) {
  return static_cast<uint32_t>(std::hash<std::string>{}(name));
}

struct Case {
  std::string name;
  AttentionParams p;
};

// One case run on a backend: the host call, its buffers (outputs as the backend wrote them),
// the device copies and the fp64 reference result.
struct CaseRun {
  AttentionParams host;
  AttentionBuffers t;
  DeviceTensors d;
  AttentionParams p;  // host's, pointing at d
  ReferenceResult ref;
};

// Runs the case on `backend` and checks it against the fp64 reference (fatal failures: call it
// inside ASSERT_NO_FATAL_FAILURE).
void RunAgainstReference(AttentionBackend& backend, const Case& c, CaseRun* run) {
  run->host = c.p;
  run->t = MakeAttentionBuffers(&run->host, SeedOf(c.name));
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(run->host);
  ASSERT_TRUE(ref.ok()) << ref.status();
  run->ref = *std::move(ref);
  run->p = ToDevice(run->host, run->t, &run->d);
  const absl::Status s = RunAndWait(backend, run->p);
  ASSERT_TRUE(s.ok()) << s;
  FromDevice(run->d, &run->t);
  ExpectMatches("fp64 reference", run->host, run->t, run->ref, CudnnTolerance(run->host));
}

// Runs the case on cudnn and on cuda_reference; checks cudnn against the fp64 reference and
// against cuda_reference, and cuda_reference against the fp64 reference (so that a failure
// says which side is wrong).
void CheckCase(const Case& c) {
  SCOPED_TRACE(absl::StrCat(c.name, " ", Describe(c.p), " plan ", PlanOf(c.p)));
  std::unique_ptr<AttentionBackend> cudnn = MakeCudnn();
  CaseRun run;
  ASSERT_NO_FATAL_FAILURE(RunAgainstReference(*cudnn, c, &run));
  const AttentionParams& host = run.host;
  const AttentionParams& p = run.p;
  AttentionBuffers& t = run.t;
  DeviceTensors& d = run.d;
  const ReferenceResult* const ref = &run.ref;
  const Tolerance tol = CudnnTolerance(host);

  std::unique_ptr<AttentionBackend> simple = CudaReference();
  ASSERT_NE(simple, nullptr);
  AttentionBuffers simple_out = t;
  d.o.Poison();
  d.lse.Poison();
  ASSERT_TRUE(RunAndWait(*simple, p).ok());
  FromDevice(d, &simple_out);
  Tolerance vs_simple = tol;
  vs_simple.o_rtol += UnitRoundoff(host.o_dtype);  // the other side's output rounding
  ExpectMatches("cuda_reference", host, t, AsResult(host, simple_out), vs_simple);
  Tolerance simple_tol = tol;
  simple_tol.o_atol = 1e-3;
  ExpectMatches("fp64 reference (cuda_reference's own output)", host, simple_out, *ref, simple_tol);
}

// ---- Sweep against the fp64 reference --------------------------------------------------------

std::vector<Case> SweepCases() {
  const DType f32 = DType::kF32, f16 = DType::kF16, bf16 = DType::kBF16;
  return {
      // Sizes: single rows, sizes off every tile multiple, 5 heads, GQA and MQA, head dims.
      {"Seq1", Shape(1, 1, 2, 2, 64)},
      {"Seq1Q255K", Shape(1, 255, 2, 1, 128)},
      {"Seq255Q1K", Shape(255, 1, 2, 1, 64, f16, f16)},
      {"Seq7Heads5", Shape(7, 7, 5, 5, 64, f16, f16)},
      {"Seq255Heads5D128", Shape(255, 255, 5, 5, 128)},
      {"Seq1000Heads5", Shape(1000, 1000, 5, 5, 64)},
      {"Seq1000F16D128Gqa", Shape(1000, 1000, 4, 2, 128, f16, f16)},
      {"Gqa8to2D64F16", Shape(255, 255, 8, 2, 64, f16, f16)},
      {"Gqa8to1D128", Shape(255, 255, 8, 1, 128)},
      {"Batch3D128", Shape(129, 200, 4, 2, 128, bf16, bf16, 3)},
      {"Seq100QSeq1000K", Shape(100, 1000, 2, 1, 64, f16, f16)},
      {"Seq1000QSeq100K", Shape(1000, 100, 2, 1, 128)},
      {"ExactTiles", Shape(256, 256, 2, 2, 128)},
      // Output dtypes (fp32 and the other half type go through the scratch O).
      {"Bf16InF32Out", Shape(129, 200, 4, 4, 64, bf16, f32)},
      {"F16InF32Out", Shape(129, 200, 4, 2, 128, f16, f32)},
      {"F16InBf16Out", Shape(129, 200, 4, 2, 64, f16, bf16)},
      {"Bf16InF16Out", Shape(129, 200, 4, 2, 128, bf16, f16)},
      // Causal, top-left (equal lengths, fewer queries, fewer keys).
      {"Causal", Causal(Shape(255, 255, 5, 5, 64))},
      {"CausalSeq1000F16", Causal(Shape(1000, 1000, 4, 2, 128, f16, f16))},
      {"CausalQShorter", Causal(Shape(100, 255, 2, 2, 64))},
      {"CausalKShorter", Causal(Shape(255, 100, 2, 2, 128))},
      {"CausalSeq7", Causal(Shape(7, 7, 2, 1, 64, f16, f32))},
      // The ring's steps in global positions (contiguous shards of 255).
      {"RingDiagonal", Causal(Positions(Shape(255, 255, 8, 2, 64), 510, 1, 510, 1))},
      {"RingVisible", Causal(Positions(Shape(255, 255, 8, 2, 128, f16, f16), 510, 1, 0, 1))},
      {"RingMasked", Causal(Positions(Shape(255, 255, 8, 2, 64), 0, 1, 510, 1))},
      {"RingDiagonalUnevenShards", Causal(Positions(Shape(256, 255, 4, 1, 64), 255, 1, 256, 1))},
      {"RingDiagonalF32Out",
       Causal(Positions(Shape(255, 255, 4, 2, 128, bf16, f32), 255, 1, 255, 1))},
      // Keys starting halfway through the queries: the first rows see nothing (o = 0, lse = -inf).
      {"CausalKeysAfterSomeQueries", Causal(Positions(Shape(300, 300, 2, 2, 64), 0, 1, 150, 1))},
      {"CausalQueriesAfterKeys", Causal(Positions(Shape(200, 300, 2, 2, 128), 1000, 1, 0, 1))},
      // Stripe layout (equal position strides): the causal mask is a band in indices.
      {"StripeAfter", Causal(Positions(Shape(255, 255, 4, 2, 64), 1, 4, 0, 4))},
      {"StripeBefore", Causal(Positions(Shape(255, 255, 4, 2, 128, f16, f16), 0, 4, 3, 4))},
      // Windows.
      {"WindowLeftOnly", Window(Shape(255, 255, 2, 2, 64), 17, kOpen)},
      {"WindowRightOnly", Window(Shape(255, 255, 2, 2, 128, f16, f16), kOpen, 17)},
      {"Window5x3", Window(Shape(255, 255, 2, 2, 64), 5, 3)},
      {"Window0x0", Window(Shape(255, 255, 2, 2, 64, f16, f16), 0, 0)},
      {"WindowLiveRangeMidSequence", Window(Shape(300, 700, 2, 2, 64), 40, 40)},
      {"WindowMoreRowsThanKeysPadding", Window(Shape(255, 7, 2, 2, 64), 17, kOpen)},
      {"WindowMoreRowsThanKeysCausal", Window(Causal(Shape(255, 100, 4, 2, 128)), 30, kOpen)},
      {"CausalWindow", Window(Causal(Shape(255, 255, 4, 2, 64)), 40, kOpen)},
      {"CausalWindowRingPrevShard",
       Window(Causal(Positions(Shape(255, 255, 4, 2, 64, f16, f32), 255, 1, 0, 1)), 100, kOpen)},
      {"StripeWindow", Window(Causal(Positions(Shape(200, 200, 4, 2, 64), 2, 3, 1, 3)), 90, 0)},
      {"WindowStripeNothingAllowed",
       Window(Positions(Shape(150, 150, 2, 2, 128), 1, 2, 0, 2), 0, 0)},
  };
}

class CudnnSweepTest : public GpuTest, public ::testing::WithParamInterface<Case> {};

TEST_P(CudnnSweepTest, MatchesFp64ReferenceAndCudaReference) { CheckCase(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Sweep, CudnnSweepTest, ::testing::ValuesIn(SweepCases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

// Head dim 256: cuDNN supports it for fp16/bf16 forward on Hopper from cuDNN 9.10; a refusal
// by cuDNN here is an InvalidArgument carrying its message.
INSTANTIATE_TEST_SUITE_P(
    HeadDim256, CudnnSweepTest,
    ::testing::Values(Case{"D256", Shape(255, 255, 4, 2, 256)},
                      Case{"D256CausalF16",
                           Causal(Shape(255, 255, 4, 1, 256, DType::kF16, DType::kF16))},
                      Case{"D256WindowF32Out",
                           Window(Shape(200, 130, 2, 2, 256, DType::kBF16, DType::kF32), 20, 5)}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// ---- Refusals on the device ----------------------------------------------------------------

class CudnnBackendTest : public GpuTest {};

TEST_F(CudnnBackendTest, RefusesOptionsWithInvalidArgumentNamingThem) {
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  struct Bad {
    const char* name;
    AttentionParams p;
    bool alibi;
    const char* message;
  };
  AttentionParams softcap = Shape(64, 64, 2, 2, 64);
  softcap.softcap = 20.0f;
  const Bad cases[] = {
      {"Alibi", Shape(64, 64, 2, 2, 64), true,
       "the cudnn backend does not support alibi_slopes; use the cuda backend"},
      {"Softcap", softcap, false, "softcap"},
      {"UnequalStrides", Causal(Positions(Shape(64, 64, 2, 2, 64), 0, 2, 0, 3)), false,
       "q_pos_stride"},
  };
  for (const Bad& c : cases) {
    SCOPED_TRACE(c.name);
    AttentionParams host = c.p;
    AttentionBuffers t = MakeAttentionBuffers(&host, 3, c.alibi);
    DeviceTensors d;
    AttentionParams p = ToDevice(host, t, &d);
    DeviceBuffer slopes(t.alibi.size() * sizeof(float));
    slopes.Upload(t.alibi.data());
    if (c.alibi) p.alibi_slopes = static_cast<const float*>(slopes.get());
    const absl::Status s = backend->Forward(p);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(c.message), std::string::npos) << s;
  }
}

// ---- Stats convention -----------------------------------------------------------------------

// The first thing to look at if lse is wrong everywhere: cuDNN's Stats are expected to be the
// natural-log LSE of the scaled scores. A ratio of log2(e) = 1.4427 would mean base-2 stats.
TEST_F(CudnnBackendTest, StatsAreTheNaturalLogLseOfScaledScores) {
  AttentionParams host = Shape(128, 128, 2, 2, 64);
  AttentionBuffers t = MakeAttentionBuffers(&host, 5);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
  ASSERT_TRUE(ref.ok());
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  DeviceTensors d;
  ASSERT_TRUE(RunAndWait(*backend, ToDevice(host, t, &d)).ok());
  FromDevice(d, &t);
  double got_sum = 0.0, want_sum = 0.0;
  for (size_t i = 0; i < t.lse.size(); ++i) {
    got_sum += t.lse[i];
    want_sum += ref->lse[i];
  }
  const double ratio = got_sum / want_sum;
  EXPECT_NEAR(ratio, 1.0, 1e-3) << "mean lse(cudnn) / lse(reference) = " << ratio
                                << " (1.4427 would be base-2 stats)";
  ExpectMatches("fp64 reference", host, t, *ref, CudnnTolerance(host));
}

// ---- Merge mode -----------------------------------------------------------------------------

struct MergeCase {
  std::string name;
  AttentionParams p;  // o_dtype fp32
  int64_t split;      // keys of the first call
  bool second_half_first;
};

class CudnnMergeTest : public GpuTest, public ::testing::WithParamInterface<MergeCase> {};

// Keys in two calls, the second merging into the first's (o, lse), against one call over all
// keys and against the fp64 reference; rows the second call adds nothing to keep the first
// call's partial bit for bit.
TEST_P(CudnnMergeTest, TwoKeyHalvesEqualOneCall) {
  const MergeCase& c = GetParam();
  AttentionParams host = c.p;
  AttentionBuffers t = MakeAttentionBuffers(&host, SeedOf(c.name));
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
  ASSERT_TRUE(ref.ok()) << ref.status();
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  DeviceTensors d;
  const AttentionParams whole = ToDevice(host, t, &d);
  ASSERT_TRUE(RunAndWait(*backend, whole).ok());
  AttentionBuffers single = t;
  FromDevice(d, &single);

  d.o.Poison();
  d.lse.Poison();
  AttentionParams first = KeyRange(whole, 0, c.split);
  AttentionParams second = KeyRange(whole, c.split, whole.seqlen_k);
  AttentionParams second_host = KeyRange(host, c.split, host.seqlen_k);
  if (c.second_half_first) {
    std::swap(first, second);
    second_host = KeyRange(host, 0, c.split);
  }
  SCOPED_TRACE(
      absl::StrCat("first call plan ", PlanOf(first), ", second call plan ", PlanOf(second)));
  const absl::Status s1 = RunAndWait(*backend, first);
  ASSERT_TRUE(s1.ok()) << s1;
  AttentionBuffers partial = t;
  FromDevice(d, &partial);
  second.merge_into_output = true;
  const absl::Status s2 = RunAndWait(*backend, second);
  ASSERT_TRUE(s2.ok()) << s2;
  FromDevice(d, &t);

  const Tolerance tol = CudnnTolerance(host);
  ExpectMatches("one call over all keys", host, t, AsResult(host, single), tol);
  ExpectMatches("fp64 reference", host, t, *ref, tol);

  absl::StatusOr<ReferenceResult> second_ref = ReferenceForward(second_host);
  ASSERT_TRUE(second_ref.ok());
  int64_t untouched = 0;
  for (size_t r = 0; r < second_ref->lse.size(); ++r) {
    if (std::isfinite(second_ref->lse[r])) continue;
    ++untouched;
    const int64_t i = static_cast<int64_t>(r) % host.seqlen_q;
    const int64_t bh = static_cast<int64_t>(r) / host.seqlen_q;
    const int64_t b = bh / host.heads, h = bh % host.heads;
    ASSERT_EQ(std::memcmp(&t.lse[r], &partial.lse[r], sizeof(float)), 0)
        << "lse of row " << LsePlace(host, r) << " changed by a merge that adds nothing";
    const int64_t at = ((b * host.seqlen_q + i) * host.heads + h) * host.head_dim;
    ASSERT_EQ(std::memcmp(static_cast<const float*>(t.o.data()) + at,
                          static_cast<const float*>(partial.o.data()) + at,
                          host.head_dim * sizeof(float)),
              0)
        << "o of row " << LsePlace(host, r) << " changed by a merge that adds nothing";
  }
  RecordProperty("untouched_rows", static_cast<int>(untouched));
}

std::vector<MergeCase> MergeCases() {
  const AttentionParams base = Shape(255, 255, 4, 2, 64, DType::kBF16, DType::kF32);
  const AttentionParams d128 = Shape(200, 304, 4, 2, 128, DType::kF16, DType::kF32);
  return {
      {"MidSplit", base, 96, false},
      {"MidSplitReversed", base, 96, true},
      {"TileAlignedSplitD128", d128, 128, false},
      {"EmptyFirstCall", base, 0, false},
      {"EmptySecondCall", base, 255, false},
      {"CausalSplit", Causal(base), 120, false},  // rows < 120 see nothing of the second half
      {"CausalSplitReversed", Causal(base), 120, true},
      {"WindowSplitD128", Window(d128, 20, 5), 136, true},
      {"StripeCausal", Causal(Positions(base, 1, 2, 0, 2)), 64, false},
      {"CausalWindowGqa8to1",
       Window(
           Causal(Positions(Shape(200, 304, 8, 1, 128, DType::kBF16, DType::kF32), 250, 1, 0, 1)),
           100, kOpen),
       168, false},
  };
}

INSTANTIATE_TEST_SUITE_P(Merge, CudnnMergeTest, ::testing::ValuesIn(MergeCases()),
                         [](const ::testing::TestParamInfo<MergeCase>& info) {
                           return info.param.name;
                         });

TEST_F(CudnnBackendTest, MergeIntoEmptyPartialIgnoresItsStaleOutput) {
  // lse -inf marks an empty partial; its o (NaN here) must not leak into the result.
  AttentionParams host = Causal(Shape(140, 150, 2, 2, 128, DType::kBF16, DType::kF32));
  AttentionBuffers t = MakeAttentionBuffers(&host, 41);
  std::fill(t.lse.begin(), t.lse.end(), kNegInf);
  host.merge_into_output = true;
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  DeviceTensors d;
  ASSERT_TRUE(RunAndWait(*backend, ToDevice(host, t, &d, /*upload_outputs=*/true)).ok());
  FromDevice(d, &t);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
  ASSERT_TRUE(ref.ok());
  ExpectMatches("fp64 reference", host, t, *ref, CudnnTolerance(host));
}

// ---- Fully masked rows, empty calls, null lse -------------------------------------------------

TEST_F(CudnnBackendTest, FullyMaskedCallWritesZerosAndNegInfWithoutCallingCudnn) {
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  for (DType o_dtype : {DType::kBF16, DType::kF32}) {
    AttentionParams host =
        Causal(Positions(Shape(170, 90, 2, 2, 64, DType::kBF16, o_dtype), 0, 1, 1000, 1));
    AttentionBuffers t = MakeAttentionBuffers(&host, 11);
    DeviceTensors d;
    ASSERT_TRUE(RunAndWait(*backend, ToDevice(host, t, &d)).ok());
    FromDevice(d, &t);
    for (int64_t i = 0; i < t.o.size(); ++i) ASSERT_EQ(t.o.Get(i), 0.0f) << OPlace(host, i);
    for (size_t i = 0; i < t.lse.size(); ++i) ASSERT_EQ(t.lse[i], kNegInf) << LsePlace(host, i);
  }
  EXPECT_EQ(AsCudnnBackend(backend.get())->graph_builds(), 0);
}

TEST_F(CudnnBackendTest, NoKeysGivesFullyMaskedRows) {
  AttentionParams host = Shape(33, 0, 2, 2, 128, DType::kBF16, DType::kF16);
  AttentionBuffers t = MakeAttentionBuffers(&host, 13);
  host.k = nullptr;
  host.v = nullptr;
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  DeviceTensors d;
  ASSERT_TRUE(RunAndWait(*backend, ToDevice(host, t, &d)).ok());
  FromDevice(d, &t);
  for (int64_t i = 0; i < t.o.size(); ++i) ASSERT_EQ(t.o.Get(i), 0.0f) << OPlace(host, i);
  for (size_t i = 0; i < t.lse.size(); ++i) ASSERT_EQ(t.lse[i], kNegInf) << LsePlace(host, i);
}

TEST_F(CudnnBackendTest, NoQueriesIsANoOp) {
  AttentionParams host = Shape(0, 50, 2, 2, 64);
  AttentionBuffers t = MakeAttentionBuffers(&host, 14);
  host.q = nullptr;
  host.o = nullptr;
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  DeviceTensors d;
  EXPECT_TRUE(RunAndWait(*backend, ToDevice(host, t, &d)).ok());
}

TEST_F(CudnnBackendTest, NullLseIsAllowedWithoutMerge) {
  for (DType o_dtype : {DType::kBF16, DType::kF32}) {
    AttentionParams host = Causal(Shape(65, 65, 2, 2, 64, DType::kBF16, o_dtype));
    AttentionBuffers t = MakeAttentionBuffers(&host, 15);
    host.lse = nullptr;
    std::unique_ptr<AttentionBackend> backend = MakeCudnn();
    DeviceTensors d;
    ASSERT_TRUE(RunAndWait(*backend, ToDevice(host, t, &d)).ok());
    FromDevice(d, &t);
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
    ASSERT_TRUE(ref.ok());
    ExpectMatches("fp64 reference", host, t, *ref, CudnnTolerance(host));
  }
}

// ---- Strided views --------------------------------------------------------------------------

// q/k/v/o inside buffers with padding between heads and rows (strides multiples of 8): cuDNN
// reads through the strides, o is written in place (same dtype) or through the scratch O (fp32),
// and nothing outside the views of o and lse is written (it stays NaN).
TEST_F(CudnnBackendTest, HonoursStridesAndWritesNothingOutsideTheView) {
  for (DType o_dtype : {DType::kF16, DType::kF32}) {
    SCOPED_TRACE(DTypeName(o_dtype));
    const int heads = 4, heads_k = 2, dim = 128, batch = 2;
    const int64_t sq = 150, sk = 96, head_pad = 16, row_pad = 8;
    AttentionParams host = Causal(
        Positions(Shape(sq, sk, heads, heads_k, dim, DType::kF16, o_dtype, batch), 40, 1, 0, 1));
    PadStrides(&host, head_pad, row_pad);
    AttentionBuffers t = StridedBuffers(&host);
    std::unique_ptr<AttentionBackend> backend = MakeCudnn();
    DeviceTensors d;
    ASSERT_TRUE(RunAndWait(*backend, ToDevice(host, t, &d)).ok());
    FromDevice(d, &t);
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
    ASSERT_TRUE(ref.ok());
    ExpectMatches("fp64 reference", host, t, *ref, CudnnTolerance(host));

    ASSERT_NO_FATAL_FAILURE(ExpectNothingWrittenOutsideTheView(host, t));
  }
}

// ---- The epilogue alone ---------------------------------------------------------------------

// The merge/store kernel without cuDNN, against MergeLse on the host: tells an epilogue bug from
// a cuDNN one. Rows [3, 8) of 10 are live; in the merge, one partial is empty (lse -inf, o NaN),
// one live row brings nothing (lse_new -inf: the row must stay bit-identical).
TEST_F(CudnnBackendTest, EpilogueAloneMergesStoresAndFills) {
  const int batch = 2, heads = 3, dim = 64;
  const int64_t rows = 10, live_begin = 3, live = 5;
  const int64_t o_elems = batch * rows * heads * dim;
  const int64_t new_elems = batch * live * heads * dim;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  TypedBuffer o_new(DType::kBF16, new_elems);
  kernel_testing::FillRandomNormal(&o_new, 8);
  std::vector<float> stats(batch * heads * live);
  for (float& x : stats) x = 3.0f + normal(rng);
  stats[4] = kNegInf;  // (b=0, h=0, live row 4): adds nothing
  std::vector<float> o_old(o_elems), lse_old(batch * heads * rows);
  for (float& x : o_old) x = normal(rng);
  for (float& x : lse_old) x = 3.0f + normal(rng);
  lse_old[1 * rows + 5] = kNegInf;  // (b=0, h=1, row 5): an empty partial with a stale NaN o
  for (int c = 0; c < dim; ++c) {
    o_old[((0 * rows + 5) * heads + 1) * dim + c] = std::numeric_limits<float>::quiet_NaN();
  }

  DeviceBuffer d_new(new_elems * 2), d_stats(stats.size() * 4), d_o(o_elems * 4),
      d_lse(lse_old.size() * 4);
  d_new.Upload(o_new.data());
  d_stats.Upload(stats.data());
  CudnnEpilogueParams e;
  e.batch = batch;
  e.heads = heads;
  e.head_dim = dim;
  e.seqlen_q = rows;
  e.live_begin = live_begin;
  e.live_count = live;
  e.stats = static_cast<const float*>(d_stats.get());
  e.o_new = d_new.get();
  e.o_new_dtype = DType::kBF16;
  e.o_new_batch_stride = live * heads * dim;
  e.o_new_row_stride = heads * dim;
  e.o_new_head_stride = dim;
  e.o = d_o.get();
  e.o_batch_stride = rows * heads * dim;
  e.o_row_stride = heads * dim;
  e.o_head_stride = dim;
  e.lse = static_cast<float*>(d_lse.get());
  e.lse_batch_stride = heads * rows;
  e.lse_head_stride = rows;
  auto new_at = [&](int b, int64_t i, int h, int c) {
    return ((b * live + (i - live_begin)) * heads + h) * dim + c;
  };
  auto o_at = [&](int b, int64_t i, int h, int c) {
    return ((b * rows + i) * heads + h) * dim + c;
  };
  auto stat_of = [&](int b, int64_t i, int h) {
    const bool is_live = i >= live_begin && i < live_begin + live;
    return is_live ? stats[(b * heads + h) * live + (i - live_begin)] : kNegInf;
  };

  // Merge into fp32 accumulators.
  e.merge = true;
  e.o_dtype = DType::kF32;
  d_o.Upload(o_old.data());
  d_lse.Upload(lse_old.data());
  ASSERT_TRUE(LaunchCudnnEpilogue(e, nullptr).ok());
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> o_got(o_elems), lse_got(lse_old.size());
  d_o.Download(o_got.data());
  d_lse.Download(lse_got.data());
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t l = (b * heads + h) * rows + i;
        const float lse_new = stat_of(b, i, h);
        if (lse_new == kNegInf) {  // untouched, bit for bit
          ASSERT_EQ(std::memcmp(&lse_got[l], &lse_old[l], 4), 0)
              << "b=" << b << " h=" << h << " i=" << i;
          ASSERT_EQ(std::memcmp(&o_got[o_at(b, i, h, 0)], &o_old[o_at(b, i, h, 0)], dim * 4), 0)
              << "b=" << b << " h=" << h << " i=" << i;
          continue;
        }
        const LseMerge w = MergeLse(lse_old[l], lse_new);
        ASSERT_NEAR(lse_got[l], w.lse, 1e-5f * (1.0f + std::abs(w.lse)));
        for (int c = 0; c < dim; ++c) {
          const float a = w.wa != 0.0f ? w.wa * o_old[o_at(b, i, h, c)] : 0.0f;
          const float want = a + w.wb * o_new.Get(new_at(b, i, h, c));
          ASSERT_NEAR(o_got[o_at(b, i, h, c)], want, 1e-5f * (1.0f + std::abs(want)))
              << "b=" << b << " h=" << h << " i=" << i << " c=" << c;
        }
      }
    }
  }

  // Store (no merge) into fp16, and in place (o of live rows already written by cuDNN).
  for (bool in_place : {false, true}) {
    SCOPED_TRACE(in_place ? "in place" : "store");
    e.merge = false;
    e.o_dtype = DType::kF16;
    e.o_written_in_place = in_place;
    d_o.Poison();
    d_lse.Poison();
    ASSERT_TRUE(LaunchCudnnEpilogue(e, nullptr).ok());
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    TypedBuffer o16(DType::kF16, o_elems);
    std::vector<float> lse16(lse_old.size());
    ASSERT_CUDA_OK(cudaMemcpy(o16.data(), d_o.get(), o_elems * 2, cudaMemcpyDeviceToHost));
    d_lse.Download(lse16.data());
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < heads; ++h) {
        for (int64_t i = 0; i < rows; ++i) {
          const bool is_live = i >= live_begin && i < live_begin + live;
          ASSERT_EQ(lse16[(b * heads + h) * rows + i], stat_of(b, i, h));
          for (int c = 0; c < dim; ++c) {
            const float got = o16.Get(o_at(b, i, h, c));
            if (!is_live) {
              ASSERT_EQ(got, 0.0f) << "row outside the live block not zeroed";
            } else if (in_place) {
              ASSERT_TRUE(std::isnan(got)) << "in-place row overwritten";
            } else {
              ASSERT_EQ(got, RoundThrough(o_new.Get(new_at(b, i, h, c)), DType::kF16));
            }
          }
        }
      }
    }
  }
}

// ---- The graph cache ------------------------------------------------------------------------

TEST_F(CudnnBackendTest, RepeatedShapeDoesNotRebuildTheGraph) {
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  CudnnBackend* cudnn = AsCudnnBackend(backend.get());
  ASSERT_NE(cudnn, nullptr);
  AttentionParams host = Causal(Shape(200, 200, 4, 2, 64));
  AttentionBuffers t = MakeAttentionBuffers(&host, 61);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
  ASSERT_TRUE(ref.ok());

  DeviceTensors d1;
  const AttentionParams p1 = ToDevice(host, t, &d1);
  ASSERT_TRUE(RunAndWait(*backend, p1).ok());
  EXPECT_EQ(cudnn->graph_builds(), 1);
  ASSERT_TRUE(RunAndWait(*backend, p1).ok());
  EXPECT_EQ(cudnn->graph_builds(), 1) << "same call rebuilt the graph";

  // Other buffers, same shape: no rebuild, and the result is that of the new buffers.
  DeviceTensors d2;
  const AttentionParams p2 = ToDevice(host, t, &d2);
  ASSERT_TRUE(RunAndWait(*backend, p2).ok());
  EXPECT_EQ(cudnn->graph_builds(), 1) << "new pointers rebuilt the graph";
  AttentionBuffers out = t;
  FromDevice(d2, &out);
  ExpectMatches("fp64 reference", host, out, *ref, CudnnTolerance(host));

  // Another shape builds once more; going back does not.
  AttentionParams other_host = Causal(Shape(120, 200, 4, 2, 64));
  AttentionBuffers other = MakeAttentionBuffers(&other_host, 62);
  DeviceTensors d3;
  const AttentionParams p3 = ToDevice(other_host, other, &d3);
  ASSERT_TRUE(RunAndWait(*backend, p3).ok());
  EXPECT_EQ(cudnn->graph_builds(), 2);
  ASSERT_TRUE(RunAndWait(*backend, p1).ok());
  ASSERT_TRUE(RunAndWait(*backend, p3).ok());
  EXPECT_EQ(cudnn->graph_builds(), 2);

  // A ring's steps (diagonal, visible, masked, merged), twice: the second round builds nothing.
  AttentionParams ring_host = Shape(256, 256, 4, 2, 64, DType::kBF16, DType::kF32);
  AttentionBuffers ring = MakeAttentionBuffers(&ring_host, 63);
  DeviceTensors d4;
  AttentionParams step = ToDevice(ring_host, ring, &d4);
  step.causal = true;
  step.merge_into_output = false;
  step.q_pos_offset = step.k_pos_offset = 512;
  ASSERT_TRUE(RunAndWait(*backend, step).ok());  // diagonal
  step.merge_into_output = true;
  const int64_t key_offsets[] = {0, 256, 768};
  for (int64_t k_offset : key_offsets) {
    step.k_pos_offset = k_offset;
    ASSERT_TRUE(RunAndWait(*backend, step).ok());
  }
  const int64_t after_first_round = cudnn->graph_builds();
  step.merge_into_output = false;
  step.k_pos_offset = 512;
  ASSERT_TRUE(RunAndWait(*backend, step).ok());
  step.merge_into_output = true;
  for (int64_t k_offset : key_offsets) {
    step.k_pos_offset = k_offset;
    ASSERT_TRUE(RunAndWait(*backend, step).ok());
  }
  EXPECT_EQ(cudnn->graph_builds(), after_first_round);
}

// ---- Dynamic shapes: one backend through many lengths ------------------------------------------

// Calls that share kernel classes at many sizes (awkward lengths, 5 heads, GQA, s_q != s_k) and
// scalar values (scales, band bounds), so that a dynamic backend reuses one class's kernel at
// sizes and values other than those it was compiled for. Interleaved: each class comes back
// after others.
std::vector<Case> DynamicCases() {
  const DType f16 = DType::kF16, f32 = DType::kF32;
  AttentionParams rescaled = Causal(Shape(255, 255, 8, 2, 64));
  rescaled.softmax_scale = 0.3f;
  return {
      {"Causal7Heads5", Causal(Shape(7, 7, 5, 5, 64))},
      {"Unmasked255Gqa", Shape(255, 255, 8, 2, 64)},
      {"Causal3816Gqa", Causal(Shape(3816, 3816, 2, 1, 64))},
      {"Window17x3", Window(Shape(255, 255, 2, 2, 64), 17, 3)},
      {"Unmasked1", Shape(1, 1, 2, 1, 64)},
      {"Causal1", Causal(Shape(1, 1, 2, 2, 64))},
      {"Unmasked3816Gqa", Shape(3816, 3816, 2, 1, 64)},
      {"CausalRescaled", rescaled},
      {"Window40x9", Window(Shape(300, 300, 4, 4, 64), 40, 9)},
      {"Unmasked7Heads5", Shape(7, 7, 5, 5, 64)},
      {"Unmasked100x1000", Shape(100, 1000, 8, 2, 64)},
      {"Causal255Gqa", Causal(Shape(255, 255, 8, 2, 64))},
      {"RingDiagonal", Causal(Positions(Shape(256, 256, 8, 2, 64), 512, 1, 512, 1))},
      {"RingVisible", Causal(Positions(Shape(256, 256, 8, 2, 64), 512, 1, 0, 1))},
      {"F16D128Causal129", Causal(Shape(129, 129, 4, 2, 128, f16, f16))},
      {"F16D128Unmasked1000F32Out", Shape(1000, 1000, 5, 5, 128, f16, f32)},
      {"F16D128Causal7", Causal(Shape(7, 7, 4, 1, 128, f16, f16))},
      {"F16D128Unmasked255", Shape(255, 255, 4, 4, 128, f16, f16)},
  };
}

class CudnnGraphModeTest : public GpuTest, public ::testing::WithParamInterface<GraphMode> {};

// Every call against the fp64 reference, then the graph counts (ExpectGraphStatsOfMode).
TEST_P(CudnnGraphModeTest, OneBackendThroughManyLengthsMatchesFp64Reference) {
  const GraphMode mode = GetParam();
  std::unique_ptr<CudnnBackend> backend = MakeCudnnInMode(mode);
  for (const Case& c : DynamicCases()) {
    // The long calls (seconds of fp64 reference each) in the dynamic modes only.
    if (mode == GraphMode::kStatic && c.p.seqlen_q > 1000) continue;
    SCOPED_TRACE(absl::StrCat(c.name, " ", Describe(c.p), " plan ", PlanOf(c.p)));
    CaseRun run;
    ASSERT_NO_FATAL_FAILURE(RunAgainstReference(*backend, c, &run));
  }
  ExpectGraphStatsOfMode(mode, *backend);
}

INSTANTIATE_TEST_SUITE_P(Modes, CudnnGraphModeTest,
                         ::testing::Values(GraphMode::kStatic, GraphMode::kDynamic,
                                           GraphMode::kDynamicPrewarmed),
                         [](const ::testing::TestParamInfo<GraphMode>& info) {
                           return GraphModeName(info.param);
                         });

// ---- Background builds -----------------------------------------------------------------------

TEST(CudnnBackendOptionsTest, BackgroundBuildsAreOffByDefault) {
  EXPECT_FALSE(CudnnBackendOptions().background_builds);
  std::unique_ptr<CudnnBackend> backend = MakeCudnnBackend({});
  EXPECT_EQ(backend->graph_stats().own_kernel_calls, 0);
  EXPECT_TRUE(backend->WaitForGraphs().ok());  // nothing requested: returns at once
}

// The first call of a shape runs our kernel while its graph is built in the background; once
// built, the same call runs cuDNN. Both against the fp64 reference.
TEST_F(CudnnBackendTest, BackgroundBuildServesTheFirstCallWithOurKernel) {
  for (const Case& c : {Case{"Causal3816Heads5Gqa", Causal(Shape(3816, 3816, 5, 1, 128))},
                        Case{"Causal7Heads5Gqa", Causal(Shape(7, 7, 5, 1, 128))}}) {
    SCOPED_TRACE(absl::StrCat(c.name, " ", Describe(c.p), " plan ", PlanOf(c.p)));
    std::unique_ptr<CudnnBackend> backend =
        MakeCudnnBackend({.dynamic_shapes = false, .background_builds = true});
    CaseRun first;
    ASSERT_NO_FATAL_FAILURE(RunAgainstReference(*backend, c, &first));
    EXPECT_EQ(backend->graph_stats().own_kernel_calls, 1);
    const absl::Status waited = backend->WaitForGraphs();
    ASSERT_TRUE(waited.ok()) << waited;
    EXPECT_EQ(backend->graph_builds(), 1);

    DeviceTensors d;
    const AttentionParams p = ToDevice(first.host, first.t, &d);  // outputs poisoned again
    const absl::Status s = RunAndWait(*backend, p);
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(backend->graph_stats().own_kernel_calls, 1) << "the built graph was not used";
    EXPECT_EQ(backend->graph_builds(), 1) << "the call rebuilt its graph";
    AttentionBuffers out = first.t;
    FromDevice(d, &out);
    ExpectMatches("fp64 reference (cuDNN)", first.host, out, first.ref,
                  CudnnTolerance(first.host));
  }
}

// ---- Streams and the workspace ---------------------------------------------------------------

TEST_F(CudnnBackendTest, RunsOnTheStreamItIsGivenAndSurvivesAStreamChange) {
  cudaStream_t s1 = nullptr, s2 = nullptr;
  ASSERT_CUDA_OK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
  ASSERT_CUDA_OK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();

  AttentionParams host = Causal(Shape(300, 300, 4, 2, 64, DType::kF16, DType::kF32));
  AttentionBuffers t = MakeAttentionBuffers(&host, 52);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
  ASSERT_TRUE(ref.ok());
  for (cudaStream_t stream : {s1, s2, s1}) {
    DeviceTensors d;
    const AttentionParams p = ToDevice(host, t, &d);
    ASSERT_TRUE(backend->Forward(p, ExecutionContext{stream}).ok());
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream));  // the stream alone carries the work
    AttentionBuffers out = t;
    FromDevice(d, &out);
    ExpectMatches("fp64 reference", host, out, *ref, CudnnTolerance(host));
  }
  backend.reset();
  ASSERT_CUDA_OK(cudaStreamDestroy(s1));
  ASSERT_CUDA_OK(cudaStreamDestroy(s2));
}

TEST_F(CudnnBackendTest, WorkspaceGrowsAndIsReused) {
  std::unique_ptr<AttentionBackend> backend = MakeCudnn();
  CudnnBackend* cudnn = AsCudnnBackend(backend.get());
  int64_t last_bytes = 0;
  // Small, large, small: every result right, the workspace only grows.
  for (int64_t s : {64, 1000, 64}) {
    SCOPED_TRACE(s);
    AttentionParams host = Causal(Shape(s, s, 8, 2, 128, DType::kBF16, DType::kF32));
    AttentionBuffers t = MakeAttentionBuffers(&host, static_cast<uint32_t>(s));
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(host);
    ASSERT_TRUE(ref.ok());
    DeviceTensors d;
    ASSERT_TRUE(RunAndWait(*backend, ToDevice(host, t, &d)).ok());
    FromDevice(d, &t);
    ExpectMatches("fp64 reference", host, t, *ref, CudnnTolerance(host));
    EXPECT_GE(cudnn->workspace_bytes(), last_bytes);
    last_bytes = cudnn->workspace_bytes();
  }
  EXPECT_GT(last_bytes, 0);
}

}  // namespace
}  // namespace ringattn
