// Shared by the GPU backward tests (cuda_backward_test, cudnn_backward_test): the device copies
// of one backward call (kernels/cpu/backward_test_util.h makes it on the host), their
// comparison with the fp64 reference gradients, and the refusals every GPU backward shares.
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
#include "kernels/cpu/backward_test_util.h"
#include "kernels/cpu/test_util.h"
#include "kernels/cuda/gpu_test_util.h"

namespace ringattn {
namespace kernel_testing {

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
inline void ExpectBackwardRefused(AttentionBackend& backend, const AttentionBackwardParams& p,
                                  const std::string& needle) {
  const absl::Status s = backend.Backward(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(needle), std::string::npos) << s;
}

// What no GPU backward takes, each with a part of the message it must give: dO in another
// dtype than the inputs (with bf16 and fp32 inputs: fp32 calls are checked before they are
// rounded), each on FakeBackwardCall.
struct BackwardRefusal {
  std::string name;
  AttentionBackwardParams p;
  std::string needle;
};
inline std::vector<BackwardRefusal> RefusalsOfEveryGpuBackward() {
  std::vector<BackwardRefusal> r;
  AttentionBackwardParams p = FakeBackwardCall();
  p.out_dtype = DType::kF32;
  r.push_back({"OutDtypeMismatch", p, "out_dtype"});
  p.fwd.dtype = DType::kF32;
  p.out_dtype = DType::kBF16;
  r.push_back({"OutDtypeMismatchFp32", p, "out_dtype"});
  return r;
}

}  // namespace kernel_testing
}  // namespace ringattn
