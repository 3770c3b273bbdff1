#include "kernels/attention_backward_params.h"

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/params_check.h"

namespace ringattn {

absl::Status ValidateBackwardParams(const AttentionBackwardParams& p) {
  if (p.fwd.seqlen_q > 0) {
    if (p.dout == nullptr) {
      return absl::InvalidArgumentError("dout must be non-null when seqlen_q > 0");
    }
    if (p.out == nullptr && p.delta == nullptr) {
      return absl::InvalidArgumentError(
          "out must be non-null when seqlen_q > 0, unless delta is given");
    }
    if (p.lse == nullptr) {
      return absl::InvalidArgumentError("lse must be non-null when seqlen_q > 0");
    }
    if (p.dq == nullptr) return absl::InvalidArgumentError("dq must be non-null when seqlen_q > 0");
  }
  // The forward part, with dout in the place of the forward's o (which the forward requires
  // whenever there are query rows) and without the merge mode, which the backward ignores.
  AttentionParams fwd = p.fwd;
  fwd.o = const_cast<void*>(p.dout);
  fwd.o_dtype = p.out_dtype;
  fwd.lse = nullptr;
  fwd.merge_into_output = false;
  RA_RETURN_IF_ERROR(ValidateParams(fwd));
  if (p.fwd.seqlen_k > 0 && (p.dk == nullptr || p.dv == nullptr)) {
    return absl::InvalidArgumentError("dk and dv must be non-null when seqlen_k > 0");
  }
  return absl::OkStatus();
}

void SetContiguousBackwardStrides(AttentionBackwardParams* p) {
  SetContiguousStrides(&p->fwd);
  const AttentionParams& f = p->fwd;
  p->out_head_stride = p->dout_head_stride = p->dq_head_stride = f.q_head_stride;
  p->out_row_stride = p->dout_row_stride = p->dq_row_stride = f.q_row_stride;
  p->out_batch_stride = p->dout_batch_stride = p->dq_batch_stride = f.q_batch_stride;
  p->dk_head_stride = p->dv_head_stride = f.k_head_stride;
  p->dk_row_stride = p->dv_row_stride = f.k_row_stride;
  p->dk_batch_stride = p->dv_batch_stride = f.k_batch_stride;
  p->lse_head_stride = f.lse_head_stride;
  p->lse_batch_stride = f.lse_batch_stride;
}

double BackwardFlops(const AttentionBackwardParams& p) { return 2.5 * ForwardFlops(p.fwd); }

}  // namespace ringattn
