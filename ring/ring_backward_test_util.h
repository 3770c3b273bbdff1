// Shared pieces of the ring backward tests (ring_backward_test on the host,
// device_ring_backward_test on a GPU): whole-sequence inputs with dO, the whole-sequence
// backward parameters, gradient buffers and the comparison of gradients. Each test keeps its
// own Problem (defaults differ) and its own forward (the host test the fast CPU forward, the
// GPU test the fp64 reference); these take any Problem with the fields dtype, grad_dtype,
// batch, seqlen, heads, heads_k, head_dim, options and seed.
#ifndef RINGATTN_WORKER_RING_RING_BACKWARD_TEST_UTIL_H_
#define RINGATTN_WORKER_RING_RING_BACKWARD_TEST_UTIL_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/attention_backward_params.h"
#include "kernels/dtype.h"
#include "ring/ring_test_util.h"
#include "ring/testing/inprocess_ranks.h"  // WholeAttentionBackward
#include "ring/testing/synthetic_inputs.h"

namespace ringattn::test {

// Whole-sequence inputs of a backward, host memory, pr.dtype except lse.
struct BackwardInputs {
  std::vector<std::byte> q, k, v;  // [batch, seqlen, heads(_k), head_dim]
  std::vector<std::byte> out;      // [batch, seqlen, heads, head_dim]: the forward's output
  std::vector<std::byte> dout;     // [batch, seqlen, heads, head_dim]
  std::vector<float> lse;          // [batch, heads, seqlen]: the forward's LSE
};

// Gradients of one run, converted to fp32 (from grad_dtype).
struct Grads {
  std::vector<float> dq, dk, dv;
};

// Synthetic q, k, v and dout (ids 0, 1, 2, 3 of pr.seed); out and lse sized, left for the
// test's forward to fill (ForwardParams points at them).
template <typename Problem>
BackwardInputs MakeSyntheticBackwardInputs(const Problem& pr) {
  BackwardInputs in;
  const size_t es = DTypeSize(pr.dtype);
  in.q.resize(static_cast<size_t>(QElems(pr)) * es);
  in.out.resize(in.q.size());
  in.dout.resize(in.q.size());
  in.k.resize(static_cast<size_t>(KvElems(pr)) * es);
  in.v.resize(in.k.size());
  in.lse.resize(static_cast<size_t>(pr.batch) * pr.heads * pr.seqlen);
  FillSynthetic(pr.seed, 0, pr.batch, pr.seqlen, pr.heads, pr.head_dim, pr.dtype, in.q.data());
  FillSynthetic(pr.seed, 1, pr.batch, pr.seqlen, pr.heads_k, pr.head_dim, pr.dtype, in.k.data());
  FillSynthetic(pr.seed, 2, pr.batch, pr.seqlen, pr.heads_k, pr.head_dim, pr.dtype, in.v.data());
  FillSynthetic(pr.seed, 3, pr.batch, pr.seqlen, pr.heads, pr.head_dim, pr.dtype, in.dout.data());
  return in;
}

// The forward's params over the whole sequence, options applied, o and lse pointing at
// in->out and in->lse (o in pr.dtype).
template <typename Problem>
AttentionParams ForwardParams(const Problem& pr, BackwardInputs* in) {
  return WholeParams(pr, in->q.data(), in->k.data(), in->v.data(), in->out.data(), in->lse.data(),
                     HostAlibi(pr.options));
}

// The backward's params over the whole sequence (what a single-device call and the fp64
// reference take); no gradient pointers.
template <typename Problem>
AttentionBackwardParams WholeBackwardParams(const Problem& pr, const BackwardInputs& in) {
  AttentionBackwardParams bp;
  bp.fwd = WholeParams(pr, in.q.data(), in.k.data(), in.v.data(), /*o=*/nullptr, /*lse=*/nullptr,
                       HostAlibi(pr.options));
  bp.out = in.out.data();
  bp.dout = in.dout.data();
  bp.out_dtype = pr.dtype;
  bp.lse = in.lse.data();
  SetContiguousBackwardStrides(&bp);
  return bp;
}

// Whole-sequence gradients of pr.grad_dtype, poisoned (0xff bytes are NaN in every dtype) so
// that every element must be written by the run.
struct GradBuffers {
  std::vector<std::byte> dq, dk, dv;

  template <typename Problem>
  static GradBuffers Poisoned(const Problem& pr) {
    const size_t gs = DTypeSize(pr.grad_dtype);
    GradBuffers g;
    g.dq.assign(static_cast<size_t>(QElems(pr)) * gs, std::byte{0xff});
    g.dk.assign(static_cast<size_t>(KvElems(pr)) * gs, std::byte{0xff});
    g.dv.assign(g.dk.size(), std::byte{0xff});
    return g;
  }
  template <typename Problem>
  Grads ToFloat(const Problem& pr) const {
    auto convert = [&](const std::vector<std::byte>& b, int64_t n) {
      std::vector<float> f(n);
      for (int64_t i = 0; i < n; ++i) f[i] = LoadAsFloat(b.data(), i, pr.grad_dtype);
      return f;
    };
    return {convert(dq, QElems(pr)), convert(dk, KvElems(pr)), convert(dv, KvElems(pr))};
  }
};

// The ring's view of the whole problem: inputs from `in`, gradients into `g`.
template <typename Problem>
WholeAttentionBackward WholeBackwardView(const Problem& pr, const BackwardInputs& in,
                                         GradBuffers* g) {
  WholeAttentionBackward w;
  w.dtype = pr.dtype;
  w.grad_dtype = pr.grad_dtype;
  w.batch = pr.batch;
  w.seqlen = pr.seqlen;
  w.heads = pr.heads;
  w.heads_k = pr.heads_k;
  w.head_dim = pr.head_dim;
  w.q = in.q.data();
  w.k = in.k.data();
  w.v = in.v.data();
  w.out = in.out.data();
  w.lse = in.lse.data();
  w.dout = in.dout.data();
  w.dq = g->dq.data();
  w.dk = g->dk.data();
  w.dv = g->dv.data();
  return w;
}

// Worst rel L2 of dq, dk, dv against `want` (fp32 or fp64); expects no NaN and every rel L2
// within tol.
template <typename Want>
double ExpectClose(const Grads& got, const std::vector<Want>& dq, const std::vector<Want>& dk,
                   const std::vector<Want>& dv, double tol, const std::string& what) {
  double worst = 0.0;
  for (const auto& [name, g, want] :
       {std::tuple{"dq", &got.dq, &dq}, std::tuple{"dk", &got.dk, &dk},
        std::tuple{"dv", &got.dv, &dv}}) {
    EXPECT_EQ(g->size(), want->size()) << what << " " << name;
    if (g->size() != want->size()) return 1.0;
    const ErrorStats e =
        CompareTensor(g->data(), DType::kF32, want->data(), static_cast<int64_t>(want->size()));
    EXPECT_EQ(e.nan_count, 0) << what << " " << name << " (an element the run did not write?)";
    EXPECT_LE(e.rel_l2, tol) << what << " " << name << ": " << e.ToString();
    worst = std::max(worst, e.rel_l2);
  }
  return worst;
}

inline double ExpectCloseGrads(const Grads& got, const Grads& want, double tol,
                               const std::string& what) {
  return ExpectClose(got, want.dq, want.dk, want.dv, tol, what);
}

}  // namespace ringattn::test

#endif  // RINGATTN_WORKER_RING_RING_BACKWARD_TEST_UTIL_H_
