// Validation of AttentionParams shared by every backend: each error names the field and the
// value it expected.
#pragma once

#include <initializer_list>

#include "absl/status/status.h"
#include "kernels/attention_params.h"

namespace ringattn {

// The head dimensions the kernels are instantiated for.
inline constexpr int kSupportedHeadDims[] = {64, 128, 256};

absl::Status ValidateHeadDim(int head_dim);

// Checks sizes, pointers, head ratio, dtypes, options and the merge mode.
absl::Status ValidateParams(const AttentionParams& p);

// seq_bounds (host memory): null with num_seqs 0, or num_seqs >= 1 non-decreasing bounds that
// cover every query and key position of the call. Part of ValidateParams.
absl::Status ValidateSequenceBounds(const AttentionParams& p);

// Fills strides for contiguous [batch, seq, heads, head_dim] q/k/v/o and [batch, heads, seq]
// lse, keeping every pointer, size and option already set.
void SetContiguousStrides(AttentionParams* p);

// Floating-point operations of one forward call as conventionally counted:
// 4 * batch * heads * seqlen_q * seqlen_k * head_dim, halved when causal with equal lengths.
double ForwardFlops(const AttentionParams& p);

}  // namespace ringattn
