#include "kernels/params_check.h"

#include <cmath>
#include <string>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/score_mod.h"

namespace ringattn {

absl::Status ValidateHeadDim(int head_dim) {
  for (int d : kSupportedHeadDims) {
    if (d == head_dim) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported head_dim ", head_dim, "; expected one of 64, 128, 256"));
}

namespace {

// A second run of positions (split != kNoPosSplit) starts at a row >= 1 and at a position after
// the first run's last: positions must grow with the row.
absl::Status ValidatePositionRun(const char* name, int64_t split, int64_t offset, int64_t offset2,
                                 int64_t stride) {
  if (split == kNoPosSplit) return absl::OkStatus();
  if (split < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, "_split must be >= 1 (or kNoPosSplit for one run), got ", split));
  }
  if (offset2 <= offset + (split - 1) * stride) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, "_offset2 (", offset2, ") must be after the first run's last position (",
                     offset + (split - 1) * stride, "): positions must grow with the row"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckSoftmaxScale(float scale, absl::string_view name) {
  // Also false for NaN.
  if (scale >= kMinSoftmaxScale && scale <= kMaxSoftmaxScale) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(name, " must be finite and in [",
                                                 kMinSoftmaxScale, ", ", kMaxSoftmaxScale,
                                                 "], got ", scale));
}

absl::Status CheckSequenceBounds(const int64_t* bounds, size_t count, absl::string_view name,
                                 absl::string_view length_name, int64_t length) {
  if (length >= 0 && (count < 2 || bounds[0] != 0 || bounds[count - 1] != length)) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, " must run from 0 to ", length_name, " ", length, ", got ", count,
        " entries from ", count == 0 ? 0 : bounds[0], " to ", count == 0 ? 0 : bounds[count - 1]));
  }
  // "cu_seqlens" of "options.cu_seqlens".
  const absl::string_view leaf = name.substr(name.rfind('.') + 1);
  for (size_t i = 1; i < count; ++i) {
    if (bounds[i] < bounds[i - 1]) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be non-decreasing, got ", leaf,
                                                     "[", i - 1, "] = ", bounds[i - 1], " > ",
                                                     leaf, "[", i, "] = ", bounds[i]));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateSequenceBounds(const AttentionParams& p) {
  if (p.seq_bounds == nullptr) {
    if (p.num_seqs != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("num_seqs is ", p.num_seqs, " but seq_bounds is null"));
    }
    return absl::OkStatus();
  }
  if (p.num_seqs < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_seqs must be >= 1 with seq_bounds, got ", p.num_seqs));
  }
  RA_RETURN_IF_ERROR(CheckSequenceBounds(p.seq_bounds, static_cast<size_t>(p.num_seqs) + 1,
                                         "seq_bounds"));
  // Every position of the call inside [seq_bounds[0], seq_bounds[num_seqs]) (positions grow
  // with the row, so the first and last rows bound them).
  const int64_t lo = p.seq_bounds[0], hi = p.seq_bounds[p.num_seqs];
  for (const auto& [name, rows, first, last] :
       {std::tuple{"query", p.seqlen_q, QueryPos(p, 0), QueryPos(p, p.seqlen_q - 1)},
        std::tuple{"key", p.seqlen_k, KeyPos(p, 0), KeyPos(p, p.seqlen_k - 1)}}) {
    if (rows > 0 && (first < lo || last >= hi)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "seq_bounds [", lo, ", ", hi, ") must cover every ", name, " position, got ", first,
          " .. ", last));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateParams(const AttentionParams& p) {
  if (p.batch <= 0)
    return absl::InvalidArgumentError(absl::StrCat("batch must be > 0, got ", p.batch));
  if (p.seqlen_q < 0) {
    return absl::InvalidArgumentError(absl::StrCat("seqlen_q must be >= 0, got ", p.seqlen_q));
  }
  if (p.seqlen_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("seqlen_k must be >= 0, got ", p.seqlen_k));
  }
  if (p.heads <= 0)
    return absl::InvalidArgumentError(absl::StrCat("heads must be > 0, got ", p.heads));
  if (p.heads_k <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("heads_k must be > 0, got ", p.heads_k));
  }
  if (p.heads % p.heads_k != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("heads (", p.heads, ") must be a multiple of heads_k (", p.heads_k, ")"));
  }
  if (absl::Status s = ValidateHeadDim(p.head_dim); !s.ok()) return s;
  if (p.seqlen_q > 0 && (p.q == nullptr || p.o == nullptr)) {
    return absl::InvalidArgumentError("q and o must be non-null when seqlen_q > 0");
  }
  if (p.seqlen_k > 0 && (p.k == nullptr || p.v == nullptr)) {
    return absl::InvalidArgumentError("k and v must be non-null when seqlen_k > 0");
  }
  RA_RETURN_IF_ERROR(CheckSoftmaxScale(p.softmax_scale, "softmax_scale"));
  if (!(p.dropout_p >= 0.0f && p.dropout_p < 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("dropout_p must be in [0, 1), got ", p.dropout_p));
  }
  if (!std::isfinite(p.softcap) || p.softcap < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("softcap must be finite and >= 0 (0 disables), got ", p.softcap));
  }
  if (p.window_left < kUnboundedWindow) {
    return absl::InvalidArgumentError(
        absl::StrCat("window_left must be >= 0 or -1 (unbounded), got ", p.window_left));
  }
  if (p.window_right < kUnboundedWindow) {
    return absl::InvalidArgumentError(
        absl::StrCat("window_right must be >= 0 or -1 (unbounded), got ", p.window_right));
  }
  if (p.q_pos_stride <= 0 || p.k_pos_stride <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("q_pos_stride and k_pos_stride must be > 0, got ", p.q_pos_stride, " and ",
                     p.k_pos_stride));
  }
  RA_RETURN_IF_ERROR(
      ValidatePositionRun("q_pos", p.q_pos_split, p.q_pos_offset, p.q_pos_offset2, p.q_pos_stride));
  RA_RETURN_IF_ERROR(
      ValidatePositionRun("k_pos", p.k_pos_split, p.k_pos_offset, p.k_pos_offset2, p.k_pos_stride));
  RA_RETURN_IF_ERROR(ValidateSequenceBounds(p));
  if (p.merge_into_output) {
    if (p.o_dtype != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat(
          "o_dtype must be fp32 with merge_into_output, got ", std::string(DTypeName(p.o_dtype))));
    }
    if (p.lse == nullptr)
      return absl::InvalidArgumentError("lse must be non-null with merge_into_output");
  }
  if ((p.partial_o == nullptr) != (p.partial_lse == nullptr)) {
    return absl::InvalidArgumentError(
        "partial_o and partial_lse must be set together (a partial result to merge with)");
  }
  if (p.partial_o != nullptr && p.merge_into_output) {
    return absl::InvalidArgumentError(
        "partial_o is for a call that writes o; merge_into_output merges into o itself");
  }
  return absl::OkStatus();
}

void SetContiguousStrides(AttentionParams* p) {
  const int64_t d = p->head_dim;
  p->q_head_stride = d;
  p->q_row_stride = d * p->heads;
  p->q_batch_stride = p->q_row_stride * p->seqlen_q;
  p->o_head_stride = d;
  p->o_row_stride = d * p->heads;
  p->o_batch_stride = p->o_row_stride * p->seqlen_q;
  p->k_head_stride = d;
  p->k_row_stride = d * p->heads_k;
  p->k_batch_stride = p->k_row_stride * p->seqlen_k;
  p->v_head_stride = p->k_head_stride;
  p->v_row_stride = p->k_row_stride;
  p->v_batch_stride = p->k_batch_stride;
  p->lse_head_stride = p->seqlen_q;
  p->lse_batch_stride = p->seqlen_q * p->heads;
}

double ForwardFlops(const AttentionParams& p) {
  double f = 4.0 * p.batch * p.heads * static_cast<double>(p.seqlen_q) *
             static_cast<double>(p.seqlen_k) * p.head_dim;
  if (p.causal && p.seqlen_q == p.seqlen_k) f *= 0.5;
  return f;
}

}  // namespace ringattn
