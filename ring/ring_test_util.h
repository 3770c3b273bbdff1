// Shared pieces of the ring tests (host_ring_test, ring_backward_test, device_ring_test,
// device_ring_backward_test): whole-sequence synthetic tensors, the single call's parameters over
// the whole sequence, the host tests' problem and option sweep, the options every ring refuses
// and the names of the (world, layout, causal) cases. The templates take any Problem with the
// fields dtype, batch, seqlen, heads, heads_k, head_dim, options and seed (the device tests keep
// their own, with other defaults).
#ifndef RINGATTN_WORKER_RING_RING_TEST_UTIL_H_
#define RINGATTN_WORKER_RING_RING_TEST_UTIL_H_

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention_params.h"
#include "kernels/params_check.h"
#include "ring/layout.h"
#include "ring/ring_step.h"
#include "ring/testing/inprocess_ranks.h"
#include "ring/testing/synthetic_inputs.h"

namespace ringattn::test {

// Elements of q (and out): [batch, seqlen, heads, head_dim].
template <typename Problem>
int64_t QElems(const Problem& pr) {
  return static_cast<int64_t>(pr.batch) * pr.seqlen * pr.heads * pr.head_dim;
}

// Elements of k (and v): [batch, seqlen, heads_k, head_dim].
template <typename Problem>
int64_t KvElems(const Problem& pr) {
  return static_cast<int64_t>(pr.batch) * pr.seqlen * pr.heads_k * pr.head_dim;
}

// Whole-sequence host tensors: inputs and the outputs of one run.
struct RingTensors {
  std::vector<std::byte> q, k, v, out;  // [batch, seqlen, heads(_k), head_dim], pr.dtype
  std::vector<float> lse;               // [batch, heads, seqlen]
};

// Synthetic q, k, v (ids 0, 1, 2 of pr.seed); out and lse poisoned (0xff bytes, NaN): every
// element must be written by the run.
template <typename Problem>
RingTensors MakeInputs(const Problem& pr) {
  RingTensors t;
  const size_t es = DTypeSize(pr.dtype);
  t.q.resize(static_cast<size_t>(QElems(pr)) * es);
  t.k.resize(static_cast<size_t>(KvElems(pr)) * es);
  t.v.resize(t.k.size());
  FillSynthetic(pr.seed, 0, pr.batch, pr.seqlen, pr.heads, pr.head_dim, pr.dtype, t.q.data());
  FillSynthetic(pr.seed, 1, pr.batch, pr.seqlen, pr.heads_k, pr.head_dim, pr.dtype, t.k.data());
  FillSynthetic(pr.seed, 2, pr.batch, pr.seqlen, pr.heads_k, pr.head_dim, pr.dtype, t.v.data());
  t.out.assign(t.q.size(), std::byte{0xff});
  t.lse.assign(static_cast<size_t>(pr.batch) * pr.heads * pr.seqlen, std::nanf(""));
  return t;
}

// The ring's view of the whole-sequence tensors.
template <typename Problem>
WholeAttention View(const Problem& pr, RingTensors& t) {
  WholeAttention w;
  w.dtype = pr.dtype;
  w.batch = pr.batch;
  w.seqlen = pr.seqlen;
  w.heads = pr.heads;
  w.heads_k = pr.heads_k;
  w.head_dim = pr.head_dim;
  w.q = t.q.data();
  w.k = t.k.data();
  w.v = t.v.data();
  w.out = t.out.data();
  w.lse = t.lse.data();
  return w;
}

// The single call on the whole sequence, options applied, pointers as given (host or device).
template <typename Problem>
AttentionParams WholeParams(const Problem& pr, const void* q, const void* k, const void* v, void* o,
                            float* lse, const float* alibi) {
  AttentionParams p;
  p.batch = pr.batch;
  p.seqlen_q = p.seqlen_k = pr.seqlen;
  p.heads = pr.heads;
  p.heads_k = pr.heads_k;
  p.head_dim = pr.head_dim;
  p.dtype = p.o_dtype = pr.dtype;
  p.q = q;
  p.k = k;
  p.v = v;
  p.o = o;
  p.lse = lse;
  SetContiguousStrides(&p);
  const RingAttentionOptions& opt = pr.options;
  p.softmax_scale = RingSoftmaxScale(opt, pr.head_dim);
  p.causal = opt.causal;
  p.window_left = opt.window_size.first;
  p.window_right = opt.window_size.second;
  p.alibi_slopes = alibi;
  p.softcap = opt.softcap;
  p.dropout_p = opt.dropout_p;
  p.dropout_seed = opt.dropout_seed;
  SetSequenceBounds(&p, opt.seq_bounds.data(), opt.seq_bounds.size());
  return p;
}

// The host ALiBi slopes of `options`, null without.
inline const float* HostAlibi(const RingAttentionOptions& options) {
  return options.alibi_slopes.empty() ? nullptr : options.alibi_slopes.data();
}

// The host ring tests' problem (host_ring_test, ring_backward_test; the forward ignores
// grad_dtype): fp32, 255 positions, 5 heads of 64.
struct HostProblem {
  DType dtype = DType::kF32;
  DType grad_dtype = DType::kF32;
  int batch = 1;
  int64_t seqlen = 255;
  int heads = 5;
  int heads_k = 5;
  int head_dim = 64;
  RingAttentionOptions options;
  uint64_t seed = 7;
};

// One case of the rings' option sweeps: sizes and options, named for the test's name.
struct OptionCase {
  std::string name;
  DType dtype;
  int heads, heads_k, head_dim;
  int64_t seqlen;
  bool causal;
  std::pair<int64_t, int64_t> window;
  bool alibi;
  float softcap;
  float dropout = 0.0f;                  // with seed 17 (ApplyOptionCase)
  std::vector<int64_t> cu_seqlens = {};  // packed sequences (options.seq_bounds); empty: one
};
inline void PrintTo(const OptionCase& c, std::ostream* os) { *os << c.name; }

// The sizes and options of an option case `c` (fields dtype, heads, heads_k, head_dim, seqlen,
// causal, window, softcap) on `pr`; ALiBi slopes are left to the test.
template <typename OptionCase, typename Problem>
void ApplyOptionCase(const OptionCase& c, Problem* pr) {
  pr->dtype = c.dtype;
  pr->heads = c.heads;
  pr->heads_k = c.heads_k;
  pr->head_dim = c.head_dim;
  pr->seqlen = c.seqlen;
  pr->options.causal = c.causal;
  pr->options.window_size = c.window;
  pr->options.softcap = c.softcap;
  if constexpr (requires { c.dropout; }) {
    pr->options.dropout_p = c.dropout;
    pr->options.dropout_seed = 17;
  }
  if constexpr (requires { c.cu_seqlens; }) pr->options.seq_bounds = c.cu_seqlens;
}

// The host rings' option sweep, forward and backward alike: every option alone and together,
// GQA and MQA, dtypes, head dims, lengths that leave ranks with few or no rows, packed sequences
// (an empty one, single rows, boundaries inside every rank's shard).
inline std::vector<OptionCase> HostOptionCases() {
  return {
      {"gqa8to2", DType::kF32, 8, 2, 64, 255, true, {-1, -1}, false, 0},
      {"mqa8to1", DType::kF32, 8, 1, 64, 7, false, {-1, -1}, false, 0},
      {"window", DType::kF32, 5, 5, 64, 255, false, {17, 9}, false, 0},
      {"window_causal", DType::kF32, 5, 5, 64, 255, true, {40, -1}, false, 0},
      {"window_zero", DType::kF32, 2, 2, 64, 64, false, {0, 0}, false, 0},
      {"dropout", DType::kF32, 8, 2, 64, 255, true, {-1, -1}, false, 0, 0.2f},
      {"dropout_all_bf16", DType::kBF16, 8, 2, 64, 381, true, {60, -1}, true, 20.0f, 0.5f},
      {"alibi", DType::kF32, 5, 5, 64, 255, true, {-1, -1}, true, 0},
      {"softcap", DType::kF32, 5, 5, 128, 255, false, {-1, -1}, false, 5.0f},
      {"all_fp32", DType::kF32, 8, 2, 64, 381, true, {60, -1}, true, 20.0f},
      {"all_bf16", DType::kBF16, 8, 2, 128, 381, true, {60, -1}, true, 20.0f},
      {"all_fp16", DType::kF16, 8, 2, 64, 381, false, {30, 30}, true, 20.0f},
      {"hd256", DType::kBF16, 2, 1, 256, 100, true, {-1, -1}, false, 0},
      {"seq1", DType::kF32, 5, 5, 64, 1, true, {-1, -1}, false, 0},
      {"seq2_more_ranks_than_rows", DType::kF32, 2, 1, 64, 2, true, {-1, -1}, false, 0},
      {"packed_causal_gqa",
       DType::kF32,
       8,
       2,
       64,
       381,
       true,
       {-1, -1},
       false,
       0,
       0,
       {0, 1, 8, 8, 200, 381}},
      {"packed_full_heads5",
       DType::kF32,
       5,
       5,
       64,
       255,
       false,
       {-1, -1},
       false,
       0,
       0,
       {0, 100, 101, 255}},
      {"packed_all_bf16",
       DType::kBF16,
       8,
       2,
       128,
       381,
       true,
       {60, -1},
       true,
       20.0f,
       0.3f,
       {0, 7, 150, 381}},
  };
}

inline std::string OptionCaseName(const ::testing::TestParamInfo<OptionCase>& info) {
  return info.param.name;
}

// ALiBi slopes 2^-(h + 1) for each of `heads` heads.
inline std::vector<float> HostAlibiSlopes(int heads) {
  std::vector<float> slopes;
  for (int h = 0; h < heads; ++h) slopes.push_back(std::pow(2.0f, -(h + 1.0f)));
  return slopes;
}

// Options every ring refuses up front, each with a part of the message it must give.
struct RefusedOptions {
  RingAttentionOptions options;
  std::string expect;
};

inline std::vector<RefusedOptions> RefusedOptionCases() {
  std::vector<RefusedOptions> bad(4);
  bad[0].options.dropout_p = 1.0f;  // dropping everything: outside [0, 1)
  bad[0].expect = "dropout_p must be in [0, 1)";
  bad[1].options.return_attn_probs = true;
  bad[1].expect = "return_attn_probs";
  bad[2].options.alibi_slopes = {0.5f};
  bad[2].expect = "alibi_slopes";
  bad[3].options.window_size = {-3, 0};
  bad[3].expect = "window_size";
  return bad;
}

// A ring case: world size, layout and causal; named "w3_zigzag_causal".
using RingCase = std::tuple<int /*world*/, Layout, bool /*causal*/>;

inline std::string RingCaseName(const ::testing::TestParamInfo<RingCase>& info) {
  return absl::StrCat("w", std::get<0>(info.param), "_",
                      std::string(LayoutName(std::get<1>(info.param))),
                      std::get<2>(info.param) ? "_causal" : "_full");
}

// Calls fn(plan, world, rank) for every rank of the plans of each layout at W = 1..4 and
// sequence lengths 2 (ranks without rows), 7 (uneven shards) and 1001, under a SCOPED_TRACE
// naming them.
template <typename Fn>
void ForEachRankOfSmallPlans(Fn fn) {
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStripe}) {
    for (int world : {1, 2, 3, 4}) {
      for (int64_t seqlen : {int64_t{2}, int64_t{7}, int64_t{1001}}) {
        absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, world, layout);
        ASSERT_TRUE(plan.ok()) << plan.status();
        for (int r = 0; r < world; ++r) {
          SCOPED_TRACE(absl::StrCat(std::string(LayoutName(layout)), " W=", world, " s=", seqlen,
                                    " rank ", r));
          fn(*plan, world, r);
        }
      }
    }
  }
}

}  // namespace ringattn::test

#endif  // RINGATTN_WORKER_RING_RING_TEST_UTIL_H_
