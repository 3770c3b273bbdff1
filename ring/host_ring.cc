#include "ring/host_ring.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <limits>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();

// Rounds n fp32 values into `to` (element type `dtype`).
void StoreFloats(const float* from, size_t n, DType dtype, void* to) {
  for (size_t i = 0; i < n; ++i) StoreFromFloat(to, static_cast<int64_t>(i), dtype, from[i]);
}

// Checks every host ring call makes before its first transfer; `needs` is the error for a
// backend or transport not in host memory.
absl::Status CheckHostCall(const Communicator& comm, const AttentionBackend& backend,
                           const ShardPlan& plan, const RingAttentionOptions& options,
                           const char* needs) {
  RA_RETURN_IF_ERROR(CheckPlanMatchesGroup(plan, comm.rank(), comm.world_size()));
  RA_RETURN_IF_ERROR(
      CheckPackedSequences(options, plan, backend.capabilities().packed_sequences, backend.name()));
  if (backend.memory_space() != MemorySpace::kHost || comm.memory_space() != MemorySpace::kHost) {
    return absl::UnimplementedError(needs);
  }
  return absl::OkStatus();
}

// The context of every kernel call: the kernel stops between blocks once the communicator is
// aborted (a cancelled request, a failed peer), instead of finishing its step.
ExecutionContext KernelContext(const Communicator& comm) {
  return ExecutionContext{.cancel = &comm.aborted()};
}

// What a failed kernel call fails the ring with. Peers may be copying into or out of this
// rank's buffers, which go when the ring returns: abort (they fail at once), then wait until
// none still copies. A kernel stopped by an abort (CANCELLED: it polls comm.aborted()) reports
// the abort's reason, which Wait returns once aborted.
absl::Status KernelFailure(Communicator& comm, const absl::Status& computed) {
  comm.Abort(computed);
  const absl::Status reason = comm.Wait();
  return computed.code() == absl::StatusCode::kCancelled && !reason.ok() ? reason : computed;
}

// The host memory of one call's circulating buffers: two K/V receive slots (each K then V of
// the largest shard; step 0 computes and sends the caller's K/V, so nothing is copied before
// the first transfer) and, for the backward, the dK/dV accumulators: this rank's contribution
// of the current step and the finished accumulator of the previous step (being sent) alternate
// between two; a third receives. Accumulator 0 starts NaN: the first step writes or zeroes it.
class HostRingMemory {
 public:
  HostRingMemory(const RingSchedule& s, const AttentionShape& shape, const void* k, const void* v) {
    buffers_.caller_kv = {static_cast<const std::byte*>(k), static_cast<const std::byte*>(v)};
    buffers_.kv_slot_v_offset = shape.WithRows(0, s.max_rows).kv_bytes();
    if (s.world > 1) {
      for (int i = 0; i < 2; ++i) {
        kv_slots_[i].resize(2 * buffers_.kv_slot_v_offset);
        buffers_.kv_slots[i] = kv_slots_[i].data();
      }
    }
    if (s.direction == RingDirection::kBackward) {
      const size_t floats = DkvBytes(shape, s.max_rows) / sizeof(float);
      dkv_[0].resize(floats, kNan);
      if (s.world > 1) {
        dkv_[1].resize(floats);
        dkv_[kDkvReceive].resize(floats);
      }
      for (int i = 0; i < 3; ++i) buffers_.dkv[i] = dkv_[i].data();
    }
  }
  const RingBuffers& buffers() const { return buffers_; }

 private:
  std::vector<std::byte> kv_slots_[2];
  std::vector<float> dkv_[3];
  RingBuffers buffers_;
};

// The steps of `s` on the host: per step post its transfers, compute(step, block in hand,
// &kernel_calls), wait for the transfers, then add_received(step) where an accumulator arrived
// (timed as compute).
absl::Status RunSteps(
    Communicator& comm, const RingSchedule& s, const RingBuffers& b,
    absl::FunctionRef<absl::Status(const RingStepPlan&, const KvBlock&, int*)> compute,
    absl::FunctionRef<void(const RingStepPlan&)> add_received, RingTimings* timings) {
  timings->steps.resize(s.world);
  for (const RingStepPlan& step : s.steps) {
    RingStepTiming& st = timings->steps[step.step];
    st.source_rank = step.block;
    const RingTransfers x = StepTransfers(step, b);
    if (step.has_transfers()) RA_RETURN_IF_ERROR(comm.Start(x.send_ops(), x.recv_ops()));
    const auto c0 = Clock::now();
    const absl::Status computed = compute(step, b.Kv(step.kv_buffer), &st.kernel_calls);
    if (!computed.ok()) return KernelFailure(comm, computed);
    st.compute_seconds = SecondsSince(c0);
    if (step.has_transfers()) {
      const auto w0 = Clock::now();
      RA_RETURN_IF_ERROR(comm.Wait());
      st.comm_wait_seconds = SecondsSince(w0);
    }
    if (step.dkv_recv) {
      const auto a0 = Clock::now();
      add_received(step);
      st.compute_seconds += SecondsSince(a0);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<RingTimings> RunForward(Communicator& comm, AttentionBackend& backend,
                                       const ShardPlan& plan, const RingShardTensors& t,
                                       const RingAttentionOptions& options) {
  const auto t0 = Clock::now();
  RA_RETURN_IF_ERROR(ValidateRingOptions(options, t));
  RA_RETURN_IF_ERROR(CheckHostCall(comm, backend, plan, options,
                                   "the host ring driver needs a host backend and transport"));
  const AttentionShape shape = t.shape(0);
  const BackendCapabilities caps = backend.capabilities();
  const RingSchedule s = PlanRingSchedule(plan, comm.rank(), RingDirection::kForward, shape,
                                          {caps.position_runs, caps.partial_input});
  const float scale = RingSoftmaxScale(options, t.head_dim);
  const float* alibi = options.alibi_slopes.empty() ? nullptr : options.alibi_slopes.data();

  // Accumulators: o [batch, rows, heads, head_dim] fp32 and lse [batch, heads, rows] fp32:
  // o = 0 and lse = -inf, the empty partial every merge replaces, unless the first step
  // writes them; then NaN, so that a row it failed to write shows in the result (the device
  // executor leaves them unset there).
  const AttentionShape mine = t.shape(s.rows);
  std::vector<float> o_acc(mine.q_elems(), s.first_writes() ? kNan : 0.0f);
  std::vector<float> lse_acc(mine.lse_elems(),
                             s.first_writes() ? kNan : -std::numeric_limits<float>::infinity());
  const HostRingMemory memory(s, shape, t.k, t.v);
  const ExecutionContext ctx = KernelContext(comm);

  RingTimings timings;
  RA_RETURN_IF_ERROR(RunSteps(
      comm, s, memory.buffers(),
      [&](const RingStepPlan& step, const KvBlock& kv, int* calls) {
        return ComputeRingStep(backend, ctx, s, step, t, kv, o_acc.data(),
                               lse_acc.data(), options, alibi, scale, calls);
      },
      [](const RingStepPlan&) {}, &timings));
  // Unless the last step wrote them: the fp32 accumulators rounded once into out, and lse.
  if (!s.last_finalizes()) {
    StoreFloats(o_acc.data(), o_acc.size(), t.dtype, t.out);
    if (t.lse != nullptr) std::copy(lse_acc.begin(), lse_acc.end(), t.lse);
  }
  timings.total_seconds = SecondsSince(t0);
  return timings;
}

absl::StatusOr<RingTimings> RunBackward(Communicator& comm, AttentionBackend& backend,
                                        const ShardPlan& plan, const RingBackwardTensors& t,
                                        const RingAttentionOptions& options) {
  const auto t0 = Clock::now();
  RA_RETURN_IF_ERROR(ValidateRingBackward(options, t));
  RA_RETURN_IF_ERROR(
      CheckHostCall(comm, backend, plan, options,
                    "the host ring backward needs a host backward backend and transport"));
  const AttentionShape shape = t.shape(0);
  const RingSchedule s = PlanRingSchedule(plan, comm.rank(), RingDirection::kBackward, shape,
                                          {backend.capabilities().position_runs, false});
  RA_RETURN_IF_ERROR(CheckShardTensorsSet(t, s.rank, s.rows));
  const float scale = RingSoftmaxScale(options, t.head_dim);
  const float* alibi = options.alibi_slopes.empty() ? nullptr : options.alibi_slopes.data();

  // dq [batch, rows, heads, head_dim] and D [batch, heads, rows], fp32, local. dq starts at 0,
  // unless the first step writes it; then NaN, so that an element it failed to write shows in
  // the result (the device executor leaves it unset there).
  const AttentionShape mine = t.shape(s.rows);
  std::vector<float> dq_acc(mine.q_elems(), s.first_writes() ? kNan : 0.0f);
  std::vector<float> delta(mine.lse_elems());
  const ExecutionContext ctx = KernelContext(comm);
  if (absl::Status d = ComputeShardDelta(backend, ctx, t, s.rows, delta.data()); !d.ok()) {
    return KernelFailure(comm, d);
  }
  const HostRingMemory memory(s, shape, t.k, t.v);
  const RingBuffers& b = memory.buffers();
  auto contribution = [&](const RingStepPlan& step) {
    return DkvBlock::At(b.dkv[step.dkv_buffer], shape, step.block_rows);
  };

  RingTimings timings;
  RA_RETURN_IF_ERROR(RunSteps(
      comm, s, b,
      [&](const RingStepPlan& step, const KvBlock& kv, int* calls) {
        // This rank's contribution to the block only: zeroed, or written whole by the first step.
        const DkvBlock dkv = contribution(step);
        if (step.output != StepOutput::kWrite) std::fill(dkv.dk, dkv.dk + 2 * dkv.elems, 0.0f);
        return ComputeBackwardStep(backend, ctx, s, step, t, kv, dq_acc.data(),
                                   delta.data(), dkv, options, alibi, scale, calls);
      },
      [&](const RingStepPlan& step) {
        // Ranks block .. rank - 1 received, this rank's added: a fixed order of the sums.
        const DkvBlock into = contribution(step);
        const float* from = b.dkv[step.dkv_recv->buffer];
        for (size_t i = 0; i < 2 * into.elems; ++i) into.dk[i] += from[i];
      },
      &timings));

  // The return hop: the finished accumulator of block rank + 1 to its owner, this rank's own
  // from rank - 1.
  DkvBlock own = DkvBlock::At(b.dkv[s.steps.back().dkv_buffer], shape, s.rows);
  if (s.return_recv) {
    own = DkvBlock::At(b.dkv[s.return_recv->buffer], shape, s.rows);
    const RingTransfers x = ReturnHopTransfers(s, b, shape, own);
    const auto w0 = Clock::now();
    RA_RETURN_IF_ERROR(Exchange(comm, x.send_ops(), x.recv_ops()));
    timings.steps.back().comm_wait_seconds += SecondsSince(w0);
  }
  StoreFloats(dq_acc.data(), dq_acc.size(), t.grad_dtype, t.dq);
  StoreFloats(own.dk, own.elems, t.grad_dtype, t.dk);
  StoreFloats(own.dv, own.elems, t.grad_dtype, t.dv);
  timings.total_seconds = SecondsSince(t0);
  return timings;
}

// A rank that stops early would leave its neighbours waiting for its blocks until their
// timeout; aborting releases them at once with the reason.
absl::StatusOr<RingTimings> AbortOnFailure(Communicator& comm, absl::StatusOr<RingTimings> result) {
  if (!result.ok()) {
    comm.Abort(absl::Status(result.status().code(),
                            absl::StrCat("rank ", comm.rank(), ": ", result.status().message())));
  }
  return result;
}

}  // namespace

absl::StatusOr<RingTimings> RingFlashAttnForward(Communicator& comm, AttentionBackend& backend,
                                                 const ShardPlan& plan, const RingShardTensors& t,
                                                 const RingAttentionOptions& options) {
  return AbortOnFailure(comm, RunForward(comm, backend, plan, t, options));
}

absl::StatusOr<RingTimings> RingFlashAttnBackward(Communicator& comm, AttentionBackend& backend,
                                                  const ShardPlan& plan,
                                                  const RingBackwardTensors& t,
                                                  const RingAttentionOptions& options) {
  return AbortOnFailure(comm, RunBackward(comm, backend, plan, t, options));
}

}  // namespace ringattn
