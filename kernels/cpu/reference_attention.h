// The fp64 reference: a direct, obviously correct evaluation of AttentionParams (full score
// row, max-subtracted softmax, all in double). The oracle every other backend is tested against.
#pragma once

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
absl::StatusOr<ReferenceResult> ReferenceForward(const AttentionParams& p);

// The references' mask, sharing no code with the kernels' (WindowKeySpan, AllowedKeySpan): causal
// and window by plain comparisons of the distance between the positions and, for packed
// sequences, both positions in one sequence, found by a linear walk over seq_bounds.
bool ReferenceKeyAllowed(const AttentionParams& p, int64_t q_pos, int64_t k_pos);

}  // namespace ringattn
