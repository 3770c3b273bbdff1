#include "ring/ring_backward_step.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace ringattn {

absl::Status ValidateRingBackward(const RingAttentionOptions& options,
                                  const RingBackwardTensors& t) {
  RA_RETURN_IF_ERROR(ValidateRingOptions(options, ForwardView(t)));
  if (t.grad_dtype != t.dtype && t.grad_dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat("grad_dtype must be the input dtype (", std::string(DTypeName(t.dtype)),
                     ") or fp32, got ", std::string(DTypeName(t.grad_dtype))));
  }
  return absl::OkStatus();
}

absl::Status CheckShardTensorsSet(const RingBackwardTensors& t, int rank, int64_t rows) {
  if (rows == 0) return absl::OkStatus();
  if (t.q == nullptr || t.k == nullptr || t.v == nullptr || t.out == nullptr || t.lse == nullptr ||
      t.dout == nullptr || t.dq == nullptr || t.dk == nullptr || t.dv == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", rank, " holds ", rows, " rows: q, k, v, out, lse, dout, dq, dk, dv must be set"));
  }
  return absl::OkStatus();
}

RingShardTensors ForwardView(const RingBackwardTensors& t) {
  RingShardTensors f;
  f.dtype = t.dtype;
  f.batch = t.batch;
  f.heads = t.heads;
  f.heads_k = t.heads_k;
  f.head_dim = t.head_dim;
  f.q = t.q;
  f.k = t.k;
  f.v = t.v;
  return f;
}

AttentionBackwardParams SegmentPairBackwardParams(
    const RingBackwardTensors& t, const ShardGeometry& g, int64_t q_rows, const Segment& qs,
    const KvBlock& kv, int64_t k_rows, const Segment& ks, float* dq_acc, float* delta,
    const DkvBlock& dkv, const RingAttentionOptions& options, const float* alibi, float scale) {
  const RingShardTensors view = ForwardView(t);
  AttentionBackwardParams bp;
  bp.fwd =
      SegmentPairParams(view, g, q_rows, qs, kv, k_rows, ks, dq_acc, delta, options, alibi, scale);
  const AttentionParams& p = bp.fwd;
  const size_t q_offset_bytes = qs.local_offset * g.q_row_elems * g.elem_bytes;
  bp.out = static_cast<const std::byte*>(t.out) + q_offset_bytes;
  bp.dout = static_cast<const std::byte*>(t.dout) + q_offset_bytes;
  bp.out_dtype = t.dtype;
  bp.out_batch_stride = bp.dout_batch_stride = p.q_batch_stride;
  bp.out_row_stride = bp.dout_row_stride = p.q_row_stride;
  bp.out_head_stride = bp.dout_head_stride = p.q_head_stride;
  bp.lse = t.lse + qs.local_offset;
  bp.delta = p.lse;  // delta + qs.local_offset, with lse's strides
  bp.lse_batch_stride = p.lse_batch_stride;
  bp.lse_head_stride = p.lse_head_stride;
  bp.dq = static_cast<float*>(p.o);  // dq_acc + qs.local_offset rows, with o's strides
  bp.dq_batch_stride = p.o_batch_stride;
  bp.dq_row_stride = p.o_row_stride;
  bp.dq_head_stride = p.o_head_stride;
  bp.dk = dkv.dk + ks.local_offset * g.kv_row_elems;
  bp.dv = dkv.dv + ks.local_offset * g.kv_row_elems;
  bp.dk_batch_stride = bp.dv_batch_stride = k_rows * g.kv_row_elems;
  bp.dk_row_stride = bp.dv_row_stride = g.kv_row_elems;
  bp.dk_head_stride = bp.dv_head_stride = t.head_dim;
  bp.accumulate = true;
  return bp;
}

absl::Status ComputeShardDelta(AttentionBackwardBackend& backend, const RingBackwardTensors& t,
                               int64_t rows, float* delta) {
  if (rows == 0) return absl::OkStatus();
  AttentionBackwardParams bp;
  AttentionParams& p = bp.fwd;
  p.batch = t.batch;
  p.seqlen_q = rows;
  p.heads = t.heads;
  p.heads_k = t.heads_k;
  p.head_dim = t.head_dim;
  p.dtype = t.dtype;
  bp.out = t.out;
  bp.dout = t.dout;
  bp.out_dtype = t.dtype;
  SetContiguousBackwardStrides(&bp);
  return backend.ComputeDelta(bp, delta);
}

bool BackwardStepWrites(const ShardPlan& plan, int rank, int src,
                        const AttentionBackwardBackend& backend) {
  return StepIsOneWholeCall(plan.shards[rank], plan.shards[src],
                            backend.supports_position_runs());
}

absl::Status ComputeBackwardStep(AttentionBackwardBackend& backend, const ShardPlan& plan, int rank,
                                 int src, const RingBackwardTensors& t, const ShardGeometry& g,
                                 const KvBlock& kv, float* dq_acc, float* delta,
                                 const DkvBlock& dkv, const RingAttentionOptions& options,
                                 const float* alibi, float scale, bool write, int* kernel_calls) {
  const Shard& mine = plan.shards[rank];
  const Shard& theirs = plan.shards[src];
  const std::vector<StepCall> calls = StepCalls(mine, theirs, backend.supports_position_runs());
  if (write && calls.size() != 1) {  // the caller vouched for it (BackwardStepWrites)
    return absl::InternalError(absl::StrCat("backward step from rank ", src, " on rank ", rank,
                                            ": a writing step must be one call, got ",
                                            calls.size()));
  }
  for (const StepCall& c : calls) {
    AttentionBackwardParams bp = SegmentPairBackwardParams(
        t, g, mine.rows, c.q, kv, theirs.rows, c.k, dq_acc, delta, dkv, options, alibi, scale);
    ApplyPositionRuns(c, &bp.fwd);
    if (write) {
      bp.accumulate = false;  // every element of dq and dK/dV written, masked or not
    } else if (!AnyKeyAllowed(bp.fwd)) {
      continue;
    }
    RA_RETURN_IF_ERROR(backend.Backward(bp));
    ++*kernel_calls;
  }
  return absl::OkStatus();
}

}  // namespace ringattn
