#include "worker/ring/ring_attention.h"

#include <chrono>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/params_check.h"
#include "kernels/score_mod.h"
#include "kernels/status_macros.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The K and V of one shard as the ring carries them: each [batch, rows, heads_k, head_dim].
struct KvBlock {
  const std::byte* k = nullptr;
  const std::byte* v = nullptr;
};

// Sizes of one rank's tensors, in elements and bytes.
struct ShardGeometry {
  int64_t q_row_elems;   // heads * head_dim
  int64_t kv_row_elems;  // heads_k * head_dim
  size_t elem_bytes;

  size_t KvBytes(int batch, int64_t rows) const {
    return static_cast<size_t>(batch) * rows * kv_row_elems * elem_bytes;
  }
};

// The kernel call for local query segment `qs` against key segment `ks` of a block whose
// shard has `k_rows` rows; merges into the fp32 accumulators.
AttentionParams SegmentPairParams(const RingShardTensors& t, const ShardGeometry& g,
                                  int64_t q_rows, const Segment& qs, const KvBlock& kv,
                                  int64_t k_rows, const Segment& ks, float* o_acc, float* lse_acc,
                                  const RingAttentionOptions& options, float scale) {
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
  p.alibi_slopes = options.alibi_slopes.empty() ? nullptr : options.alibi_slopes.data();
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

bool AnyKeyAllowed(const AttentionParams& p) {
  return ClassifyBlock(p, QueryPos(p, 0), QueryPos(p, p.seqlen_q - 1), KeyPos(p, 0),
                       KeyPos(p, p.seqlen_k - 1))
      .any;
}

// Attention of every local query segment against every segment of the block owned by `src`.
absl::Status ComputeBlock(AttentionBackend& backend, const ShardPlan& plan, int rank, int src,
                          const RingShardTensors& t, const ShardGeometry& g, const KvBlock& kv,
                          float* o_acc, float* lse_acc, const RingAttentionOptions& options,
                          float scale, RingStepTiming* timing) {
  const Shard& mine = plan.shards[rank];
  const Shard& theirs = plan.shards[src];
  for (const Segment& qs : mine.segments) {
    for (const Segment& ks : theirs.segments) {
      const AttentionParams p = SegmentPairParams(t, g, mine.rows, qs, kv, theirs.rows, ks, o_acc,
                                                  lse_acc, options, scale);
      if (!AnyKeyAllowed(p)) continue;
      RA_RETURN_IF_ERROR(backend.Forward(p));
      ++timing->kernel_calls;
    }
  }
  return absl::OkStatus();
}

// Writes the fp32 accumulators into the caller's output (its dtype) and lse.
void Finalize(const RingShardTensors& t, int64_t rows, const std::vector<float>& o_acc,
              const std::vector<float>& lse_acc) {
  for (size_t i = 0; i < o_acc.size(); ++i) {
    StoreFromFloat(t.out, static_cast<int64_t>(i), t.dtype, o_acc[i]);
  }
  if (t.lse != nullptr) {
    for (int64_t i = 0; i < static_cast<int64_t>(t.batch) * t.heads * rows; ++i) t.lse[i] = lse_acc[i];
  }
}

absl::StatusOr<RingTimings> RunRing(Communicator& comm, AttentionBackend& backend,
                                    const ShardPlan& plan, const RingShardTensors& t,
                                    const RingAttentionOptions& options) {
  const auto t0 = Clock::now();
  RA_RETURN_IF_ERROR(ValidateRingOptions(options, t));
  const int world = comm.world_size();
  const int rank = comm.rank();
  if (plan.world != world) {
    return absl::InvalidArgumentError(absl::StrCat("shard plan is for ", plan.world,
                                                   " ranks but the communicator has ", world));
  }
  if (backend.memory_space() != MemorySpace::kHost || comm.memory_space() != MemorySpace::kHost) {
    return absl::UnimplementedError("the host ring driver needs a host backend and transport");
  }
  const ShardGeometry g{static_cast<int64_t>(t.heads) * t.head_dim,
                        static_cast<int64_t>(t.heads_k) * t.head_dim,
                        static_cast<size_t>(DTypeSize(t.dtype))};
  const int64_t rows = plan.shards[rank].rows;
  const float scale = options.softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(t.head_dim)));

  // Accumulators: o [batch, rows, heads, head_dim] fp32 and lse [batch, heads, rows] fp32.
  std::vector<float> o_acc(static_cast<size_t>(t.batch) * rows * g.q_row_elems, 0.0f);
  std::vector<float> lse_acc(static_cast<size_t>(t.batch) * t.heads * rows,
                             -std::numeric_limits<float>::infinity());

  // Two receive slots, each holding K then V of the largest shard; step 0 computes and sends
  // straight from the caller's K/V, so nothing is copied before the first transfer.
  const size_t slot_kv_bytes = g.KvBytes(t.batch, plan.max_rows());
  std::vector<std::byte> slots[2];
  if (world > 1) {
    for (auto& s : slots) s.resize(2 * slot_kv_bytes);
  }
  KvBlock in_hand{static_cast<const std::byte*>(t.k), static_cast<const std::byte*>(t.v)};

  RingTimings timings;
  timings.steps.resize(world);
  const int next = (rank + 1) % world;
  const int prev = (rank + world - 1) % world;
  for (int step = 0; step < world; ++step) {
    RingStepTiming& st = timings.steps[step];
    const int src = (rank - step + world) % world;  // owner of the block in hand
    st.source_rank = src;
    KvBlock incoming;
    if (step + 1 < world) {
      const int incoming_src = (src + world - 1) % world;
      const size_t send_bytes = g.KvBytes(t.batch, plan.shards[src].rows);
      const size_t recv_bytes = g.KvBytes(t.batch, plan.shards[incoming_src].rows);
      std::byte* slot = slots[step % 2].data();
      incoming = {slot, slot + slot_kv_bytes};
      const SendOp sends[] = {{next, in_hand.k, send_bytes}, {next, in_hand.v, send_bytes}};
      const RecvOp recvs[] = {{prev, slot, recv_bytes}, {prev, slot + slot_kv_bytes, recv_bytes}};
      RA_RETURN_IF_ERROR(comm.Start(sends, recvs));
    }
    const auto c0 = Clock::now();
    RA_RETURN_IF_ERROR(ComputeBlock(backend, plan, rank, src, t, g, in_hand, o_acc.data(),
                                    lse_acc.data(), options, scale, &st));
    st.compute_seconds = SecondsSince(c0);
    if (step + 1 < world) {
      const auto w0 = Clock::now();
      RA_RETURN_IF_ERROR(comm.Wait());
      st.comm_wait_seconds = SecondsSince(w0);
      in_hand = incoming;
    }
  }
  Finalize(t, rows, o_acc, lse_acc);
  timings.total_seconds = SecondsSince(t0);
  return timings;
}

}  // namespace

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
  if (options.dropout_p != 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("dropout_p must be 0 (dropout needs the training path, not built yet), got ",
                     options.dropout_p));
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
    return absl::InvalidArgumentError(absl::StrCat(
        "window_size must be (left, right) with each >= 0 or -1 (unbounded), got (",
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
  if (t.batch <= 0) return absl::InvalidArgumentError(absl::StrCat("batch must be > 0, got ", t.batch));
  if (t.heads <= 0 || t.heads_k <= 0 || t.heads % t.heads_k != 0) {
    return absl::InvalidArgumentError(absl::StrCat("heads (", t.heads,
                                                   ") must be a positive multiple of heads_k (",
                                                   t.heads_k, ")"));
  }
  return ValidateHeadDim(t.head_dim);
}

absl::StatusOr<RingTimings> RingFlashAttnForward(Communicator& comm, AttentionBackend& backend,
                                                 const ShardPlan& plan, const RingShardTensors& t,
                                                 const RingAttentionOptions& options) {
  absl::StatusOr<RingTimings> result = RunRing(comm, backend, plan, t, options);
  // A rank that stops early would leave its neighbours waiting for its blocks until their
  // timeout; aborting releases them at once with the reason.
  if (!result.ok()) {
    comm.Abort(absl::Status(result.status().code(),
                            absl::StrCat("rank ", comm.rank(), ": ", result.status().message())));
  }
  return result;
}

}  // namespace ringattn
