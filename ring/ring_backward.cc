#include "ring/ring_backward.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
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
  RA_RETURN_IF_ERROR(
      CheckPackedSequences(options, plan, backend.supports_packed_sequences(), backend.name()));
  if (backend.memory_space() != MemorySpace::kHost || comm.memory_space() != MemorySpace::kHost) {
    return absl::UnimplementedError(
        "the host ring backward needs a host backward backend and transport");
  }
  const ShardGeometry g = ShardGeometry::Of(ForwardView(t));
  const int64_t rows = plan.shards[rank].rows;
  RA_RETURN_IF_ERROR(CheckShardTensorsSet(t, rank, rows));
  const float scale = RingSoftmaxScale(options, t.head_dim);
  const float* alibi = options.alibi_slopes.empty() ? nullptr : options.alibi_slopes.data();

  // dq [batch, rows, heads, head_dim] and D [batch, heads, rows], fp32, local. dq starts at 0,
  // unless the first step writes it (BackwardStepWrites); then NaN, so that an element it failed
  // to write shows in the result (the device driver leaves it unset there).
  const bool first_writes = BackwardStepWrites(plan, rank, rank, backend);
  std::vector<float> dq_acc(static_cast<size_t>(t.batch) * rows * g.q_row_elems,
                            first_writes ? std::numeric_limits<float>::quiet_NaN() : 0.0f);
  std::vector<float> delta(static_cast<size_t>(t.batch) * t.heads * rows);
  RA_RETURN_IF_ERROR(ComputeShardDelta(backend, t, rows, delta.data()));

  // K/V: two receive slots as in the forward; step 0 computes and sends the caller's K/V.
  const size_t slot_kv_bytes = g.KvBytes(t.batch, plan.max_rows());
  std::vector<std::byte> kv_slots[2];
  // dK/dV: this rank's contribution of the current step and the finished accumulator of the
  // previous step (being sent) alternate between two buffers; a third receives.
  const size_t dkv_capacity = DkvBlock::Floats(t.batch, plan.max_rows(), g);
  std::vector<float> dkv_bufs[2];
  std::vector<float> dkv_recv;
  dkv_bufs[0].resize(dkv_capacity, std::numeric_limits<float>::quiet_NaN());  // see dq_acc
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
    const DkvBlock mine =
        DkvBlock::At(dkv_bufs[step % 2].data(), t.batch, plan.shards[src].rows, g);

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
          DkvBlock::At(dkv_bufs[(step - 1) % 2].data(), t.batch, plan.shards[finished_src].rows, g);
      received = DkvBlock::At(dkv_recv.data(), t.batch, plan.shards[src].rows, g);
      sends.push_back({next, finished.dk, finished.Bytes()});
      recvs.push_back({prev, received.dk, received.Bytes()});
    }
    const bool posted = !sends.empty();
    if (posted) RA_RETURN_IF_ERROR(comm.Start(sends, recvs));

    const auto c0 = Clock::now();
    // `mine` holds this rank's contribution to the block only: zeroed, or written whole by
    // the first step.
    const bool write = step == 0 && first_writes;
    if (!write) std::fill(mine.dk, mine.dk + 2 * mine.elems, 0.0f);
    RA_RETURN_IF_ERROR(ComputeBackwardStep(backend, plan, rank, src, t, g, in_hand, dq_acc.data(),
                                           delta.data(), mine, options, alibi, scale, write,
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
  DkvBlock own = DkvBlock::At(dkv_bufs[(world - 1) % 2].data(), t.batch, rows, g);
  if (world > 1) {
    const DkvBlock finished =
        DkvBlock::At(dkv_bufs[(world - 1) % 2].data(), t.batch, plan.shards[last_src].rows, g);
    own = DkvBlock::At(dkv_recv.data(), t.batch, rows, g);
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
