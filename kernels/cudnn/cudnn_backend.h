// The "cudnn" attention backend: cuDNN's fused flash attention (the cudnn-frontend SDPA graphs)
// behind AttentionBackend, forward (with the softmax stats, the LSE the ring's merge needs) and
// backward (cudnn_backward.h).
//
// It takes device pointers (MemorySpace::kDevice) and runs on the stream of the call's
// ExecutionContext. Whatever cuDNN cannot express exactly is refused with InvalidArgument naming
// the option; nothing falls back silently.
//
// ---- What cuDNN computes (cudnn-frontend 1.32, cuDNN 9.x, fp16/bf16 SDPA forward) ------------
// For Q [b, h, s_q, d], K/V [b, h_k, s_kv, d] (query head h reads K/V head h / (h / h_k)):
//   S = attn_scale * Q K^T, then the diagonal band mask in ROW/COLUMN INDICES of the call
//   (TOP_LEFT alignment, the only one used here):
//     right bound rb >= 0:  keep column j only if j <= i + rb
//     left bound  lb >= 1:  keep column j only if j >  i - lb      (i.e. j >= i - lb + 1)
//   (masked scores are -inf), softmax, O = P V. Stats = max + ln(sum exp(S - max)) per row:
//   the natural-log LSE of the scaled, masked scores, fp32, [b, h, s_q, 1] — exactly the lse of
//   AttentionParams, no conversion needed (set_stats_use_log2 stays off).
//   Its built-in ALiBi uses fixed slopes (2^(-8(h+1)/H)) and (j - i) only under a causal mask:
//   it cannot take our slopes[h] * |q_pos - k_pos|; softcap would need set_score_mod, which the
//   frontend allows only with no other mask, and which cannot be verified here.
//
// ---- The expressibility rules (PlanCudnnCall implements them; CudnnSupports = its status) ---
// Refused (InvalidArgument, the message names the option):
//   R1 dtype not bf16/fp16 ("dtype fp32 ..."); o_dtype may be anything (fp32 via a scratch O).
//   R2 alibi_slopes != null: "the cudnn backend does not support alibi_slopes; use the cuda
//      backend".
//   R3 softcap > 0: "the cudnn backend does not support softcap; use the cuda backend".
//   R4 q/k/v not 16-byte aligned, or a stride of a dimension of size > 1 of q/k/v not a
//      multiple of 8 elements (cuDNN's TMA loads; the frontend refuses it too).
//   R5 seqlen_q or seqlen_k >= 2^31.
//   R6 a causal/window mask that neither allows every (query, key) pair of the call nor none
//      of them (ClassifyBlock) while q_pos_stride != k_pos_stride: the allowed set is then not
//      a diagonal band in index space.
//   R7 a left window bound on a call whose live block has more than 2^24 rows or columns: the
//      pre-9.21 composite mask compares (column + left_bound) with the row in fp32.
// Accepted, and how (everything in positions reduces to a band in indices):
//   With s = q_pos_stride = k_pos_stride and E = k_pos_offset - q_pos_offset, key j is allowed
//   for query i iff lo <= E + (j - i) s <= hi, where hi = min(window_right, 0 if causal) and
//   lo = -window_left (each side unbounded when absent), i.e. iff
//        a <= j - i <= b,   a = ceil((lo - E) / s),   b = floor((hi - E) / s).
//   (With unequal strides only the no-mask / all-allowed / none-allowed cases are accepted.)
//   Trim to the live block: rows i with at least one allowed key are the contiguous range
//   [max(0, -b), min(s_q - 1, s_k - 1 - a)]; the keys any of them may see are
//   [max(0, i0 + a), min(s_k - 1, i1 + b)]. Rows outside get o = 0 and lse = -inf (with
//   merge_into_output they are left untouched); keys outside are skipped by moving the K/V
//   pointers. cuDNN runs on the live block only, where every row has an allowed key (so cuDNN
//   never sees a fully masked row), with the band shifted to a' = a + i0 - j0 <= 0 and
//   b' = b + i0 - j0 >= 0:
//     right bound rb = b'      when b' < s_k' - 1 (otherwise the side allows everything);
//     left bound  lb = 1 - a'  when a' > -(s_q' - 1); a left bound always comes with a right
//                              bound (rb = s_k' - 1 if the right side is open): older cuDNN
//                              versions require it, and it masks nothing.
//     padding mask with the full lengths (a no-op) when there is a left bound and s_q' > s_k':
//     cuDNN refuses a left bound with s_q > s_kv otherwise.
//   Empty block (a > b, or no live row, or s_k = 0): cuDNN is not called.
// Consequences for the ring: contiguous/zigzag causal steps are unmasked (key shard before the
// query shard), TOP_LEFT causal (diagonal) or skipped; stripe steps (equal strides) are TOP_LEFT
// causal on a block trimmed by at most one row and one key; windows of any size become bands.
//
// ---- Merge ----------------------------------------------------------------------------------
// cuDNN writes O in the input dtype and Stats; a small kernel (merge_kernel.h) then either
// merges (o_new, lse_new) into the fp32 accumulators with MergeLse (softmax_state.h), or stores
// o (converted to o_dtype when it differs) and lse, and fills the rows outside the live block.
// With o_dtype == dtype, no merge and 16-byte-aligned o, cuDNN writes o in place.
//
// ---- Caching and memory ---------------------------------------------------------------------
// Forward and backward share one CudnnDeviceContext (cudnn_context.h): the handle, made at the
// first call on the then-current device (later calls must be on that device); the graphs, built
// once per SdpaGraphKey (direction, shapes, strides, mask plan, scale) and cached, failures
// included (graph_builds() counts builds); one device workspace (cuDNN's workspace + scratch
// tensors), grown stream-ordered. Calls are serialised; a stream change makes the new stream
// wait for the previous call.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_params.h"
#include "kernels/cuda/cuda_backend.h"

namespace ringattn {

// What one call asks of cuDNN (see the rules above). Row and column indices are those of the
// call (0 <= i < seqlen_q, 0 <= j < seqlen_k).
struct CudnnMaskPlan {
  // No (query, key) pair is allowed: cuDNN is not called; every row is fully masked.
  bool empty = false;
  // The live block: query rows [q_begin, q_begin + q_count), key rows [k_begin, k_begin +
  // k_count). Rows outside it have no allowed key; keys outside it are seen by no live row.
  int64_t q_begin = 0, q_count = 0;
  int64_t k_begin = 0, k_count = 0;
  // TOP_LEFT diagonal band inside the live block (i', j' relative to q_begin, k_begin):
  // keep j' <= i' + right_bound, and j' > i' - left_bound.
  bool has_right_bound = false;
  int64_t right_bound = 0;  // >= 0
  bool has_left_bound = false;
  int64_t left_bound = 0;  // >= 1
  // Full-length padding mask (seq_len_q = q_count, seq_len_kv = k_count): masks nothing, lifts
  // cuDNN's s_q <= s_kv requirement for a left bound.
  bool padding_mask = false;

  // Whether cuDNN, run as planned, lets query row i see key row j (host emulation of the
  // semantics documented above; the tests compare it with KeyAllowed for every pair).
  bool Allows(int64_t i, int64_t j) const;
  std::string ToString() const;
};

// The plan for `p`, or InvalidArgument naming what cuDNN cannot express. Host only: needs no
// device and reads no tensor (pointers are checked for alignment only). Does not run
// ValidateParams; Forward runs both.
absl::StatusOr<CudnnMaskPlan> PlanCudnnCall(const AttentionParams& p);

// OK when the cudnn backend can compute `p` (ValidateParams, then PlanCudnnCall).
absl::Status CudnnSupports(const AttentionParams& p);

// The backend. Forward validates (CudnnSupports), then enqueues on the call's stream and returns
// without synchronising, like the CUDA backends; Backward likewise (CudnnBackwardSupports).
class CudnnBackend : public CudaBackend {
 public:
  // Graphs built so far by this backend, forward and backward (a repeated shape does not build
  // again).
  virtual int64_t graph_builds() const = 0;
  // Bytes of the device workspace currently held.
  virtual int64_t workspace_bytes() const = 0;
};

// `backend` as a CudnnBackend (for graph_builds()), or nullptr when it is not one.
inline CudnnBackend* AsCudnnBackend(AttentionBackend* backend) {
  return dynamic_cast<CudnnBackend*>(backend);
}

}  // namespace ringattn
