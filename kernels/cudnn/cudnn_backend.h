// The "cudnn" attention backend: cuDNN's fused flash attention (the cudnn-frontend SDPA graphs)
// behind AttentionBackend, forward (with the softmax stats, the LSE the ring's merge needs) and
// backward (cudnn_backward.h). Device pointers (MemorySpace::kDevice), enqueued on the call's
// stream. Whatever cuDNN cannot express exactly is refused with InvalidArgument naming the
// option (dtype other than bf16/fp16, alibi_slopes, softcap, misaligned q/k/v, a partial mask
// that is no diagonal band in indices, ...); nothing falls back silently. PlanCudnnCall reduces
// a call's masks in positions to cuDNN's band on its live block: the rules, the derivation and
// the merge and caching design are in docs/cudnn.md.
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
