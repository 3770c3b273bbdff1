#include "worker/ring/ring_backward.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/status_macros.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The forward's view of the shard, for what ring_step.h shares with it (option checks, sizes,
// the segment pairs' params).
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

// An fp32 dK/dV accumulator of one K/V block of `rows` rows: dk [batch, rows, heads_k,
// head_dim] followed by dv of the same shape, in a buffer sized for the largest shard. Sent
// and received as one transfer of Bytes().
struct DkvBlock {
  float* dk;
  float* dv;
  size_t elems;  // of each of dk and dv

  static DkvBlock In(std::vector<float>& buffer, int batch, int64_t rows, const ShardGeometry& g) {
    const size_t elems = static_cast<size_t>(batch) * rows * g.kv_row_elems;
    return {buffer.data(), buffer.data() + elems, elems};
  }
  size_t Bytes() const { return 2 * elems * sizeof(float); }
};

// The backward call for local query segment `qs` against key segment `ks` of the block in
// hand (whose shard has `k_rows` rows), adding into the fp32 dq accumulator [batch, q_rows,
// heads, head_dim] and the block's dK/dV accumulator. The forward's SegmentPairParams places
// q, k, v and the positions; its o and lse slots carry dq and delta, which have the shapes of
// the forward's o and lse accumulators.
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

// D = rowsum(dout * out) of every local query row, by the backend, into delta [batch, heads,
// rows]: once per rank rather than once per kernel call.
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

// One step's compute: this rank's queries against every segment of the block owned by `src`,
// each (query segment, key segment) pair not wholly masked, adding into dq_acc and `dkv`
// (zeroed first: it holds this rank's contribution to the block only).
absl::Status ComputeBackwardStep(AttentionBackwardBackend& backend, const ShardPlan& plan, int rank,
                                 int src, const RingBackwardTensors& t, const ShardGeometry& g,
                                 const KvBlock& kv, float* dq_acc, float* delta,
                                 const DkvBlock& dkv, const RingAttentionOptions& options,
                                 const float* alibi, float scale, int* kernel_calls) {
  std::fill(dkv.dk, dkv.dk + dkv.elems, 0.0f);
  std::fill(dkv.dv, dkv.dv + dkv.elems, 0.0f);
  const Shard& mine = plan.shards[rank];
  const Shard& theirs = plan.shards[src];
  for (const Segment& qs : mine.segments) {
    for (const Segment& ks : theirs.segments) {
      const AttentionBackwardParams bp = SegmentPairBackwardParams(
          t, g, mine.rows, qs, kv, theirs.rows, ks, dq_acc, delta, dkv, options, alibi, scale);
      if (!AnyKeyAllowed(bp.fwd)) continue;
      RA_RETURN_IF_ERROR(backend.Backward(bp));
      ++*kernel_calls;
    }
  }
  return absl::OkStatus();
}

// into += from, elementwise over the block's dk and dv (one contiguous run).
void AddInto(const DkvBlock& into, const DkvBlock& from) {
  for (size_t i = 0; i < 2 * into.elems; ++i) into.dk[i] += from.dk[i];
}

// Rounds an fp32 buffer of n elements into the caller's gradient (grad_dtype).
void StoreGradient(const float* from, size_t n, DType dtype, void* to) {
  for (size_t i = 0; i < n; ++i) StoreFromFloat(to, static_cast<int64_t>(i), dtype, from[i]);
}

absl::StatusOr<RingTimings> RunRing(Communicator& comm, AttentionBackwardBackend& backend,
                                    const ShardPlan& plan, const RingBackwardTensors& t,
                                    const RingAttentionOptions& options) {
  const auto t0 = Clock::now();
  RA_RETURN_IF_ERROR(ValidateRingBackward(options, t));
  const int world = comm.world_size();
  const int rank = comm.rank();
  RA_RETURN_IF_ERROR(CheckPlanMatchesGroup(plan, rank, world));
  if (backend.memory_space() != MemorySpace::kHost || comm.memory_space() != MemorySpace::kHost) {
    return absl::UnimplementedError(
        "the host ring backward needs a host backward backend and transport");
  }
  const ShardGeometry g = ShardGeometry::Of(ForwardView(t));
  const int64_t rows = plan.shards[rank].rows;
  if (rows > 0 &&
      (t.q == nullptr || t.k == nullptr || t.v == nullptr || t.out == nullptr || t.lse == nullptr ||
       t.dout == nullptr || t.dq == nullptr || t.dk == nullptr || t.dv == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", rank, " holds ", rows, " rows: q, k, v, out, lse, dout, dq, dk, dv must be set"));
  }
  const float scale = RingSoftmaxScale(options, t.head_dim);
  const float* alibi = options.alibi_slopes.empty() ? nullptr : options.alibi_slopes.data();

  // dq [batch, rows, heads, head_dim] and D [batch, heads, rows], fp32, local.
  std::vector<float> dq_acc(static_cast<size_t>(t.batch) * rows * g.q_row_elems, 0.0f);
  std::vector<float> delta(static_cast<size_t>(t.batch) * t.heads * rows);
  RA_RETURN_IF_ERROR(ComputeShardDelta(backend, t, rows, delta.data()));

  // K/V: two receive slots as in the forward; step 0 computes and sends the caller's K/V.
  const size_t slot_kv_bytes = g.KvBytes(t.batch, plan.max_rows());
  std::vector<std::byte> kv_slots[2];
  // dK/dV: this rank's contribution of the current step and the finished accumulator of the
  // previous step (being sent) alternate between two buffers; a third receives.
  const size_t dkv_capacity = 2 * static_cast<size_t>(t.batch) * plan.max_rows() * g.kv_row_elems;
  std::vector<float> dkv_bufs[2];
  std::vector<float> dkv_recv;
  dkv_bufs[0].resize(dkv_capacity);
  if (world > 1) {
    for (auto& s : kv_slots) s.resize(2 * slot_kv_bytes);
    dkv_bufs[1].resize(dkv_capacity);
    dkv_recv.resize(dkv_capacity);
  }
  KvBlock in_hand{static_cast<const std::byte*>(t.k), static_cast<const std::byte*>(t.v)};

  RingTimings timings;
  timings.steps.resize(world);
  const int next = RingNextRank(rank, world);
  const int prev = RingPrevRank(rank, world);
  for (int step = 0; step < world; ++step) {
    RingStepTiming& st = timings.steps[step];
    const int src = RingSourceRank(rank, step, world);  // owner of the K/V block in hand
    st.source_rank = src;
    const DkvBlock mine = DkvBlock::In(dkv_bufs[step % 2], t.batch, plan.shards[src].rows, g);

    std::vector<SendOp> sends;
    std::vector<RecvOp> recvs;
    KvBlock incoming;
    if (step + 1 < world) {
      const int incoming_src = RingSourceRank(rank, step + 1, world);
      const size_t send_bytes = g.KvBytes(t.batch, plan.shards[src].rows);
      const size_t recv_bytes = g.KvBytes(t.batch, plan.shards[incoming_src].rows);
      std::byte* slot = kv_slots[step % 2].data();
      incoming = {slot, slot + slot_kv_bytes};
      sends.push_back({next, in_hand.k, send_bytes});
      sends.push_back({next, in_hand.v, send_bytes});
      recvs.push_back({prev, slot, recv_bytes});
      recvs.push_back({prev, slot + slot_kv_bytes, recv_bytes});
    }
    DkvBlock received{};
    if (step >= 1) {
      const int finished_src = RingSourceRank(rank, step - 1, world);
      const DkvBlock finished =
          DkvBlock::In(dkv_bufs[(step - 1) % 2], t.batch, plan.shards[finished_src].rows, g);
      received = DkvBlock::In(dkv_recv, t.batch, plan.shards[src].rows, g);
      sends.push_back({next, finished.dk, finished.Bytes()});
      recvs.push_back({prev, received.dk, received.Bytes()});
    }
    const bool posted = !sends.empty();
    if (posted) RA_RETURN_IF_ERROR(comm.Start(sends, recvs));

    const auto c0 = Clock::now();
    RA_RETURN_IF_ERROR(ComputeBackwardStep(backend, plan, rank, src, t, g, in_hand, dq_acc.data(),
                                           delta.data(), mine, options, alibi, scale,
                                           &st.kernel_calls));
    st.compute_seconds = SecondsSince(c0);
    if (posted) {
      const auto w0 = Clock::now();
      RA_RETURN_IF_ERROR(comm.Wait());
      st.comm_wait_seconds = SecondsSince(w0);
    }
    if (step >= 1) {
      // Ranks src .. rank - 1 in `received`, this rank's in `mine`; timed as compute.
      const auto a0 = Clock::now();
      AddInto(mine, received);
      st.compute_seconds += SecondsSince(a0);
    }
    if (step + 1 < world) in_hand = incoming;
  }

  // The return hop: the finished accumulator of block rank + 1 goes to its owner, this rank's
  // own comes from rank - 1.
  const int last_src = RingSourceRank(rank, world - 1, world);
  DkvBlock own = DkvBlock::In(dkv_bufs[(world - 1) % 2], t.batch, rows, g);
  if (world > 1) {
    const DkvBlock finished =
        DkvBlock::In(dkv_bufs[(world - 1) % 2], t.batch, plan.shards[last_src].rows, g);
    own = DkvBlock::In(dkv_recv, t.batch, rows, g);
    const SendOp send{next, finished.dk, finished.Bytes()};
    const RecvOp recv{prev, own.dk, own.Bytes()};
    const auto w0 = Clock::now();
    RA_RETURN_IF_ERROR(Exchange(comm, {send}, {recv}));
    timings.steps.back().comm_wait_seconds += SecondsSince(w0);
  }

  StoreGradient(dq_acc.data(), dq_acc.size(), t.grad_dtype, t.dq);
  StoreGradient(own.dk, own.elems, t.grad_dtype, t.dk);
  StoreGradient(own.dv, own.elems, t.grad_dtype, t.dv);
  timings.total_seconds = SecondsSince(t0);
  return timings;
}

}  // namespace

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

absl::StatusOr<RingTimings> RingFlashAttnBackward(Communicator& comm,
                                                  AttentionBackwardBackend& backend,
                                                  const ShardPlan& plan,
                                                  const RingBackwardTensors& t,
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
