#include "ring/ring_step.h"

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/params_check.h"
#include "kernels/score_mod.h"

namespace ringattn {

double RingTimings::compute_seconds() const {
  double s = 0;
  for (const auto& st : steps) s += st.compute_seconds;
  return s;
}

double RingTimings::comm_wait_seconds() const {
  double s = 0;
  for (const auto& st : steps) s += st.comm_wait_seconds;
  return s;
}

// ---- Checks -----------------------------------------------------------------------------------

absl::Status ValidateRingOptions(const RingAttentionOptions& options, const RingShardSizes& t) {
  if (!(options.dropout_p >= 0.0f && options.dropout_p < 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("dropout_p must be in [0, 1), got ", options.dropout_p));
  }
  if (options.return_attn_probs) {
    return absl::InvalidArgumentError(
        "return_attn_probs is not supported: the ring never forms the attention matrix");
  }
  if (options.softmax_scale.has_value()) {
    RA_RETURN_IF_ERROR(CheckSoftmaxScale(*options.softmax_scale, "softmax_scale"));
  }
  if (options.window_size.first < -1 || options.window_size.second < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("window_size must be (left, right) with each >= 0 or -1 (unbounded), got (",
                     options.window_size.first, ", ", options.window_size.second, ")"));
  }
  if (!options.alibi_slopes.empty() &&
      options.alibi_slopes.size() != static_cast<size_t>(t.heads)) {
    return absl::InvalidArgumentError(absl::StrCat("alibi_slopes must have one slope per head (",
                                                   t.heads, "), got ",
                                                   options.alibi_slopes.size()));
  }
  if (!std::isfinite(options.softcap) || options.softcap < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("softcap must be finite and >= 0 (0 disables), got ", options.softcap));
  }
  if (t.batch <= 0)
    return absl::InvalidArgumentError(absl::StrCat("batch must be > 0, got ", t.batch));
  if (t.heads <= 0 || t.heads_k <= 0 || t.heads % t.heads_k != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "heads (", t.heads, ") must be a positive multiple of heads_k (", t.heads_k, ")"));
  }
  return ValidateHeadDim(t.head_dim);
}

absl::Status ValidateRingBackward(const RingAttentionOptions& options,
                                  const RingBackwardTensors& t) {
  RA_RETURN_IF_ERROR(ValidateRingOptions(options, t));
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

absl::Status CheckPackedSequences(const RingAttentionOptions& options, const ShardPlan& plan,
                                  bool supported, std::string_view backend_name) {
  if (options.seq_bounds.empty()) return absl::OkStatus();
  RA_RETURN_IF_ERROR(CheckSequenceBounds(options.seq_bounds.data(), options.seq_bounds.size(),
                                         "seq_bounds", "the sequence length", plan.seqlen));
  if (supported) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("seq_bounds (packed variable-length sequences) is not supported by the '",
                   std::string(backend_name), "' kernels yet; CPU workers (kernel cpu) take it"));
}

absl::Status CheckPlanMatchesGroup(const ShardPlan& plan, int rank, int world) {
  if (plan.world != world || static_cast<int>(plan.shards.size()) != world) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard plan is for ", plan.world, " ranks but the communicator has ", world));
  }
  if (rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, " is outside the communicator's [0, ", world, ")"));
  }
  return absl::OkStatus();
}

float RingSoftmaxScale(const RingAttentionOptions& options, int head_dim) {
  return options.softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(head_dim)));
}

// ---- Transfers --------------------------------------------------------------------------------

RingTransfers StepTransfers(const RingStepPlan& step, const RingBuffers& b) {
  RingTransfers x;
  if (step.kv_send) {
    const KvBlock in_hand = b.Kv(step.kv_send->buffer);
    x.sends[x.n_sends++] = {step.kv_send->peer, in_hand.k, step.kv_send->bytes};
    x.sends[x.n_sends++] = {step.kv_send->peer, in_hand.v, step.kv_send->bytes};
  }
  if (step.kv_recv) {
    std::byte* slot = b.kv_slots[step.kv_recv->buffer];
    x.recvs[x.n_recvs++] = {step.kv_recv->peer, slot, step.kv_recv->bytes};
    x.recvs[x.n_recvs++] = {step.kv_recv->peer, slot + b.kv_slot_v_offset, step.kv_recv->bytes};
  }
  if (step.dkv_send) {
    x.sends[x.n_sends++] = {step.dkv_send->peer, b.dkv[step.dkv_send->buffer],
                            step.dkv_send->bytes};
  }
  if (step.dkv_recv) {
    x.recvs[x.n_recvs++] = {step.dkv_recv->peer, b.dkv[step.dkv_recv->buffer],
                            step.dkv_recv->bytes};
  }
  return x;
}

RingTransfers ReturnHopTransfers(const RingSchedule& s, const RingBuffers& b,
                                 const AttentionShape& shape, const DkvBlock& own) {
  RingTransfers x;
  if (!s.return_send || !s.return_recv) return x;
  const Hop& out = *s.return_send;
  const DkvBlock finished = DkvBlock::At(b.dkv[out.buffer], shape, out.rows);
  const size_t sent_bytes = finished.elems * sizeof(float);
  const size_t own_bytes = own.elems * sizeof(float);
  x.sends[x.n_sends++] = {out.peer, finished.dk, sent_bytes};
  x.sends[x.n_sends++] = {out.peer, finished.dv, sent_bytes};
  x.recvs[x.n_recvs++] = {s.return_recv->peer, own.dk, own_bytes};
  x.recvs[x.n_recvs++] = {s.return_recv->peer, own.dv, own_bytes};
  return x;
}

// ---- One step's calls -------------------------------------------------------------------------

RingShardTensors ForwardView(const RingBackwardTensors& t) {
  RingShardTensors f;
  static_cast<RingShardSizes&>(f) = t;
  f.q = t.q;
  f.k = t.k;
  f.v = t.v;
  return f;
}

AttentionParams SegmentPairParams(const RingShardTensors& t, int64_t q_rows, const Segment& qs,
                                  const KvBlock& kv, int64_t k_rows, const Segment& ks,
                                  float* o_acc, float* lse_acc, const RingAttentionOptions& options,
                                  const float* alibi_slopes, float scale) {
  const AttentionShape shape = t.shape(q_rows);
  const int64_t q_row_elems = shape.q_row_elems();
  const int64_t kv_row_elems = shape.kv_row_elems();
  const size_t elem_bytes = shape.elem_bytes();
  AttentionParams p;
  SetShape(shape.WithRows(qs.length, ks.length), &p);
  p.o_dtype = DType::kF32;

  p.q = static_cast<const std::byte*>(t.q) + qs.local_offset * q_row_elems * elem_bytes;
  p.k = kv.k + ks.local_offset * kv_row_elems * elem_bytes;
  p.v = kv.v + ks.local_offset * kv_row_elems * elem_bytes;
  p.o = o_acc + qs.local_offset * q_row_elems;
  p.lse = lse_acc + qs.local_offset;

  p.q_head_stride = p.o_head_stride = t.head_dim;
  p.q_row_stride = p.o_row_stride = q_row_elems;
  p.q_batch_stride = p.o_batch_stride = q_rows * q_row_elems;
  p.k_head_stride = p.v_head_stride = t.head_dim;
  p.k_row_stride = p.v_row_stride = kv_row_elems;
  p.k_batch_stride = p.v_batch_stride = k_rows * kv_row_elems;
  p.lse_head_stride = q_rows;
  p.lse_batch_stride = q_rows * t.heads;

  p.softmax_scale = scale;
  p.softcap = options.softcap;
  p.alibi_slopes = alibi_slopes;
  p.dropout_p = options.dropout_p;
  p.dropout_seed = options.dropout_seed;
  SetSequenceBounds(&p, options.seq_bounds.data(), options.seq_bounds.size());
  p.causal = options.causal;
  p.window_left = options.window_size.first;
  p.window_right = options.window_size.second;
  p.q_pos_offset = qs.start;
  p.q_pos_stride = qs.stride;
  p.k_pos_offset = ks.start;
  p.k_pos_stride = ks.stride;
  p.merge_into_output = true;
  return p;
}

AttentionBackwardParams SegmentPairBackwardParams(const RingBackwardTensors& t, int64_t q_rows,
                                                  const Segment& qs, const KvBlock& kv,
                                                  int64_t k_rows, const Segment& ks, float* dq_acc,
                                                  float* delta, const DkvBlock& dkv,
                                                  const RingAttentionOptions& options,
                                                  const float* alibi, float scale) {
  const AttentionShape shape = t.shape(q_rows);
  const int64_t kv_row_elems = shape.kv_row_elems();
  AttentionBackwardParams bp;
  bp.fwd = SegmentPairParams(ForwardView(t), q_rows, qs, kv, k_rows, ks, dq_acc, delta, options,
                             alibi, scale);
  const AttentionParams& p = bp.fwd;
  const size_t q_offset_bytes = qs.local_offset * shape.q_row_elems() * shape.elem_bytes();
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
  bp.dk = dkv.dk + ks.local_offset * kv_row_elems;
  bp.dv = dkv.dv + ks.local_offset * kv_row_elems;
  bp.dk_batch_stride = bp.dv_batch_stride = k_rows * kv_row_elems;
  bp.dk_row_stride = bp.dv_row_stride = kv_row_elems;
  bp.dk_head_stride = bp.dv_head_stride = t.head_dim;
  bp.accumulate = true;
  return bp;
}

void ApplyPositionRuns(const StepCall& c, AttentionParams* p) {
  p->q_pos_split = c.q_split;
  p->q_pos_offset2 = c.q_start2;
  p->k_pos_split = c.k_split;
  p->k_pos_offset2 = c.k_start2;
}

bool AnyKeyAllowed(const AttentionParams& p) {
  return ClassifyBlock(p, QueryPos(p, 0), QueryPos(p, p.seqlen_q - 1), KeyPos(p, 0),
                       KeyPos(p, p.seqlen_k - 1))
      .any;
}

namespace {

// A writing step is one call (the schedule vouched for it; a broken plan must not write half).
absl::Status CheckWritingStep(const RingSchedule& s, const RingStepPlan& step,
                              const char* direction) {
  if (step.output == StepOutput::kMerge || step.calls.size() == 1) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(direction, " step from rank ", step.block, " on rank ",
                                          s.rank, ": a writing step must be one call, got ",
                                          step.calls.size()));
}

}  // namespace

absl::Status ComputeRingStep(AttentionBackend& backend, const ExecutionContext& ctx,
                             const RingSchedule& s, const RingStepPlan& step,
                             const RingShardTensors& t, const KvBlock& kv, float* o_acc,
                             float* lse_acc, const RingAttentionOptions& options,
                             const float* alibi, float scale, int* kernel_calls) {
  RA_RETURN_IF_ERROR(CheckWritingStep(s, step, "ring"));
  for (const StepCall& c : step.calls) {
    AttentionParams p = SegmentPairParams(t, s.rows, c.q, kv, step.block_rows, c.k, o_acc, lse_acc,
                                          options, alibi, scale);
    ApplyPositionRuns(c, &p);
    switch (step.output) {
      case StepOutput::kMerge:
        if (!AnyKeyAllowed(p)) continue;
        break;
      case StepOutput::kWrite:
        p.merge_into_output = false;  // o_acc fp32, lse_acc
        break;
      case StepOutput::kFinalize:
        p.merge_into_output = false;
        p.partial_o = o_acc;
        p.partial_lse = lse_acc;
        p.o = t.out;
        p.o_dtype = t.dtype;
        p.lse = t.lse;  // may be null
        break;
    }
    RA_RETURN_IF_ERROR(backend.Forward(p, ctx));
    ++*kernel_calls;
  }
  return absl::OkStatus();
}

absl::Status ComputeBackwardStep(AttentionBackend& backend, const ExecutionContext& ctx,
                                 const RingSchedule& s, const RingStepPlan& step,
                                 const RingBackwardTensors& t, const KvBlock& kv, float* dq_acc,
                                 float* delta, const DkvBlock& dkv,
                                 const RingAttentionOptions& options, const float* alibi,
                                 float scale, int* kernel_calls) {
  RA_RETURN_IF_ERROR(CheckWritingStep(s, step, "backward"));
  for (const StepCall& c : step.calls) {
    AttentionBackwardParams bp = SegmentPairBackwardParams(
        t, s.rows, c.q, kv, step.block_rows, c.k, dq_acc, delta, dkv, options, alibi, scale);
    ApplyPositionRuns(c, &bp.fwd);
    if (step.output == StepOutput::kWrite) {
      bp.accumulate = false;  // every element of dq and dK/dV written, masked or not
    } else if (!AnyKeyAllowed(bp.fwd)) {
      continue;
    }
    RA_RETURN_IF_ERROR(backend.Backward(bp, ctx));
    ++*kernel_calls;
  }
  return absl::OkStatus();
}

absl::Status ComputeShardDelta(AttentionBackend& backend, const ExecutionContext& ctx,
                               const RingBackwardTensors& t, int64_t rows, float* delta) {
  if (rows == 0) return absl::OkStatus();
  AttentionBackwardParams bp;
  SetShape(t.shape(rows), &bp.fwd);  // D reads out and dout, [batch, rows, heads, head_dim]
  bp.out = t.out;
  bp.dout = t.dout;
  bp.out_dtype = t.dtype;
  SetContiguousBackwardStrides(&bp);
  return backend.ComputeDelta(bp, delta, ctx);
}

}  // namespace ringattn
