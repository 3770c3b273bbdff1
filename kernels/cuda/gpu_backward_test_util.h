// Shared by the GPU backward tests (cuda_backward_test, cudnn_backward_test): one backward
// call's inputs on the host with the fp64 reference forward's O (rounded to the input dtype, as
// a real forward stores it) and LSE, the fp64 reference gradients, their device copies, and the
// per-tensor comparison (relative L2 against a bound per dtype; NaN-poisoned outputs make an
// unwritten element fail).
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/cpu/reference_backward.h"
#include "kernels/cpu/test_util.h"
#include "kernels/cuda/gpu_test_util.h"

namespace ringattn {
namespace kernel_testing {

struct Case {
  int64_t sq, sk;
  int h, hk, d;
  DType dtype;
  bool causal = false;
  int64_t window_left = kUnboundedWindow, window_right = kUnboundedWindow;
  float softcap = 0.0f;
  bool alibi = false;
  int64_t q_pos_offset = 0;  // global position of query row 0 (a ring step's shard offset)
  // Second runs of positions (AttentionParams::q_pos_split), a zigzag step in one call.
  int64_t q_split = kNoPosSplit, q_offset2 = 0, k_split = kNoPosSplit, k_offset2 = 0;
};

inline std::string CaseName(const Case& c) {
  std::string s = absl::StrCat(std::string(DTypeName(c.dtype)), "_sq", c.sq, "_sk", c.sk, "_h", c.h,
                               "_hk", c.hk, "_d", c.d);
  if (c.causal) s += "_causal";
  if (c.window_left != kUnboundedWindow || c.window_right != kUnboundedWindow) {
    absl::StrAppend(&s, "_window",
                    c.window_left < 0 ? std::string("open") : absl::StrCat(c.window_left), "_",
                    c.window_right < 0 ? std::string("open") : absl::StrCat(c.window_right));
  }
  if (c.softcap > 0.0f) absl::StrAppend(&s, "_softcap", static_cast<int>(c.softcap));
  if (c.alibi) s += "_alibi";
  if (c.q_pos_offset != 0) absl::StrAppend(&s, "_qoff", c.q_pos_offset);
  if (c.q_split != kNoPosSplit) absl::StrAppend(&s, "_qruns", c.q_split, "at", c.q_offset2);
  if (c.k_split != kNoPosSplit) absl::StrAppend(&s, "_kruns", c.k_split, "at", c.k_offset2);
  return s;
}

inline double RelL2Bound(DType t) { return t == DType::kBF16 ? 2e-2 : 5e-3; }

// Host inputs of one call plus the forward's O (rounded to dtype) and LSE from the fp64
// reference forward, and the fp64 reference gradients.
struct HostCall {
  AttentionParams fwd;
  AttentionBuffers t;
  TypedBuffer dout;
  std::vector<float> lse;
  ReferenceBackwardResult ref;
};

inline void MakeHostCall(const Case& c, HostCall* hc) {
  hc->fwd = Shape(c.sq, c.sk, c.h, c.hk, c.d, c.dtype, c.dtype);
  hc->fwd.causal = c.causal;
  hc->fwd.window_left = c.window_left;
  hc->fwd.window_right = c.window_right;
  hc->fwd.softcap = c.softcap;
  hc->fwd.q_pos_offset = c.q_pos_offset;
  hc->fwd = Runs(hc->fwd, c.q_split, c.q_offset2, c.k_split, c.k_offset2);
  // With c.alibi, the usual geometric slopes in hc->t.alibi, pointed at by fwd.alibi_slopes.
  hc->t = MakeAttentionBuffers(&hc->fwd, 7, c.alibi);
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
  DeviceBuffer q, k, v, out, dout, lse, dq, dk, dv, slopes;
  AttentionBackwardParams p;
};

inline void ToDevice(const HostCall& hc, DeviceCall* dc, bool accumulate) {
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
  if (!hc.t.alibi.empty()) {
    up(&dc->slopes, hc.t.alibi.data(), hc.t.alibi.size() * sizeof(float));
    p.fwd.alibi_slopes = static_cast<const float*>(dc->slopes.get());
  }
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
inline ::testing::AssertionResult GradClose(const char* name, const std::vector<float>& got,
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

inline std::vector<float> Download(const DeviceBuffer& b) {
  std::vector<float> v(b.bytes() / sizeof(float));
  b.Download(v.data());
  return v;
}

inline void CheckGrads(const HostCall& hc, const DeviceCall& dc, double scale) {
  const double bound = RelL2Bound(hc.fwd.dtype);
  const AttentionParams& f = hc.fwd;
  EXPECT_TRUE(
      GradClose("dq", Download(dc.dq), hc.ref.dq, scale, f.seqlen_q, f.heads, f.head_dim, bound));
  EXPECT_TRUE(
      GradClose("dk", Download(dc.dk), hc.ref.dk, scale, f.seqlen_k, f.heads_k, f.head_dim, bound));
  EXPECT_TRUE(
      GradClose("dv", Download(dc.dv), hc.ref.dv, scale, f.seqlen_k, f.heads_k, f.head_dim, bound));
}

// ---- Host-only helpers (the refusal tests run on machines without a GPU) --------------------

// A valid-looking call (16 x 16, 4 heads, d 64, bf16) whose pointers all point at one host
// buffer: enough for checks that refuse before touching a device.
inline AttentionBackwardParams FakeBackwardCall() {
  alignas(256) static char fake[4096];
  AttentionBackwardParams p;
  p.fwd = Shape(16, 16, 4, 4, 64);
  p.fwd.q = p.fwd.k = p.fwd.v = fake;
  p.out = p.dout = fake;
  p.out_dtype = DType::kBF16;
  p.lse = reinterpret_cast<const float*>(fake);
  p.dq = p.dk = p.dv = reinterpret_cast<float*>(fake);
  SetContiguousBackwardStrides(&p);
  return p;
}

// backend.Backward(p) is InvalidArgument naming `needle` (and returns before any device call).
inline void ExpectBackwardRefused(AttentionBackend& backend,
                                  const AttentionBackwardParams& p, const std::string& needle) {
  const absl::Status s = backend.Backward(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(needle), std::string::npos) << s;
}

// What no GPU backward takes, each with a part of the message it must give: fp32 inputs,
// packed sequences, dropout, dO in another dtype than the inputs (each on FakeBackwardCall).
struct BackwardRefusal {
  std::string name;
  AttentionBackwardParams p;
  std::string needle;
};
inline std::vector<BackwardRefusal> RefusalsOfEveryGpuBackward() {
  std::vector<BackwardRefusal> r;
  AttentionBackwardParams p = FakeBackwardCall();
  p.fwd.dtype = DType::kF32;
  p.out_dtype = DType::kF32;
  r.push_back({"Fp32", p, "dtype"});
  p = FakeBackwardCall();
  static const int64_t bounds[] = {0, int64_t{1} << 40};  // covers every position
  p.fwd.seq_bounds = bounds;
  p.fwd.num_seqs = 1;
  r.push_back({"PackedSequences", p, "packed variable-length sequences"});
  p = FakeBackwardCall();
  p.fwd.dropout_p = 0.1f;
  r.push_back({"Dropout", p, "dropout_p"});
  p = FakeBackwardCall();
  p.out_dtype = DType::kF32;
  r.push_back({"OutDtypeMismatch", p, "out_dtype"});
  return r;
}

// backend.ComputeDelta against rowsum(dO * O) on the host, at 255 rows, 5 heads, d 64, bf16.
inline void CheckComputeDelta(AttentionBackend& backend) {
  const Case c{255, 255, 5, 5, 64, DType::kBF16};
  HostCall hc;
  ASSERT_NO_FATAL_FAILURE(MakeHostCall(c, &hc));
  DeviceCall dc;
  ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, false));
  DeviceBuffer delta(hc.lse.size() * sizeof(float));
  delta.Poison();
  ASSERT_TRUE(backend.ComputeDelta(dc.p, static_cast<float*>(delta.get())).ok());
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
      ASSERT_NEAR(got[h * f.seqlen_q + i], want, 1e-4 * (1 + std::abs(want)))
          << "head " << h << " row " << i;
    }
  }
}

}  // namespace kernel_testing
}  // namespace ringattn
