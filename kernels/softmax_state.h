// The numerics of online softmax, in one place (host and device).
//
// A partial softmax over some keys is summarised by (m, l): m the running maximum score and l
// the sum of exp(s - m) over those keys; its un-normalised output accumulator is
// acc = sum exp(s - m) * v. Two partials combine by rescaling both to the larger maximum.
// The kernels' inner loop (a new key block against the running state) and the ring's merge
// of two normalised partial outputs (each state is (lse, 1)) call the same Combine (the fast
// CUDA kernel through CombineWith, the same code with a cheaper exponential).
//
// -inf cases: a partial over fully masked keys has m = -inf and l = 0; it must contribute
// nothing, and exp(-inf - -inf) would be NaN, so a side whose m is -inf gets scale 0 by test,
// not by arithmetic. When both sides are -inf the result is (-inf, 0).
//
// NaN: a partial with a NaN score (or a NaN LSE, in a merge) has l = NaN. Every step below keeps
// it (NaN * anything is NaN; a side at -inf contributes 0 * the other side's factor only when
// that side is empty), so the finished row's output and LSE are NaN: poisoned rows stay poisoned
// through blocks and ring steps alike. Only l = 0 exactly means "no key".
#pragma once

#include <cmath>
#include <limits>

#include "kernels/dtype.h"  // RA_HD

namespace ringattn {

struct SoftmaxState {
  float m = -std::numeric_limits<float>::infinity();  // running max of scores
  float l = 0.0f;                                     // sum of exp(score - m)
};

// Scale factors that bring two partial accumulators onto the combined state.
struct CombineScales {
  float a;
  float b;
};

// The exponential Combine uses: the accurate std::exp (expf on the device).
struct StdExp {
  RA_HD float operator()(float x) const { return std::exp(x); }
};

// Combine's code with the exponential supplied by the caller: `exp(x)` must approximate e^x
// for finite x <= 0 (the only arguments it gets: differences to the new maximum; a side at -inf
// is never exponentiated, see the top of the file). The kernels' inner loop passes a cheaper
// one (the fast CUDA kernel: ex2.approx of x * log2(e), ~2^-22 relative error), which lets the
// compiler turn the -inf tests into selects; everything else, the ring merge included, uses
// Combine. One body, so the rescale math exists once.
template <typename Exp>
RA_HD CombineScales CombineWith(SoftmaxState* state, const SoftmaxState& x, const Exp& exp) {
  const float ninf = -std::numeric_limits<float>::infinity();
  // The larger maximum; a NaN one wins, so that a poisoned side is never taken for empty.
  const float m = state->m > x.m || state->m != state->m ? state->m : x.m;
  if (m == ninf) {
    state->m = ninf;
    state->l = 0.0f;
    return {0.0f, 0.0f};
  }
  const float sa = state->m == ninf ? 0.0f : exp(state->m - m);
  const float sb = x.m == ninf ? 0.0f : exp(x.m - m);
  state->m = m;
  state->l = state->l * sa + x.l * sb;
  return {sa, sb};
}

// Combines `x` into `*state`; returns the factors by which the accumulator of `*state` (a)
// and that of `x` (b) must be multiplied before adding them.
RA_HD CombineScales Combine(SoftmaxState* state, const SoftmaxState& x) {
  return CombineWith(state, x, StdExp{});
}

// Natural-log log-sum-exp of a finished state; -inf when no key contributed, NaN when l is.
RA_HD float StateLse(const SoftmaxState& s) {
  return s.l == 0.0f ? -std::numeric_limits<float>::infinity() : s.m + std::log(s.l);
}

// Factor that turns the state's accumulator into the normalised output (0 for an empty row,
// NaN when l is).
RA_HD float StateNormalizer(const SoftmaxState& s) { return s.l == 0.0f ? 0.0f : 1.0f / s.l; }

// Merge of two normalised partial outputs given their LSEs: out = wa * out_a + wb * out_b and
// the merged LSE. Overflow-safe: the weights are exp(lse_x - lse_merged) <= 1.
struct LseMerge {
  float wa;
  float wb;
  float lse;
};

RA_HD LseMerge MergeLse(float lse_a, float lse_b) {
  SoftmaxState s{lse_a, 1.0f};
  const float ninf = -std::numeric_limits<float>::infinity();
  if (lse_a == ninf) s.l = 0.0f;
  const SoftmaxState x{lse_b, lse_b == ninf ? 0.0f : 1.0f};
  const CombineScales c = Combine(&s, x);
  const float norm = StateNormalizer(s);
  return {c.a * norm, c.b * norm, StateLse(s)};
}

}  // namespace ringattn
