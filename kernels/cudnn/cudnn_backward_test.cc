// The cudnn backward backend (cudnn_backward.h).
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
//   - the graph cache: a repeated call does not rebuild.
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
#include "kernels/cpu/reference_attention.h"
#include "kernels/cpu/reference_backward.h"
#include "kernels/cpu/test_util.h"
#include "kernels/cuda/gpu_test_util.h"
#include "kernels/cudnn/cudnn_backend.h"

namespace ringattn {
namespace {

using kernel_testing::AttentionBuffers;
using kernel_testing::DeviceBuffer;
using kernel_testing::FillRandomNormal;
using kernel_testing::GpuTest;
using kernel_testing::MakeAttentionBuffers;
using kernel_testing::Shape;
using kernel_testing::TypedBuffer;

constexpr int64_t kOpen = kUnboundedWindow;

// ---- Host-only ------------------------------------------------------------------------------

alignas(256) char g_fake[256];

AttentionBackwardParams FakeCall() {
  AttentionBackwardParams p;
  p.fwd = Shape(16, 16, 4, 4, 64);
  p.fwd.q = p.fwd.k = p.fwd.v = g_fake;
  p.fwd.o = g_fake;
  p.out = p.dout = g_fake;
  p.out_dtype = DType::kBF16;
  p.lse = reinterpret_cast<const float*>(g_fake);
  p.dq = p.dk = p.dv = reinterpret_cast<float*>(g_fake);
  SetContiguousBackwardStrides(&p);
  return p;
}

void ExpectRefused(const AttentionBackwardParams& p, const std::string& needle) {
  EXPECT_EQ(CudnnBackwardSupports(p).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(CudnnBackwardSupports(p).message().find(needle), std::string::npos)
      << CudnnBackwardSupports(p);
  // Backward refuses before touching a device (this runs on machines without one).
  auto backend = MakeCudnnBackwardBackend();
  const absl::Status s = backend->Backward(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(needle), std::string::npos) << s;
}

TEST(CudnnBackwardHostTest, Factory) {
  auto backend = MakeCudnnBackwardBackend();
  ASSERT_NE(backend, nullptr);
  EXPECT_EQ(backend->name(), "cudnn");
  EXPECT_EQ(backend->memory_space(), MemorySpace::kDevice);
  CudnnBackwardBackend* c = AsCudnnBackwardBackend(backend.get());
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->stream(), nullptr);
  c->SetStream(reinterpret_cast<cudaStream_t>(0x10));
  EXPECT_EQ(c->stream(), reinterpret_cast<cudaStream_t>(0x10));
  EXPECT_EQ(c->graph_builds(), 0);
}

TEST(CudnnBackwardHostTest, AcceptsPlainCall) {
  EXPECT_TRUE(CudnnBackwardSupports(FakeCall()).ok());
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

TEST(CudnnBackwardHostTest, RefusesFp32) {
  AttentionBackwardParams p = FakeCall();
  p.fwd.dtype = DType::kF32;
  p.out_dtype = DType::kF32;
  ExpectRefused(p, "dtype");
}

TEST(CudnnBackwardHostTest, RefusesOutDtypeMismatch) {
  AttentionBackwardParams p = FakeCall();
  p.out_dtype = DType::kF32;
  ExpectRefused(p, "out_dtype");
}

TEST(CudnnBackwardHostTest, RefusesNullOutWithDelta) {
  AttentionBackwardParams p = FakeCall();
  p.out = nullptr;
  p.delta = reinterpret_cast<const float*>(g_fake);
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

struct Case {
  int64_t sq, sk;
  int h, hk, d;
  DType dtype;
  bool causal = false;
  int64_t window_left = kOpen, window_right = kOpen;
};

std::string CaseName(const Case& c) {
  std::string s = absl::StrCat(std::string(DTypeName(c.dtype)), "_sq", c.sq, "_sk", c.sk, "_h", c.h,
                               "_hk", c.hk, "_d", c.d);
  if (c.causal) s += "_causal";
  if (c.window_left != kOpen || c.window_right != kOpen) {
    absl::StrAppend(&s, "_window",
                    c.window_left < 0 ? std::string("open") : absl::StrCat(c.window_left), "_",
                    c.window_right < 0 ? std::string("open") : absl::StrCat(c.window_right));
  }
  return s;
}

double RelL2Bound(DType t) { return t == DType::kBF16 ? 2e-2 : 5e-3; }

// Host inputs of one call plus the forward's O (rounded to dtype) and LSE from the fp64
// reference forward, and the fp64 reference gradients.
struct HostCall {
  AttentionParams fwd;
  AttentionBuffers t;
  TypedBuffer dout;
  std::vector<float> lse;
  ReferenceBackwardResult ref;
};

void MakeHostCall(const Case& c, HostCall* hc) {
  hc->fwd = Shape(c.sq, c.sk, c.h, c.hk, c.d, c.dtype, c.dtype);
  hc->fwd.causal = c.causal;
  hc->fwd.window_left = c.window_left;
  hc->fwd.window_right = c.window_right;
  hc->t = MakeAttentionBuffers(&hc->fwd, 7);
  absl::StatusOr<ReferenceResult> fwd = ReferenceForward(hc->fwd);
  ASSERT_TRUE(fwd.ok()) << fwd.status();
  for (int64_t i = 0; i < hc->t.o.size(); ++i) hc->t.o.Set(i, static_cast<float>(fwd->o[i]));
  hc->lse.assign(fwd->lse.begin(), fwd->lse.end());
  hc->dout = TypedBuffer(c.dtype, hc->t.o.size());
  FillRandomNormal(&hc->dout, 99);
  AttentionBackwardParams bp;
  bp.fwd = hc->fwd;
  bp.out = hc->t.o.data();
  bp.dout = hc->dout.data();
  bp.out_dtype = c.dtype;
  bp.lse = hc->lse.data();
  std::vector<float> sink_q(hc->t.o.size()), sink_k(hc->t.k.size()), sink_v(hc->t.v.size());
  bp.dq = sink_q.data();
  bp.dk = sink_k.data();
  bp.dv = sink_v.data();
  SetContiguousBackwardStrides(&bp);
  absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(bp);
  ASSERT_TRUE(ref.ok()) << ref.status();
  hc->ref = *std::move(ref);
}

// Device copies and the params pointing at them.
struct DeviceCall {
  DeviceBuffer q, k, v, out, dout, lse, dq, dk, dv;
  AttentionBackwardParams p;
};

void ToDevice(const HostCall& hc, DeviceCall* dc, bool accumulate) {
  auto up = [](DeviceBuffer* b, const void* host, size_t bytes) {
    *b = DeviceBuffer(bytes);
    b->Upload(host);
  };
  up(&dc->q, hc.t.q.data(), kernel_testing::Bytes(hc.t.q));
  up(&dc->k, hc.t.k.data(), kernel_testing::Bytes(hc.t.k));
  up(&dc->v, hc.t.v.data(), kernel_testing::Bytes(hc.t.v));
  up(&dc->out, hc.t.o.data(), kernel_testing::Bytes(hc.t.o));
  up(&dc->dout, hc.dout.data(), kernel_testing::Bytes(hc.dout));
  up(&dc->lse, hc.lse.data(), hc.lse.size() * sizeof(float));
  dc->dq = DeviceBuffer(hc.ref.dq.size() * sizeof(float));
  dc->dk = DeviceBuffer(hc.ref.dk.size() * sizeof(float));
  dc->dv = DeviceBuffer(hc.ref.dv.size() * sizeof(float));
  for (DeviceBuffer* g : {&dc->dq, &dc->dk, &dc->dv}) {
    if (accumulate) {
      ASSERT_CUDA_OK(cudaMemset(g->get(), 0, g->bytes()));
    } else {
      g->Poison();  // NaN: an element the backend does not write fails
    }
  }
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  AttentionBackwardParams& p = dc->p;
  p = AttentionBackwardParams();
  p.fwd = hc.fwd;
  p.fwd.q = dc->q.get();
  p.fwd.k = dc->k.get();
  p.fwd.v = dc->v.get();
  p.fwd.o = nullptr;
  p.fwd.lse = nullptr;
  p.out = dc->out.get();
  p.dout = dc->dout.get();
  p.out_dtype = hc.fwd.dtype;
  p.lse = static_cast<const float*>(dc->lse.get());
  p.dq = static_cast<float*>(dc->dq.get());
  p.dk = static_cast<float*>(dc->dk.get());
  p.dv = static_cast<float*>(dc->dv.get());
  p.accumulate = accumulate;
  SetContiguousBackwardStrides(&p);
}

// Compares a downloaded contiguous [b, rows, heads, d] gradient with scale * want.
::testing::AssertionResult GradClose(const char* name, const std::vector<float>& got,
                                     const std::vector<double>& want, double scale, int64_t rows,
                                     int heads, int d, double bound) {
  double err2 = 0, ref2 = 0, got2 = 0, worst = -1;
  int64_t worst_at = -1, nan = 0, first_nan = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const double w = scale * want[i];
    if (!std::isfinite(got[i])) {
      if (nan++ == 0) first_nan = static_cast<int64_t>(i);
      continue;
    }
    const double e = got[i] - w;
    err2 += e * e;
    ref2 += w * w;
    got2 += static_cast<double>(got[i]) * got[i];
    if (std::abs(e) > worst) {
      worst = std::abs(e);
      worst_at = static_cast<int64_t>(i);
    }
  }
  auto place = [&](int64_t i) {
    return absl::StrCat("(b=", i / (d * heads * rows), " row=", (i / (d * heads)) % rows,
                        " head=", (i / d) % heads, " col=", i % d, ")");
  };
  const double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  const std::string stats =
      absl::StrCat(name, ": rel_l2=", rel, " (bound ", bound,
                   ") ||got||/||want||=", ref2 > 0 ? std::sqrt(got2 / ref2) : 0.0,
                   " n=", got.size(), " nonfinite=", nan);
  std::printf("    %s\n", stats.c_str());
  if (nan > 0) {
    return ::testing::AssertionFailure() << stats << "; first non-finite at " << place(first_nan)
                                         << " (NaN = element not written, or cuDNN produced NaN)";
  }
  if (rel > bound) {
    return ::testing::AssertionFailure() << stats << "; worst at " << place(worst_at) << ": got "
                                         << got[worst_at] << " want " << scale * want[worst_at];
  }
  return ::testing::AssertionSuccess();
}

std::vector<float> Download(const DeviceBuffer& b) {
  std::vector<float> v(b.bytes() / sizeof(float));
  b.Download(v.data());
  return v;
}

void CheckGrads(const HostCall& hc, const DeviceCall& dc, double scale) {
  const double bound = RelL2Bound(hc.fwd.dtype);
  const AttentionParams& f = hc.fwd;
  EXPECT_TRUE(
      GradClose("dq", Download(dc.dq), hc.ref.dq, scale, f.seqlen_q, f.heads, f.head_dim, bound));
  EXPECT_TRUE(
      GradClose("dk", Download(dc.dk), hc.ref.dk, scale, f.seqlen_k, f.heads_k, f.head_dim, bound));
  EXPECT_TRUE(
      GradClose("dv", Download(dc.dv), hc.ref.dv, scale, f.seqlen_k, f.heads_k, f.head_dim, bound));
}

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
  auto backend = MakeCudnnBackwardBackend();
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
  auto backend = MakeCudnnBackwardBackend();
  ASSERT_TRUE(backend->Backward(dc.p).ok());
  const absl::Status s = backend->Backward(dc.p);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(AsCudnnBackwardBackend(backend.get())->graph_builds(), 1) << "repeat rebuilt";
  CheckGrads(hc, dc, 2.0);
}

std::vector<Case> SweepCases() {
  std::vector<Case> cases;
  for (DType t : {DType::kBF16, DType::kF16}) {
    for (int d : {64, 128}) {
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
      auto backend = MakeCudnnBackwardBackend();
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

// ComputeDelta against rowsum(dO * O) on the host.
TEST_F(CudnnBackwardGpuTest, ComputeDelta) {
  const Case c{255, 255, 5, 5, 64, DType::kBF16};
  HostCall hc;
  ASSERT_NO_FATAL_FAILURE(MakeHostCall(c, &hc));
  DeviceCall dc;
  ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, false));
  DeviceBuffer delta(hc.lse.size() * sizeof(float));
  delta.Poison();
  auto backend = MakeCudnnBackwardBackend();
  ASSERT_TRUE(backend->ComputeDelta(dc.p, static_cast<float*>(delta.get())).ok());
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> got = Download(delta);
  const AttentionParams& f = hc.fwd;
  for (int h = 0; h < f.heads; ++h) {
    for (int64_t i = 0; i < f.seqlen_q; ++i) {
      double want = 0;
      for (int col = 0; col < f.head_dim; ++col) {
        const int64_t at = (i * f.heads + h) * f.head_dim + col;
        want += static_cast<double>(hc.t.o.Get(at)) * hc.dout.Get(at);
      }
      const float g = got[h * f.seqlen_q + i];
      ASSERT_NEAR(g, want, 1e-4 * (1 + std::abs(want))) << "head " << h << " row " << i;
    }
  }
}

}  // namespace
}  // namespace ringattn
