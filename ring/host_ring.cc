#include "ring/host_ring.h"

#include <chrono>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
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
  RA_RETURN_IF_ERROR(CheckPlanMatchesGroup(plan, rank, world));
  RA_RETURN_IF_ERROR(
      CheckPackedSequences(options, plan, backend.supports_packed_sequences(), backend.name()));
  if (backend.memory_space() != MemorySpace::kHost || comm.memory_space() != MemorySpace::kHost) {
    return absl::UnimplementedError("the host ring driver needs a host backend and transport");
  }
  const ShardGeometry g = ShardGeometry::Of(t);
  const int64_t rows = plan.shards[rank].rows;
  const float scale = RingSoftmaxScale(options, t.head_dim);
  const float* alibi = options.alibi_slopes.empty() ? nullptr : options.alibi_slopes.data();

  // Accumulators: o [batch, rows, heads, head_dim] fp32 and lse [batch, heads, rows] fp32:
  // o = 0 and lse = -inf, the empty partial every merge replaces, unless the first step
  // writes them (PlanRingOutput); then NaN, so that a row it failed to write shows in the
  // result (the device driver leaves them unset there).
  const RingOutputPlan output = PlanRingOutput(plan, rank, world, backend);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> o_acc(static_cast<size_t>(t.batch) * rows * g.q_row_elems,
                           output.first_writes ? nan : 0.0f);
  std::vector<float> lse_acc(static_cast<size_t>(t.batch) * t.heads * rows,
                             output.first_writes ? nan : -std::numeric_limits<float>::infinity());

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
  const int next = RingNextRank(rank, world);
  const int prev = RingPrevRank(rank, world);
  for (int step = 0; step < world; ++step) {
    RingStepTiming& st = timings.steps[step];
    const int src = RingSourceRank(rank, step, world);  // owner of the block in hand
    st.source_rank = src;
    KvBlock incoming;
    if (step + 1 < world) {
      const int incoming_src = RingSourceRank(rank, step + 1, world);
      const size_t send_bytes = g.KvBytes(t.batch, plan.shards[src].rows);
      const size_t recv_bytes = g.KvBytes(t.batch, plan.shards[incoming_src].rows);
      std::byte* slot = slots[step % 2].data();
      incoming = {slot, slot + slot_kv_bytes};
      const SendOp sends[] = {{next, in_hand.k, send_bytes}, {next, in_hand.v, send_bytes}};
      const RecvOp recvs[] = {{prev, slot, recv_bytes}, {prev, slot + slot_kv_bytes, recv_bytes}};
      RA_RETURN_IF_ERROR(comm.Start(sends, recvs));
    }
    const auto c0 = Clock::now();
    const StepTarget target{output.ModeOf(step, world), o_acc.data(), lse_acc.data()};
    RA_RETURN_IF_ERROR(ComputeRingStep(backend, plan, rank, src, t, g, in_hand, target, options,
                                       alibi, scale, &st.kernel_calls));
    st.compute_seconds = SecondsSince(c0);
    if (step + 1 < world) {
      const auto w0 = Clock::now();
      RA_RETURN_IF_ERROR(comm.Wait());
      st.comm_wait_seconds = SecondsSince(w0);
      in_hand = incoming;
    }
  }
  if (!output.last_finalizes) Finalize(t, rows, o_acc, lse_acc);
  timings.total_seconds = SecondsSince(t0);
  return timings;
}

}  // namespace

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
