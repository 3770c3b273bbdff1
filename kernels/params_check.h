// Validation of AttentionParams shared by every backend: each error names the field and the
// value it expected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
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

// A list of packed-sequence bounds as every layer takes it (a request's cu_seqlens, a ring's or
// a comparison case's): non-decreasing and, when `length` >= 0, at least two from 0 to
// `length`. Errors name `name` and `length_name`, e.g. "options.cu_seqlens must run from 0 to
// q.shape[1] (seq) 7, got 3 entries from 0 to 9".
absl::Status CheckSequenceBounds(const int64_t* bounds, size_t count, absl::string_view name,
                                 absl::string_view length_name = "", int64_t length = -1);

// The softmax scales every layer takes: finite, in [kMinSoftmaxScale, kMaxSoftmaxScale]. Below,
// a subnormal scale, which GPUs flush to 0; above, scales that turn fp32's rounding of q.k into
// score errors of order 1 on ordinary inputs (and whose scores overflow fp32 sooner). Errors
// name `name`, e.g. "options.softmax_scale must be finite and in [1.17549e-38, 1e+06], got inf".
inline constexpr float kMinSoftmaxScale = 1.17549435e-38f;  // FLT_MIN, the smallest normal
inline constexpr float kMaxSoftmaxScale = 1e6f;
absl::Status CheckSoftmaxScale(float scale, absl::string_view name);

// Points p at `count` packed-sequence bounds (AttentionParams::seq_bounds), or at none for 0.
inline void SetSequenceBounds(AttentionParams* p, const int64_t* bounds, size_t count) {
  p->seq_bounds = count == 0 ? nullptr : bounds;
  p->num_seqs = count == 0 ? 0 : static_cast<int>(count) - 1;
}

// Fills strides for contiguous [batch, seq, heads, head_dim] q/k/v/o and [batch, heads, seq]
// lse, keeping every pointer, size and option already set.
void SetContiguousStrides(AttentionParams* p);

// Floating-point operations of one forward call as conventionally counted:
// 4 * batch * heads * seqlen_q * seqlen_k * head_dim, halved when causal with equal lengths.
double ForwardFlops(const AttentionParams& p);

}  // namespace ringattn
