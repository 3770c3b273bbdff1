// The fp64 reference backward: a direct, obviously correct evaluation of the gradients of
// AttentionBackwardParams (one query row at a time, every key scored, all in double). The
// oracle the fast backward and the ring backward are tested against, itself tested against
// finite differences of the fp64 reference forward.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention_backward_params.h"

namespace ringattn {

struct ReferenceBackwardResult {
  std::vector<double> dq;  // [batch, seqlen_q, heads, head_dim], contiguous
  std::vector<double> dk;  // [batch, seqlen_k, heads_k, head_dim], contiguous
  std::vector<double> dv;  // [batch, seqlen_k, heads_k, head_dim], contiguous
};

// The exact gradients of loss = sum(O * dO) with respect to q, k and v, O being the attention
// of p.fwd over this call's keys, recomputed here in fp64 (an exact, max-subtracted softmax per
// row; the forward's results are not used). Reads q, k, v, dout and the options; ignores out,
// lse, delta, dq, dk, dv and accumulate. A fully masked row contributes nothing.
absl::StatusOr<ReferenceBackwardResult> ReferenceBackward(const AttentionBackwardParams& p);

// The same formulas with the forward's statistics taken as given: P = exp(S - p.lse) and
// D = p.delta, or rowsum(dout * out) in double when p.delta is null. When the forward saw more
// keys than this call (a ring step), this is the contribution of this call's keys to the whole
// gradients: what the "cpu_reference" backward backend computes. Needs out (or delta) and lse.
absl::StatusOr<ReferenceBackwardResult> ReferenceBackwardWithForwardStats(
    const AttentionBackwardParams& p);

}  // namespace ringattn
