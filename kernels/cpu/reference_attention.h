// The fp64 reference: a direct, obviously correct evaluation of AttentionParams (full score
// row, max-subtracted softmax, all in double). The oracle every other backend is tested against.
//
// Non-finite values, per query row (docs/security.md, "Every accepted request is right"):
//   - masked keys take no part: neither their k nor their v is read;
//   - no visible key: o = 0, LSE = -inf;
//   - a visible key whose q.k, scaled score or final score (after softcap and ALiBi) is NaN,
//     infinite or beyond fp32's range (the kernels hold each in fp32): every element of o and
//     the LSE are NaN. So NaN or Inf in q row i poisons row i, in k row j the rows that see j;
//   - otherwise every visible key adds p_j v_j by IEEE arithmetic, p_j = 0 included (underflow,
//     dropout): NaN in v at a visible key gives NaN in that column, Inf gives Inf (NaN where
//     0 * Inf or Inf - Inf); the LSE stays finite.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention_params.h"

namespace ringattn {

struct ReferenceResult {
  std::vector<double> o;    // [batch, seqlen_q, heads, head_dim], contiguous
  std::vector<double> lse;  // [batch, heads, seqlen_q], contiguous; -inf for fully masked rows
};

// Reads q, k, v and the options from `p` (p.o, p.lse and merge_into_output are ignored).
// CANCELLED once `cancel` (when given) reads true; it is polled before each query row.
absl::StatusOr<ReferenceResult> ReferenceForward(const AttentionParams& p,
                                                 const std::atomic<bool>* cancel = nullptr);

// The references' mask, sharing no code with the kernels' (WindowKeySpan, AllowedKeySpan): causal
// and window by plain comparisons of the distance between the positions and, for packed
// sequences, both positions in one sequence, found by a linear walk over seq_bounds.
bool ReferenceKeyAllowed(const AttentionParams& p, int64_t q_pos, int64_t k_pos);

}  // namespace ringattn
