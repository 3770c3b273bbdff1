// Helpers shared by the backward tests (backend_conformance_test and the GPU backward tests):
// one backward call's inputs on the host with the fp64 reference forward's O (rounded to the
// input dtype, as a real forward stores it) and LSE, the fp64 reference gradients, and the
// per-tensor comparison (relative L2 against a bound per dtype; a NaN, an element left
// unwritten in a poisoned output, fails).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/cpu/reference_backward.h"
#include "kernels/cpu/test_util.h"

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
  float dropout_p = 0.0f;  // with dropout_seed, AttentionParams' dropout
  uint64_t dropout_seed = 0;
  std::vector<int64_t> seq_bounds = {};  // packed sequences (positions); empty: one
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
  if (c.dropout_p > 0.0f) {
    absl::StrAppend(&s, "_dropout", static_cast<int>(c.dropout_p * 100), "seed", c.dropout_seed);
  }
  if (!c.seq_bounds.empty()) absl::StrAppend(&s, "_packed", c.seq_bounds.size() - 1);
  return s;
}

// Per gradient tensor: the GPU kernels round P and dS (cuDNN also dQ/dK/dV) to the input dtype.
inline double RelL2Bound(DType t) {
  return t == DType::kBF16 ? 2e-2 : t == DType::kF16 ? 5e-3 : 1e-4;
}

// Host inputs of one call plus the forward's O (rounded to dtype) and LSE from the fp64
// reference forward, and the fp64 reference gradients.
struct HostCall {
  AttentionParams fwd;
  AttentionBuffers t;
  TypedBuffer dout;
  std::vector<float> lse;
  ReferenceBackwardResult ref;
};

// The call of `fwd` (sizes, dtype and options; o_dtype is taken to be dtype), with `alibi` the
// usual geometric slopes in hc->t.alibi, pointed at by fwd.alibi_slopes.
inline void MakeHostCallOf(const AttentionParams& fwd, bool alibi, HostCall* hc) {
  hc->fwd = fwd;
  hc->fwd.o_dtype = fwd.dtype;
  hc->t = MakeAttentionBuffers(&hc->fwd, 7, alibi);
  absl::StatusOr<ReferenceResult> ref_fwd = ReferenceForward(hc->fwd);
  ASSERT_TRUE(ref_fwd.ok()) << ref_fwd.status();
  for (int64_t i = 0; i < hc->t.o.size(); ++i) hc->t.o.Set(i, static_cast<float>(ref_fwd->o[i]));
  hc->lse.assign(ref_fwd->lse.begin(), ref_fwd->lse.end());
  hc->dout = TypedBuffer(fwd.dtype, hc->t.o.size());
  FillRandomNormal(&hc->dout, 99);
  AttentionBackwardParams bp;
  bp.fwd = hc->fwd;
  bp.out = hc->t.o.data();
  bp.dout = hc->dout.data();
  bp.out_dtype = fwd.dtype;
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

inline void MakeHostCall(const Case& c, HostCall* hc) {
  AttentionParams fwd = Shape(c.sq, c.sk, c.h, c.hk, c.d, c.dtype, c.dtype);
  fwd.causal = c.causal;
  fwd.window_left = c.window_left;
  fwd.window_right = c.window_right;
  fwd.softcap = c.softcap;
  fwd.q_pos_offset = c.q_pos_offset;
  fwd.dropout_p = c.dropout_p;
  fwd.dropout_seed = c.dropout_seed;
  if (!c.seq_bounds.empty()) fwd = Packed(fwd, c.seq_bounds);
  MakeHostCallOf(Runs(fwd, c.q_split, c.q_offset2, c.k_split, c.k_offset2), c.alibi, hc);
}

// Compares a downloaded contiguous [b, rows, heads, d] gradient with scale * want.
inline ::testing::AssertionResult GradClose(const char* name, const std::vector<float>& got,
                                            const std::vector<double>& want, double scale,
                                            int64_t rows, int heads, int d, double bound) {
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
  // A gradient that is exactly zero (seq 1 with dropout: dS = P (m dP - D) = 0 with one key)
  // has no scale of its own: its error is then the root mean square against the inputs' unit
  // scale (the kernels' rounding of O to the input dtype leaves ~1e-3 there).
  const double rel = ref2 > 0 ? std::sqrt(err2 / ref2)
                              : std::sqrt(err2 / static_cast<double>(std::max<size_t>(got.size(), 1)));
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

}  // namespace kernel_testing
}  // namespace ringattn
