// The non-finite guard of the fast GPU backends (cuda, cudnn): their kernels are right for
// finite inputs whose scores stay far inside fp32, not for NaN, infinities or overflowing
// scores (the rule of kernels/cpu/reference_attention.h). Per call, decided on the device
// without a host sync: a scan of the call's inputs writes a device word, the fast kernels leave
// o and lse untouched when it is set, and the simple kernel (reference_attention.h), which
// follows the rule, then computes the call; when it is clear the simple kernel exits at once.
// Design and costs: docs/kernels.md, "Non-finite inputs".
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "kernels/attention_params.h"

namespace ringattn {

// Rows [begin, begin + count) of a tensor along its sequence axis.
struct RowSpan {
  int64_t begin = 0;
  int64_t count = 0;
};

// Bound on every score the fast kernels form (|q.k|, |q.k| * softmax_scale, |slope| * distance):
// calls whose inputs could exceed it take the careful path. Far inside fp32 (3.4e38), so that
// no intermediate of the fast kernels' arithmetic overflows; far above any useful score.
inline constexpr float kCarefulScoreBound = 1e30f;

// The scan's device scratch: kGuardWords zeroed uint32 words; word kGuardCarefulWord is the
// decision, nonzero when the call must take the careful path.
inline constexpr int kGuardWords = 8;
inline constexpr int kGuardCarefulWord = 4;

// Enqueues on `stream` the scan of q rows `q_rows` and of k and v rows `kv_rows` of `p` (every
// batch and head), and of p.alibi_slopes, into `scratch` (kGuardWords words, zeroed before,
// device memory). Sets scratch[kGuardCarefulWord] when an element is NaN or infinite, or when
// head_dim * max|q| * max|k| * max(1, softmax_scale) or max|slope| * (the call's largest
// |q_pos - k_pos|) may exceed kCarefulScoreBound. q, k and v must be bf16 or fp16 with 16-byte
// aligned rows (pointers and strides of dimensions of size > 1, in multiples of 8 elements),
// head_dim a multiple of 8: what both fast backends require (InvalidArgument otherwise).
absl::Status LaunchNonFiniteScan(const AttentionParams& p, RowSpan q_rows, RowSpan kv_rows,
                                 uint32_t* scratch, cudaStream_t stream);

// False when RINGATTN_NONFINITE_GUARD is 0 or off (read once): GuardedForward then runs the fast
// kernels alone, for measuring the guard's cost; the non-finite rule no longer holds.
bool NonFiniteGuardEnabled();

// The call `p` (validated, and taken by the caller's fast path) so that it follows the rule.
// Enqueues on `stream`: scratch from the stream-ordered pool, zeroed; LaunchNonFiniteScan;
// `fast(careful)`, the caller's kernels, which must write nothing when *careful != 0 (a device
// word, read on the device); CudaReferenceForward on `p`, which computes only when it is set;
// the scratch's release. Returns the first error (the scratch is released on every path).
// `scanned`, when given, is the call as the fast kernels see it (fp32 inputs rounded to 16
// bits, fp32_inputs.h): the scan reads its tensors, the careful kernel still `p`'s.
absl::Status GuardedForward(const AttentionParams& p, RowSpan q_rows, RowSpan kv_rows,
                            cudaStream_t stream,
                            absl::FunctionRef<absl::Status(const uint32_t* careful)> fast,
                            const AttentionParams* scanned = nullptr);

}  // namespace ringattn
