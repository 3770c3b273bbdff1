// The fp64 reference backward. Deliberately naive, like the reference forward: one query row at
// a time, every key scored in double, the softmax of the row formed in full. It shares no
// numerics with the kernels it checks (only the mask predicate and the position helpers, which
// are the contract itself), nor with the reference forward (its score function is written out
// again here, with its derivative).
#include "kernels/cpu/reference_backward.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "base/status_macros.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/params_check.h"
#include "kernels/score_mod.h"

namespace ringattn {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Reads one head_dim-long row of a tensor into doubles.
void LoadRow(const void* base, int64_t offset, DType dtype, int head_dim,
             double* out) {  // out: [head_dim]
  for (int d = 0; d < head_dim; ++d) out[d] = LoadAsFloat(base, offset + d, dtype);
}

double Dot(const double* a, const double* b, int n) {  // a, b: [n]
  double s = 0.0;
  for (int d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// A score and its derivative with respect to the raw dot product q.k.
struct Score {
  double s;   // scale, softcap, ALiBi applied (ModScore's order)
  double ds;  // d s / d (q.k): scale * (1 - tanh^2) with softcap, scale without
};

Score ScoreWithDerivative(const AttentionParams& p, int h, double dot, int64_t q_pos,
                          int64_t k_pos) {
  const double scale = p.softmax_scale;
  Score r{dot * scale, scale};
  if (p.softcap > 0.0f) {
    const double cap = p.softcap;
    const double t = std::tanh(r.s / cap);
    r.s = cap * t;
    r.ds = scale * (1.0 - t * t);  // d/dx [cap * tanh(x / cap)] = 1 - tanh^2
  }
  if (p.alibi_slopes != nullptr) {
    // A constant shift of the score: no gradient flows through it.
    r.s -= static_cast<double>(p.alibi_slopes[h]) * static_cast<double>(std::llabs(q_pos - k_pos));
  }
  return r;
}

// Element offsets of row `row`, head `head`, batch `b` of a [batch, seq, heads, head_dim] view.
int64_t Offset(int64_t batch_stride, int64_t row_stride, int64_t head_stride, int b, int64_t row,
               int head) {
  return b * batch_stride + row * row_stride + head * head_stride;
}

// Contiguous offsets into the result vectors.
size_t QIndex(const AttentionParams& p, int b, int64_t row, int h) {
  return static_cast<size_t>(((b * p.seqlen_q + row) * p.heads + h) * p.head_dim);
}
size_t KIndex(const AttentionParams& p, int b, int64_t row, int kv_head) {
  return static_cast<size_t>(((b * p.seqlen_k + row) * p.heads_k + kv_head) * p.head_dim);
}

// Scratch of one query row, sized once.
struct RowScratch {
  RowScratch(int head_dim, int64_t seqlen_k)
      : q(head_dim),
        dout(head_dim),
        o(head_dim),
        k(head_dim),
        v(head_dim),
        score(seqlen_k),
        dscore(seqlen_k),
        allowed(seqlen_k) {}
  std::vector<double> q, dout, o, k, v;  // [head_dim] each
  std::vector<double> score;             // [seqlen_k]
  std::vector<double> dscore;            // [seqlen_k]: d score / d dot
  std::vector<bool> allowed;             // [seqlen_k]
};

// The gradients of one query row (batch b, head h, row i) added into `r`. With
// `exact_stats` the row's LSE and D come from its own fp64 forward; otherwise from p.lse and
// p.delta (or out).
void BackwardRow(const AttentionBackwardParams& bp, bool exact_stats, int b, int h, int64_t i,
                 RowScratch* s, ReferenceBackwardResult* r) {
  const AttentionParams& p = bp.fwd;
  const int dim = p.head_dim;
  const int kv_head = h / (p.heads / p.heads_k);
  const int64_t q_pos = QueryPos(p, i);
  LoadRow(p.q, Offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, i, h), p.dtype, dim,
          s->q.data());
  LoadRow(bp.dout, Offset(bp.dout_batch_stride, bp.dout_row_stride, bp.dout_head_stride, b, i, h),
          bp.out_dtype, dim, s->dout.data());

  // Scores of the allowed keys.
  double max_score = kNegInf;
  for (int64_t j = 0; j < p.seqlen_k; ++j) {
    const int64_t k_pos = KeyPos(p, j);
    s->allowed[j] = ReferenceKeyAllowed(p, q_pos, k_pos);
    if (!s->allowed[j]) continue;
    LoadRow(p.k, Offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, j, kv_head), p.dtype,
            dim, s->k.data());
    const Score sc = ScoreWithDerivative(p, h, Dot(s->q.data(), s->k.data(), dim), q_pos, k_pos);
    s->score[j] = sc.s;
    s->dscore[j] = sc.ds;
    if (sc.s > max_score) max_score = sc.s;
  }

  // The row's LSE and D = dO . O.
  double lse;
  double delta;
  if (exact_stats) {
    if (max_score == kNegInf) return;  // fully masked: O = 0 and no gradient
    double sum = 0.0;
    for (int d = 0; d < dim; ++d) s->o[d] = 0.0;
    for (int64_t j = 0; j < p.seqlen_k; ++j) {
      if (!s->allowed[j]) continue;
      const double w = std::exp(s->score[j] - max_score);
      sum += w;  // the softmax's normaliser: dropout comes after it
      const double kept = w * DropoutFactor(p, b, h, q_pos, KeyPos(p, j));
      LoadRow(p.v, Offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, j, kv_head),
              p.dtype, dim, s->v.data());
      for (int d = 0; d < dim; ++d) s->o[d] += kept * s->v[d];
    }
    for (int d = 0; d < dim; ++d) s->o[d] /= sum;
    lse = max_score + std::log(sum);
    delta = Dot(s->dout.data(), s->o.data(), dim);
  } else {
    if (max_score == kNegInf) return;  // no key of this call is allowed: nothing to add
    // lse and delta: [batch, heads, seqlen_q], the seqlen_q axis contiguous.
    const int64_t stat = b * bp.lse_batch_stride + h * bp.lse_head_stride + i;
    lse = bp.lse[stat];
    if (lse == kNegInf) return;  // the forward saw no key: P is 0 everywhere
    if (bp.delta != nullptr) {
      delta = bp.delta[stat];
    } else {
      LoadRow(bp.out, Offset(bp.out_batch_stride, bp.out_row_stride, bp.out_head_stride, b, i, h),
              bp.out_dtype, dim, s->o.data());
      delta = Dot(s->dout.data(), s->o.data(), dim);
    }
  }

  double* dq = &r->dq[QIndex(p, b, i, h)];  // [head_dim]
  for (int64_t j = 0; j < p.seqlen_k; ++j) {
    if (!s->allowed[j]) continue;  // masked: no probability, no gradient
    LoadRow(p.k, Offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, j, kv_head), p.dtype,
            dim, s->k.data());
    LoadRow(p.v, Offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, j, kv_head), p.dtype,
            dim, s->v.data());
    // With dropout, O = sum_j Z_j v_j, Z = P * m (m = DropoutFactor: 0 or 1 / (1 - p)):
    // dV = Z^T dO, dP = m (dO . v), and D = dO . O = sum_j P_j dP_j still, so dS = P (dP - D).
    const double prob = std::exp(s->score[j] - lse);
    const double keep = DropoutFactor(p, b, h, q_pos, KeyPos(p, j));
    const double dprob = keep * Dot(s->dout.data(), s->v.data(), dim);  // dP = m dO . v
    const double dscore = prob * (dprob - delta);                       // dS = P (dP - D)
    const double ddot = dscore * s->dscore[j];                          // through softcap and scale
    double* dk = &r->dk[KIndex(p, b, j, kv_head)];                      // [head_dim]
    double* dv = &r->dv[KIndex(p, b, j, kv_head)];                      // [head_dim]
    for (int d = 0; d < dim; ++d) {
      dv[d] += keep * prob * s->dout[d];
      dq[d] += ddot * s->k[d];
      dk[d] += ddot * s->q[d];
    }
  }
}

absl::StatusOr<ReferenceBackwardResult> Run(const AttentionBackwardParams& bp, bool exact_stats) {
  const AttentionParams& p = bp.fwd;
  ReferenceBackwardResult r;
  r.dq.assign(static_cast<size_t>(p.batch * p.seqlen_q * p.heads * p.head_dim), 0.0);
  r.dk.assign(static_cast<size_t>(p.batch * p.seqlen_k * p.heads_k * p.head_dim), 0.0);
  r.dv.assign(r.dk.size(), 0.0);
  RowScratch scratch(p.head_dim, p.seqlen_k);
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.heads; ++h) {
      for (int64_t i = 0; i < p.seqlen_q; ++i) BackwardRow(bp, exact_stats, b, h, i, &scratch, &r);
    }
  }
  return r;
}

}  // namespace

absl::StatusOr<ReferenceBackwardResult> ReferenceBackward(const AttentionBackwardParams& bp) {
  // Only the inputs are read: the forward part, and dout in the place of the forward's o.
  AttentionParams fwd = bp.fwd;
  fwd.o = const_cast<void*>(bp.dout);
  fwd.o_dtype = bp.out_dtype;
  fwd.lse = nullptr;
  fwd.merge_into_output = false;
  RA_RETURN_IF_ERROR(ValidateParams(fwd));
  return Run(bp, /*exact_stats=*/true);
}

absl::StatusOr<ReferenceBackwardResult> ReferenceBackwardWithForwardStats(
    const AttentionBackwardParams& bp) {
  RA_RETURN_IF_ERROR(ValidateBackwardParams(bp));
  return Run(bp, /*exact_stats=*/false);
}

}  // namespace ringattn
