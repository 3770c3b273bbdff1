// The fp64 reference. Deliberately naive: one query row at a time, every key scored, a full
// max-subtracted softmax over the row. No blocking and no online rescaling, so that it shares
// no numerics with the kernels it checks (only the mask predicate and the position helpers,
// which are the contract itself).
#include "kernels/cpu/reference_attention.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "base/status_macros.h"
#include "kernels/params_check.h"
#include "kernels/score_mod.h"

namespace ringattn {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kNan = std::numeric_limits<double>::quiet_NaN();

// Reads one head_dim-long row of an input tensor into doubles.
void LoadRow(const void* base, int64_t offset, DType dtype, int head_dim,
             double* out) {  // out: [head_dim]
  for (int d = 0; d < head_dim; ++d) out[d] = LoadAsFloat(base, offset + d, dtype);
}

// The score function of AttentionParams in double, in ModScore's order: scale, softcap, ALiBi.
// Written out here rather than calling the float ModScore so that the oracle does not inherit
// its rounding.
double ScoreInDouble(const AttentionParams& p, int h, double dot, int64_t q_pos, int64_t k_pos) {
  double s = dot * static_cast<double>(p.softmax_scale);
  if (p.softcap > 0.0f) {
    const double cap = p.softcap;
    s = cap * std::tanh(s / cap);
  }
  if (p.alibi_slopes != nullptr) {
    const double distance = static_cast<double>(std::llabs(q_pos - k_pos));
    s -= static_cast<double>(p.alibi_slopes[h]) * distance;
  }
  return s;
}

// Offsets (in elements) of row `row` of head `head` in batch `b`, for each tensor.
int64_t QOffset(const AttentionParams& p, int b, int64_t row, int head) {
  return b * p.q_batch_stride + row * p.q_row_stride + head * p.q_head_stride;
}
int64_t KOffset(const AttentionParams& p, int b, int64_t row, int head) {
  return b * p.k_batch_stride + row * p.k_row_stride + head * p.k_head_stride;
}
int64_t VOffset(const AttentionParams& p, int b, int64_t row, int head) {
  return b * p.v_batch_stride + row * p.v_row_stride + head * p.v_head_stride;
}

// Whether fp32 holds x: finite and within its range (false for NaN and infinities). The kernels
// compute scores in fp32, so a score beyond it is their +-inf.
bool FitsFloat(double x) { return std::fabs(x) <= std::numeric_limits<float>::max(); }

// Computes query row i of head h: fills o_row and returns the row's LSE, by the rules in
// reference_attention.h (plain IEEE arithmetic in double on the visible keys; a score fp32
// cannot hold makes the row NaN). `scores` and `row_buf` are caller-owned scratch.
double ComputeRow(const AttentionParams& p, int b, int h, int64_t i,
                  const double* q_row,  // [head_dim]
                  double* scores,       // [seqlen_k]
                  char* visible,        // [seqlen_k]
                  double* row_buf,      // [head_dim]
                  double* o_row) {      // [head_dim]
  const int kv_head = h / (p.heads / p.heads_k);
  const int64_t q_pos = QueryPos(p, i);

  // Scores of the visible keys; masked keys take no part below (neither k nor v is read).
  bool any_visible = false;
  bool score_not_fp32 = false;
  for (int64_t j = 0; j < p.seqlen_k; ++j) {
    visible[j] = ReferenceKeyAllowed(p, q_pos, KeyPos(p, j)) ? 1 : 0;
    if (!visible[j]) continue;
    any_visible = true;
    LoadRow(p.k, KOffset(p, b, j, kv_head), p.dtype, p.head_dim, row_buf);
    double dot = 0.0;
    for (int d = 0; d < p.head_dim; ++d) dot += q_row[d] * row_buf[d];
    const double scaled = dot * static_cast<double>(p.softmax_scale);
    scores[j] = ScoreInDouble(p, h, dot, q_pos, KeyPos(p, j));
    // The kernels hold q.k, the scaled score and the score in fp32 in turn.
    if (!FitsFloat(dot) || !FitsFloat(scaled) || !FitsFloat(scores[j])) score_not_fp32 = true;
  }

  // No visible key: the output row is 0 and the LSE -inf by contract.
  if (!any_visible) {
    for (int d = 0; d < p.head_dim; ++d) o_row[d] = 0.0;
    return kNegInf;
  }
  // A visible score that is NaN, infinite or beyond fp32: the whole row is NaN.
  if (score_not_fp32) {
    for (int d = 0; d < p.head_dim; ++d) o_row[d] = kNan;
    return kNan;
  }

  double max_score = kNegInf;
  for (int64_t j = 0; j < p.seqlen_k; ++j) {
    if (visible[j] && scores[j] > max_score) max_score = scores[j];
  }
  double sum = 0.0;
  for (int d = 0; d < p.head_dim; ++d) o_row[d] = 0.0;
  for (int64_t j = 0; j < p.seqlen_k; ++j) {
    if (!visible[j]) continue;
    const double w = std::exp(scores[j] - max_score);
    sum += w;  // the softmax's normaliser: dropout comes after it
    // Every visible key adds w v, w = 0 included (underflow, dropout): 0 * inf is NaN.
    const double kept = w * DropoutFactor(p, b, h, q_pos, KeyPos(p, j));
    LoadRow(p.v, VOffset(p, b, j, kv_head), p.dtype, p.head_dim, row_buf);
    for (int d = 0; d < p.head_dim; ++d) o_row[d] += kept * row_buf[d];
  }
  for (int d = 0; d < p.head_dim; ++d) o_row[d] /= sum;
  return max_score + std::log(sum);
}

}  // namespace

bool ReferenceKeyAllowed(const AttentionParams& p, int64_t q_pos, int64_t k_pos) {
  // Plain comparisons of the distance, on purpose not the kernels' WindowKeySpan: an oracle
  // that shares the code it judges shares its bugs. Positions are in [0, 2^62): no overflow.
  if (p.causal && k_pos > q_pos) return false;
  if (p.window_left >= 0 && q_pos - k_pos > p.window_left) return false;
  if (p.window_right >= 0 && k_pos - q_pos > p.window_right) return false;
  if (p.seq_bounds == nullptr) return true;
  int q_seq = -1, k_seq = -1;  // the sequence whose [bound i, bound i + 1) holds each
  for (int i = 0; i < p.num_seqs; ++i) {
    if (p.seq_bounds[i] <= q_pos && q_pos < p.seq_bounds[i + 1]) q_seq = i;
    if (p.seq_bounds[i] <= k_pos && k_pos < p.seq_bounds[i + 1]) k_seq = i;
  }
  return q_seq >= 0 && q_seq == k_seq;
}

absl::StatusOr<ReferenceResult> ReferenceForward(const AttentionParams& p,
                                                 const std::atomic<bool>* cancel) {
  RA_RETURN_IF_ERROR(ValidateParams(p));

  const int64_t dim = p.head_dim;
  ReferenceResult result;
  result.o.assign(static_cast<size_t>(p.batch * p.seqlen_q * p.heads * dim), 0.0);
  result.lse.assign(static_cast<size_t>(p.batch * p.heads * p.seqlen_q), kNegInf);

  std::vector<double> q_row(dim);                               // [head_dim]
  std::vector<double> row_buf(dim);                             // [head_dim]
  std::vector<double> scores(static_cast<size_t>(p.seqlen_k));  // [seqlen_k]
  std::vector<char> visible(static_cast<size_t>(p.seqlen_k));    // [seqlen_k]
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.heads; ++h) {
      for (int64_t i = 0; i < p.seqlen_q; ++i) {
        if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) {
          return absl::CancelledError("the fp64 reference was cancelled");
        }
        LoadRow(p.q, QOffset(p, b, i, h), p.dtype, p.head_dim, q_row.data());
        // result.o is contiguous [batch, seqlen_q, heads, head_dim].
        double* o_row = &result.o[static_cast<size_t>(((b * p.seqlen_q + i) * p.heads + h) * dim)];
        // result.lse is contiguous [batch, heads, seqlen_q].
        result.lse[static_cast<size_t>((b * p.heads + h) * p.seqlen_q + i)] =
            ComputeRow(p, b, h, i, q_row.data(), scores.data(), visible.data(), row_buf.data(),
                       o_row);
      }
    }
  }
  return result;
}

}  // namespace ringattn
