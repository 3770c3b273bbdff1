#include "ring/ring_step.h"

#include <cmath>
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

absl::Status ValidateRingOptions(const RingAttentionOptions& options, const RingShardTensors& t) {
  if (!(options.dropout_p >= 0.0f && options.dropout_p < 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("dropout_p must be in [0, 1), got ", options.dropout_p));
  }
  if (options.return_attn_probs) {
    return absl::InvalidArgumentError(
        "return_attn_probs is not supported: the ring never forms the attention matrix");
  }
  if (options.softmax_scale.has_value() &&
      (!std::isfinite(*options.softmax_scale) || *options.softmax_scale <= 0.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("softmax_scale must be finite and > 0, got ", *options.softmax_scale));
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

absl::Status CheckPackedSequences(const RingAttentionOptions& options, const ShardPlan& plan,
                                  bool supported, std::string_view backend_name) {
  if (options.seq_bounds.empty()) return absl::OkStatus();
  RA_RETURN_IF_ERROR(CheckSequenceBounds(options.seq_bounds.data(), options.seq_bounds.size(),
                                         "seq_bounds", "the sequence length", plan.seqlen));
  if (supported) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "seq_bounds (packed variable-length sequences) is not supported by the '",
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

AttentionParams SegmentPairParams(const RingShardTensors& t, const ShardGeometry& g, int64_t q_rows,
                                  const Segment& qs, const KvBlock& kv, int64_t k_rows,
                                  const Segment& ks, float* o_acc, float* lse_acc,
                                  const RingAttentionOptions& options, const float* alibi_slopes,
                                  float scale) {
  AttentionParams p;
  p.batch = t.batch;
  p.heads = t.heads;
  p.heads_k = t.heads_k;
  p.head_dim = t.head_dim;
  p.dtype = t.dtype;
  p.o_dtype = DType::kF32;
  p.seqlen_q = qs.length;
  p.seqlen_k = ks.length;

  p.q = static_cast<const std::byte*>(t.q) + qs.local_offset * g.q_row_elems * g.elem_bytes;
  p.k = kv.k + ks.local_offset * g.kv_row_elems * g.elem_bytes;
  p.v = kv.v + ks.local_offset * g.kv_row_elems * g.elem_bytes;
  p.o = o_acc + qs.local_offset * g.q_row_elems;
  p.lse = lse_acc + qs.local_offset;

  p.q_head_stride = p.o_head_stride = t.head_dim;
  p.q_row_stride = p.o_row_stride = g.q_row_elems;
  p.q_batch_stride = p.o_batch_stride = q_rows * g.q_row_elems;
  p.k_head_stride = p.v_head_stride = t.head_dim;
  p.k_row_stride = p.v_row_stride = g.kv_row_elems;
  p.k_batch_stride = p.v_batch_stride = k_rows * g.kv_row_elems;
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

namespace {

// A shard as one call's rows: `whole` covers every row from local row 0 with the first run's
// positions; a second run starts at row `split` at position `start2`.
struct ShardRuns {
  Segment whole;
  int64_t split = kNoPosSplit;
  int64_t start2 = 0;
};

std::optional<ShardRuns> AsPositionRuns(const Shard& shard) {
  if (shard.segments.empty() || shard.segments.size() > 2) return std::nullopt;
  const Segment& a = shard.segments[0];
  if (a.local_offset != 0) return std::nullopt;
  ShardRuns runs;
  runs.whole = a;
  runs.whole.length = shard.rows;
  if (shard.segments.size() == 1) {
    if (a.length != shard.rows) return std::nullopt;
    return runs;
  }
  const Segment& b = shard.segments[1];
  const bool rows_follow = b.local_offset == a.length && a.length + b.length == shard.rows;
  const bool ascending = b.start > a.start + (a.length - 1) * a.stride;
  if (!rows_follow || b.stride != a.stride || !ascending) return std::nullopt;
  runs.split = a.length;
  runs.start2 = b.start;
  return runs;
}

}  // namespace

std::vector<StepCall> StepCalls(const Shard& mine, const Shard& theirs, bool position_runs) {
  std::vector<StepCall> calls;
  if (position_runs) {
    const std::optional<ShardRuns> q = AsPositionRuns(mine);
    const std::optional<ShardRuns> k = AsPositionRuns(theirs);
    if (q.has_value() && k.has_value()) {
      calls.push_back({q->whole, k->whole, q->split, q->start2, k->split, k->start2});
      return calls;
    }
  }
  for (const Segment& qs : mine.segments) {
    for (const Segment& ks : theirs.segments) calls.push_back({qs, ks});
  }
  return calls;
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

bool StepIsOneWholeCall(const Shard& mine, const Shard& theirs, bool position_runs) {
  if (mine.rows == 0 || theirs.rows == 0) return false;
  const std::vector<StepCall> calls = StepCalls(mine, theirs, position_runs);
  return calls.size() == 1 && calls[0].q.local_offset == 0 && calls[0].q.length == mine.rows &&
         calls[0].k.local_offset == 0 && calls[0].k.length == theirs.rows;
}

RingOutputPlan PlanRingOutput(const ShardPlan& plan, int rank, int world,
                              const AttentionBackend& backend) {
  const Shard& mine = plan.shards[rank];
  const bool runs = backend.supports_position_runs();
  RingOutputPlan out;
  out.first_writes = StepIsOneWholeCall(mine, plan.shards[RingSourceRank(rank, 0, world)], runs);
  out.last_finalizes =
      world > 1 && backend.supports_partial_input() &&
      StepIsOneWholeCall(mine, plan.shards[RingSourceRank(rank, world - 1, world)], runs);
  return out;
}

absl::Status ComputeRingStep(AttentionBackend& backend, const ShardPlan& plan, int rank, int src,
                             const RingShardTensors& t, const ShardGeometry& g, const KvBlock& kv,
                             const StepTarget& target, const RingAttentionOptions& options,
                             const float* alibi_slopes, float scale, int* kernel_calls) {
  const Shard& mine = plan.shards[rank];
  const Shard& theirs = plan.shards[src];
  const std::vector<StepCall> calls = StepCalls(mine, theirs, backend.supports_position_runs());
  if (target.mode != StepOutput::kMerge && calls.size() != 1) {
    return absl::InternalError(absl::StrCat("ring step from rank ", src, " on rank ", rank,
                                            ": a writing step must be one call, got ",
                                            calls.size()));
  }
  for (const StepCall& c : calls) {
    AttentionParams p = SegmentPairParams(t, g, mine.rows, c.q, kv, theirs.rows, c.k,
                                          target.o_acc, target.lse_acc, options, alibi_slopes,
                                          scale);
    ApplyPositionRuns(c, &p);
    switch (target.mode) {
      case StepOutput::kMerge:
        if (!AnyKeyAllowed(p)) continue;
        break;
      case StepOutput::kWrite:
        p.merge_into_output = false;  // o_acc fp32, lse_acc
        break;
      case StepOutput::kFinalize:
        p.merge_into_output = false;
        p.partial_o = target.o_acc;
        p.partial_lse = target.lse_acc;
        p.o = t.out;
        p.o_dtype = t.dtype;
        p.lse = t.lse;  // may be null
        break;
    }
    RA_RETURN_IF_ERROR(backend.Forward(p));
    ++*kernel_calls;
  }
  return absl::OkStatus();
}

std::optional<Segment> AsSingleSegment(const Shard& shard) {
  if (shard.segments.empty()) return std::nullopt;
  Segment merged = shard.segments.front();
  if (merged.local_offset != 0) return std::nullopt;
  for (size_t i = 1; i < shard.segments.size(); ++i) {
    const Segment& next = shard.segments[i];
    const bool rows_follow = next.local_offset == merged.local_offset + merged.length;
    const bool positions_follow = next.start == merged.start + merged.length * merged.stride &&
                                  (next.stride == merged.stride || next.length == 1);
    if (!rows_follow || !positions_follow) return std::nullopt;
    merged.length += next.length;
  }
  if (merged.length != shard.rows) return std::nullopt;
  return merged;
}

}  // namespace ringattn
