#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "base/cuda_check.h"
#include "base/device_buffer.h"
#include "base/status_macros.h"
#include "kernels/dtype.h"
#include "ring/device_ring.h"

namespace ringattn {

// ---- The workspace ------------------------------------------------------------------------------

struct DeviceRingWorkspace::State {
  // Sizes one call needs.
  struct Needs {
    RingDirection direction = RingDirection::kForward;
    int steps = 0;          // timing events per kind
    size_t slot_bytes = 0;  // one K/V receive slot: K then V of the largest shard
    size_t q_floats = 0;    // forward o, backward dq: [batch, rows, heads, head_dim]
    size_t row_floats = 0;  // forward lse, backward D: [batch, heads, rows]
    size_t dkv_floats = 0;  // one dK/dV accumulator: [2][batch, max rows, heads_k, head_dim]
    int dkv_buffers = 0;    // how many: 1 (one rank) or 3 (this rank's x2, the received)
  };

  // Creates the streams and events and grows the buffers to `needs`, on the current device.
  absl::Status Reserve(const Needs& needs);
  // The device copy of `slopes` ([heads] fp32), uploaded on the compute stream unless it holds
  // them already; null for none.
  absl::StatusOr<const float*> AlibiSlopes(const std::vector<float>& slopes);
  // The schedule's buffers: the caller's K/V, the slots (K to V: `v_offset` bytes), dK/dV.
  RingBuffers Buffers(const void* k, const void* v, size_t v_offset) const;
  float* q_acc() const { return q_acc_.as<float>(); }
  float* row_acc() const { return row_acc_.as<float>(); }
  float* dkv(int i) const {  // accumulator i, or null while none is held
    return dkv_.get() == nullptr ? nullptr
                                 : dkv_.as<float>() + static_cast<size_t>(i) * dkv_stride_;
  }
  size_t bytes_reserved() const {
    return kv_slots_.bytes() + q_acc_.bytes() + row_acc_.bytes() + dkv_.bytes() + alibi_.bytes();
  }
  void Destroy();  // the destructor's work, on the workspace's device

  int device = -1;
  cudaStream_t compute = nullptr;
  cudaStream_t comm = nullptr;
  // Per step; timing enabled (the executor reads elapsed times between them). The backward's
  // only: comm_waited, step_done, return_*; the forward's only: begin, end.
  std::vector<cudaEvent_t> start, kernels_done, comm_done, comm_waited, step_done;
  cudaEvent_t begin = nullptr, end = nullptr;  // the forward's first and last compute operation
  cudaEvent_t return_done = nullptr;           // comm stream, after the return hop
  cudaEvent_t return_waited = nullptr;         // compute stream, once the return hop has landed

 private:
  // Two receive slots, each [2][batch, max_rows, heads_k, head_dim] (K then V), in one block:
  // slot 1 at half its size.
  DeviceBuffer kv_slots_;
  DeviceBuffer q_acc_;    // fp32 [batch, rows, heads, head_dim]
  DeviceBuffer row_acc_;  // fp32 [batch, heads, rows]
  // dkv_buffers_ accumulators of dkv_stride_ floats each, in one block.
  DeviceBuffer dkv_;
  size_t dkv_stride_ = 0;
  int dkv_buffers_ = 0;
  DeviceBuffer alibi_;             // [heads] fp32
  std::vector<float> alibi_host_;  // what alibi_ holds
};

namespace {

using Clock = std::chrono::steady_clock;

// For the destructor, which cannot return a status: errors on stderr.
void ReportIfError(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  std::fprintf(stderr, "DeviceRingWorkspace: %s failed: %s (%s)\n", what, cudaGetErrorName(e),
               cudaGetErrorString(e));
}

void ReportIfError(const absl::Status& s) {
  if (!s.ok()) std::fprintf(stderr, "DeviceRingWorkspace: %s\n", s.ToString().c_str());
}

// Appends timing-enabled events up to `count`.
absl::Status GrowEvents(std::vector<cudaEvent_t>* events, size_t count) {
  while (events->size() < count) {
    cudaEvent_t e = nullptr;
    RA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDefault));
    events->push_back(e);
  }
  return absl::OkStatus();
}

// Seconds between two completed events (negative when `to` completed first).
absl::StatusOr<double> ElapsedSeconds(cudaEvent_t from, cudaEvent_t to) {
  float ms = 0.0f;
  RA_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, from, to));
  return static_cast<double>(ms) * 1e-3;
}

}  // namespace

absl::Status DeviceRingWorkspace::State::Reserve(const Needs& needs) {
  int current = -1;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&current));
  if (device >= 0 && current != device) {
    return absl::FailedPreconditionError(absl::StrCat(
        "ring workspace belongs to CUDA device ", device, " but device ", current, " is current"));
  }
  device = current;
  if (compute == nullptr) {
    // Non-blocking: no implicit synchronisation with the legacy default stream, which other
    // ranks' threads of the same process may use. The transfers get the higher priority: an
    // NCCL kernel or copy queued behind a wave of attention blocks would delay the next step's
    // input (a choice, not yet measured).
    int least = 0, greatest = 0;
    RA_CUDA_RETURN_IF_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    RA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(&compute, cudaStreamNonBlocking, least));
    RA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(&comm, cudaStreamNonBlocking, greatest));
  }
  const bool backward = needs.direction == RingDirection::kBackward;
  const size_t steps = static_cast<size_t>(std::max(needs.steps, 1));
  std::vector<std::vector<cudaEvent_t>*> per_step = {&start, &kernels_done, &comm_done};
  if (backward) per_step.insert(per_step.end(), {&comm_waited, &step_done});
  for (std::vector<cudaEvent_t>* events : per_step) RA_RETURN_IF_ERROR(GrowEvents(events, steps));
  for (cudaEvent_t* e : backward ? std::vector<cudaEvent_t*>{&return_done, &return_waited}
                                 : std::vector<cudaEvent_t*>{&begin, &end}) {
    if (*e == nullptr) RA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(e, cudaEventDefault));
  }
  // cudaMalloc aligns to 256 bytes; slot 1 starts at 2 * KvBytes, a multiple of
  // heads_k * head_dim * 2 >= 128 bytes, which keeps the kernels' 16-byte loads aligned.
  RA_RETURN_IF_ERROR(kv_slots_.Reserve(2 * needs.slot_bytes));
  RA_RETURN_IF_ERROR(q_acc_.Reserve(needs.q_floats * sizeof(float)));
  RA_RETURN_IF_ERROR(row_acc_.Reserve(needs.row_floats * sizeof(float)));
  // The accumulators keep their stride (and so their offsets) until a call needs more of
  // either; each starts at a multiple of heads_k * head_dim floats (>= 256 bytes) from the
  // 256-byte aligned base, so the add kernel's 16-byte path applies.
  if (needs.dkv_floats > dkv_stride_ || needs.dkv_buffers > dkv_buffers_) {
    const size_t stride = std::max(needs.dkv_floats, dkv_stride_);
    const int buffers = std::max(needs.dkv_buffers, dkv_buffers_);
    dkv_stride_ = 0;
    dkv_buffers_ = 0;
    RA_RETURN_IF_ERROR(dkv_.Free());
    RA_RETURN_IF_ERROR(dkv_.Reserve(stride * buffers * sizeof(float)));
    dkv_stride_ = stride;
    dkv_buffers_ = buffers;
  }
  return absl::OkStatus();
}

absl::StatusOr<const float*> DeviceRingWorkspace::State::AlibiSlopes(
    const std::vector<float>& slopes) {
  if (slopes.empty()) return static_cast<const float*>(nullptr);
  if (slopes == alibi_host_) return static_cast<const float*>(alibi_.as<float>());
  alibi_host_.clear();  // until the upload below is enqueued
  RA_RETURN_IF_ERROR(alibi_.Reserve(slopes.size() * sizeof(float)));
  // From pageable memory: the runtime stages the bytes before returning, so `slopes` may change
  // afterwards; the copy lands in stream order before the kernels that read it.
  RA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
      alibi_.get(), slopes.data(), slopes.size() * sizeof(float), cudaMemcpyHostToDevice, compute));
  alibi_host_ = slopes;
  return static_cast<const float*>(alibi_.as<float>());
}

RingBuffers DeviceRingWorkspace::State::Buffers(const void* k, const void* v,
                                                size_t v_offset) const {
  RingBuffers b;
  b.caller_kv = {static_cast<const std::byte*>(k), static_cast<const std::byte*>(v)};
  b.kv_slots[0] = kv_slots_.as<std::byte>();
  b.kv_slots[1] = kv_slots_.as<std::byte>() + kv_slots_.bytes() / 2;
  b.kv_slot_v_offset = v_offset;
  for (int i = 0; i < 3; ++i) b.dkv[i] = dkv(i);
  return b;
}

void DeviceRingWorkspace::State::Destroy() {
  if (device < 0) return;  // never used
  // The destructor may run on another thread than the calls, with another device current.
  int current = -1;
  ReportIfError(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) ReportIfError(cudaSetDevice(device), "cudaSetDevice");
  for (cudaStream_t s : {compute, comm}) {
    if (s == nullptr) continue;
    ReportIfError(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    ReportIfError(cudaStreamDestroy(s), "cudaStreamDestroy");
  }
  for (std::vector<cudaEvent_t>* events :
       {&start, &kernels_done, &comm_done, &comm_waited, &step_done}) {
    for (cudaEvent_t e : *events) ReportIfError(cudaEventDestroy(e), "cudaEventDestroy");
  }
  for (cudaEvent_t e : {begin, end, return_done, return_waited}) {
    if (e != nullptr) ReportIfError(cudaEventDestroy(e), "cudaEventDestroy");
  }
  for (DeviceBuffer* b : {&kv_slots_, &q_acc_, &row_acc_, &dkv_, &alibi_}) {
    ReportIfError(b->Free());
  }
  if (current >= 0 && current != device) ReportIfError(cudaSetDevice(current), "cudaSetDevice");
}

DeviceRingWorkspace::DeviceRingWorkspace() : state_(std::make_unique<State>()) {}
DeviceRingWorkspace::~DeviceRingWorkspace() { state_->Destroy(); }
cudaStream_t DeviceRingWorkspace::compute_stream() const { return state_->compute; }
cudaStream_t DeviceRingWorkspace::comm_stream() const { return state_->comm; }
size_t DeviceRingWorkspace::bytes_reserved() const { return state_->bytes_reserved(); }

// ---- The executor -------------------------------------------------------------------------------

namespace {

using State = DeviceRingWorkspace::State;

// Enqueues the steps of `s` (the protocol drawn in device_ring.h): `work` enqueues a step's
// calls (EnqueueKernels), names the event after which step s's transfers may start
// (ReadyEvent(s - 1)) and enqueues what follows a step's transfers (AfterTransfers).
template <typename Work>
absl::Status EnqueueSteps(DeviceCommunicator& comm, State& ws, const RingSchedule& s,
                          const RingBuffers& b, Work& work, std::vector<int>* kernel_calls) {
  for (const RingStepPlan& step : s.steps) {
    const int i = step.step;
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.start[i], ws.compute));
    RA_RETURN_IF_ERROR(work.EnqueueKernels(step, b.Kv(step.kv_buffer), &(*kernel_calls)[i]));
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.kernels_done[i], ws.compute));
    if (step.has_transfers()) {
      // What the transfers overwrite or send was last used by step i - 1. (At step 0 every
      // buffer is idle: the previous call drained the streams.)
      if (i > 0) RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(ws.comm, work.ReadyEvent(i - 1), 0));
      const RingTransfers x = StepTransfers(step, b);
      RA_RETURN_IF_ERROR(comm.Enqueue(x.send_ops(), x.recv_ops(), ws.comm));
      RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.comm_done[i], ws.comm));
      // The next block in hand (and the received accumulator): the compute stream idles here
      // until they have arrived.
      RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(ws.compute, ws.comm_done[i], 0));
    }
    RA_RETURN_IF_ERROR(work.AfterTransfers(step));
  }
  return absl::OkStatus();
}

// The compute stream waited for every transfer, so it finishes last; the comm stream's wait
// returns at once and only guards against a transport that enqueued more. (One call enqueued
// nothing there.)
absl::Status WaitForStreams(DeviceCommunicator& comm, const State& ws, const RingSchedule& s) {
  RA_RETURN_IF_ERROR(comm.WaitStream(ws.compute, comm.timeout()));
  if (!s.one_call) RA_RETURN_IF_ERROR(comm.WaitStream(ws.comm, comm.timeout()));
  return absl::OkStatus();
}

// Per step: source rank, calls, and compute = start..kernels_done.
absl::Status ReadStepTimings(const State& ws, const RingSchedule& s,
                             const std::vector<int>& kernel_calls, RingTimings* timings) {
  timings->steps.resize(s.world);
  for (const RingStepPlan& step : s.steps) {
    RingStepTiming& st = timings->steps[step.step];
    st.source_rank = step.block;
    st.kernel_calls = kernel_calls[step.step];
    RA_ASSIGN_OR_RETURN(st.compute_seconds,
                        ElapsedSeconds(ws.start[step.step], ws.kernels_done[step.step]));
  }
  return absl::OkStatus();
}

// Polls until `stream` has no pending work or `timeout` passes, ignoring errors (the caller is
// failing already and only needs its buffers idle). False on timeout.
bool DrainStream(cudaStream_t stream, absl::Duration timeout) {
  if (stream == nullptr) return true;
  const Clock::time_point start = Clock::now();
  const Clock::time_point deadline = start + absl::ToChronoNanoseconds(timeout);
  for (;;) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e != cudaErrorNotReady) return true;  // done, or failed for good (sticky error)
    (void)cudaGetLastError();  // NotReady is not an error; see DeviceCommunicator::WaitStream
    const Clock::time_point now = Clock::now();
    if (now >= deadline) return false;
    device_comm_internal::PollPause(absl::FromChrono(now - start));
  }
}

// The failure path of a call: aborts the communicator (so that peers fail at once with the
// reason rather than wait for this rank's blocks until their timeout), then waits out the work
// already enqueued on the two streams (an aborted transport's work is finite), so that the
// caller may free its tensors and the workspace's buffers. Returns `result` as it came, or the
// failure with a note when the streams did not drain within the communicator's timeout.
absl::StatusOr<RingTimings> AbortAndDrainOnFailure(DeviceCommunicator& comm,
                                                   DeviceRingWorkspace* ws,
                                                   absl::StatusOr<RingTimings> result) {
  if (result.ok()) return result;
  const absl::Status& failure = result.status();
  const std::string message = absl::StrCat("rank ", comm.rank(), ": ", failure.message());
  comm.Abort(absl::Status(failure.code(), message));
  const bool drained = ws == nullptr || (DrainStream(ws->compute_stream(), comm.timeout()) &&
                                         DrainStream(ws->comm_stream(), comm.timeout()));
  if (!drained) {
    return absl::Status(
        failure.code(),
        absl::StrCat(message, " [and the ring's streams did not drain within ",
                     absl::FormatDuration(comm.timeout()),
                     ": its buffers and the caller's tensors may still be in use]"));
  }
  return result;  // as the host executor: the reason as it came, the abort carries the rank
}

// Where every backend call of a ring call runs: the workspace's compute stream.
ExecutionContext OnCompute(const State& ws) { return ExecutionContext{ws.compute}; }

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The checks of a device call after its options', before anything is enqueued: the plan
// against the group, packed sequences against the backend, the backend (one in device memory)
// and the workspace. Errors name the executor (`what`) and the backends it takes.
absl::Status CheckDeviceCall(const DeviceCommunicator& comm, const AttentionBackend& backend,
                             const ShardPlan& plan, const RingAttentionOptions& options,
                             const DeviceRingWorkspace* ws, const char* what,
                             const char* backends) {
  RA_RETURN_IF_ERROR(CheckPlanMatchesGroup(plan, comm.rank(), comm.world_size()));
  RA_RETURN_IF_ERROR(
      CheckPackedSequences(options, plan, backend.capabilities().packed_sequences, backend.name()));
  if (backend.memory_space() != MemorySpace::kDevice) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " needs a ", backends, ", got '", std::string(backend.name()), "'"));
  }
  if (ws == nullptr) return absl::InvalidArgumentError(absl::StrCat(what, " needs a workspace"));
  return absl::OkStatus();
}

// ---- Forward ------------------------------------------------------------------------------------

class ForwardCall {
 public:
  ForwardCall(DeviceCommunicator& comm, AttentionBackend& backend, const ShardPlan& plan,
              const RingShardTensors& t, const RingAttentionOptions& options,
              DeviceRingWorkspace* ws)
      : comm_(comm), backend_(backend), plan_(plan), t_(t), options_(options), ws_(ws) {}

  absl::StatusOr<RingTimings> Run() {
    const auto t0 = Clock::now();
    RA_RETURN_IF_ERROR(ValidateRingOptions(options_, t_));
    RA_RETURN_IF_ERROR(CheckDeviceCall(comm_, backend_, plan_, options_, ws_,
                                       "the device ring driver",
                                       "CUDA backend (cuda, cuda_reference)"));
    const AttentionShape shape = t_.shape(0);
    const BackendCapabilities caps = backend_.capabilities();
    s_ = PlanRingSchedule(plan_, comm_.rank(), RingDirection::kForward, shape,
                          {caps.position_runs, caps.partial_input});
    State& ws = ws_->state();
    const AttentionShape mine = t_.shape(s_.rows);
    State::Needs needs;
    needs.steps = s_.world;
    if (!s_.one_call) {
      needs.q_floats = mine.q_elems();
      needs.row_floats = mine.lse_elems();
      if (s_.world > 1) needs.slot_bytes = 2 * shape.WithRows(0, s_.max_rows).kv_bytes();
    }
    RA_RETURN_IF_ERROR(ws.Reserve(needs));
    RA_ASSIGN_OR_RETURN(alibi_, ws.AlibiSlopes(options_.alibi_slopes));
    scale_ = RingSoftmaxScale(options_, t_.head_dim);
    kernel_calls_.assign(s_.world, 0);

    if (s_.one_call) {
      RA_RETURN_IF_ERROR(EnqueueOneCall());
    } else {
      RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.begin, ws.compute));
      // Accumulators: o = 0 and lse = -inf, the empty partial every merge replaces, unless the
      // first step writes them (docs/architecture.md: what the passes cost).
      if (!s_.first_writes()) {
        if (needs.q_floats > 0) {
          RA_CUDA_RETURN_IF_ERROR(
              cudaMemsetAsync(ws.q_acc(), 0, needs.q_floats * sizeof(float), ws.compute));
        }
        RA_RETURN_IF_ERROR(LaunchFillFloat(ws.row_acc(), static_cast<int64_t>(needs.row_floats),
                                           -std::numeric_limits<float>::infinity(), ws.compute));
      }
      const RingBuffers b = ws.Buffers(t_.k, t_.v, shape.WithRows(0, s_.max_rows).kv_bytes());
      RA_RETURN_IF_ERROR(EnqueueSteps(comm_, ws, s_, b, *this, &kernel_calls_));
      // Unless the last step did: the fp32 accumulators rounded once into the caller's dtype,
      // and the lse.
      if (!s_.last_finalizes()) {
        RA_RETURN_IF_ERROR(LaunchConvertFromFloat(
            ws.q_acc(), t_.out, t_.dtype, static_cast<int64_t>(needs.q_floats), ws.compute));
        if (t_.lse != nullptr && needs.row_floats > 0) {
          RA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(t_.lse, ws.row_acc(),
                                                  needs.row_floats * sizeof(float),
                                                  cudaMemcpyDeviceToDevice, ws.compute));
        }
      }
      RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.end, ws.compute));
    }
    const double launch_seconds = SecondsSince(t0);

    RA_RETURN_IF_ERROR(WaitForStreams(comm_, ws, s_));
    RingTimings timings;
    RA_RETURN_IF_ERROR(ReadStepTimings(ws, s_, kernel_calls_, &timings));
    for (const RingStepPlan& step : s_.steps) {
      if (!step.has_transfers()) continue;
      RA_ASSIGN_OR_RETURN(const double wait,
                          ElapsedSeconds(ws.kernels_done[step.step], ws.comm_done[step.step]));
      timings.steps[step.step].comm_wait_seconds = std::max(0.0, wait);
    }
    if (s_.one_call) {
      timings.device_seconds = timings.steps[0].compute_seconds;
    } else {
      RA_ASSIGN_OR_RETURN(timings.device_seconds, ElapsedSeconds(ws.begin, ws.end));
    }
    timings.launch_seconds = launch_seconds;
    timings.total_seconds = SecondsSince(t0);
    return timings;
  }

  // EnqueueSteps' hooks: the step's calls into the fp32 accumulators; the slot received into
  // at step s was in hand at s - 1, so the transfers wait for that step's kernels; nothing
  // after the transfers.
  absl::Status EnqueueKernels(const RingStepPlan& step, const KvBlock& kv, int* calls) {
    State& ws = ws_->state();
    return ComputeRingStep(backend_, OnCompute(ws), s_, step, t_, kv, ws.q_acc(), ws.row_acc(),
                           options_, alibi_, scale_, calls);
  }
  cudaEvent_t ReadyEvent(int step) const { return ws_->state().kernels_done[step]; }
  absl::Status AfterTransfers(const RingStepPlan&) { return absl::OkStatus(); }

 private:
  // One rank: one kernel call straight into the caller's output (its dtype, no accumulators, no
  // conversion) and lse, as a single-device call on the whole shard, so that a one-rank ring
  // costs what the kernel alone does.
  absl::Status EnqueueOneCall() {
    State& ws = ws_->state();
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.start[0], ws.compute));
    if (s_.rows > 0) {
      const KvBlock kv{static_cast<const std::byte*>(t_.k), static_cast<const std::byte*>(t_.v)};
      // Sizes, strides, positions and options as every ring step has them; only the output
      // differs.
      AttentionParams p =
          SegmentPairParams(t_, s_.rows, *s_.one_call, kv, s_.rows, *s_.one_call,
                            /*o_acc=*/nullptr, /*lse_acc=*/nullptr, options_, alibi_, scale_);
      p.o = t_.out;
      p.o_dtype = t_.dtype;
      p.lse = t_.lse;
      p.merge_into_output = false;
      RA_RETURN_IF_ERROR(backend_.Forward(p, OnCompute(ws)));
      kernel_calls_[0] = 1;
    }
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.kernels_done[0], ws.compute));
    return absl::OkStatus();
  }

  DeviceCommunicator& comm_;
  AttentionBackend& backend_;
  const ShardPlan& plan_;
  const RingShardTensors& t_;
  const RingAttentionOptions& options_;
  DeviceRingWorkspace* const ws_;
  RingSchedule s_;
  const float* alibi_ = nullptr;  // device copy of options.alibi_slopes, or null
  float scale_ = 0;
  std::vector<int> kernel_calls_;  // [world]
};

// ---- Backward -----------------------------------------------------------------------------------

class BackwardCall {
 public:
  BackwardCall(DeviceCommunicator& comm, AttentionBackend& backend, const ShardPlan& plan,
               const RingBackwardTensors& t, const RingAttentionOptions& options,
               DeviceRingWorkspace* ws)
      : comm_(comm),
        backend_(backend),
        plan_(plan),
        t_(t),
        options_(options),
        ws_(ws),
        shape_(t.shape(0)),
        // fp32 gradients: dQ accumulates in the caller's dq and the return hop lands in the
        // caller's dk and dv, so nothing is copied at the end.
        grads_in_place_(t.grad_dtype == DType::kF32) {}

  absl::StatusOr<RingTimings> Run() {
    const auto t0 = Clock::now();
    RA_RETURN_IF_ERROR(ValidateRingBackward(options_, t_));
    RA_RETURN_IF_ERROR(CheckDeviceCall(comm_, backend_, plan_, options_, ws_,
                                       "the device ring backward",
                                       "CUDA backward backend (cuda, cudnn)"));
    s_ = PlanRingSchedule(plan_, comm_.rank(), RingDirection::kBackward, shape_,
                          {backend_.capabilities().position_runs, false});
    RA_RETURN_IF_ERROR(CheckShardTensorsSet(t_, s_.rank, s_.rows));
    State& ws = ws_->state();
    const AttentionShape mine = t_.shape(s_.rows);
    State::Needs needs;
    needs.direction = RingDirection::kBackward;
    needs.steps = s_.world;
    needs.row_floats = mine.lse_elems();
    if (!grads_in_place_) needs.q_floats = mine.q_elems();
    if (s_.world > 1) {
      needs.slot_bytes = 2 * shape_.WithRows(0, s_.max_rows).kv_bytes();
      needs.dkv_floats = DkvBytes(shape_, s_.max_rows) / sizeof(float);
      needs.dkv_buffers = 3;
    } else {
      // One rank: the one accumulator is its own (in the one call only for rounding).
      needs.dkv_floats = DkvBytes(shape_, s_.rows) / sizeof(float);
      needs.dkv_buffers = 1;
    }
    RA_RETURN_IF_ERROR(ws.Reserve(needs));
    RA_ASSIGN_OR_RETURN(alibi_, ws.AlibiSlopes(options_.alibi_slopes));
    scale_ = RingSoftmaxScale(options_, t_.head_dim);
    dq_acc_ = grads_in_place_ ? static_cast<float*>(t_.dq) : ws.q_acc();
    kernel_calls_.assign(s_.world, 0);

    // D once per rank for every step (the one call too: the backend then needs no scratch).
    RA_RETURN_IF_ERROR(ComputeShardDelta(backend_, OnCompute(ws), t_, s_.rows, ws.row_acc()));
    if (s_.one_call) {
      RA_RETURN_IF_ERROR(EnqueueOneCall());
    } else {
      RA_RETURN_IF_ERROR(EnqueueRing());
    }

    RA_RETURN_IF_ERROR(WaitForStreams(comm_, ws, s_));
    RingTimings timings;
    RA_RETURN_IF_ERROR(ReadStepTimings(ws, s_, kernel_calls_, &timings));
    for (const RingStepPlan& step : s_.steps) {
      const int i = step.step;
      RA_ASSIGN_OR_RETURN(const double wait, ElapsedSeconds(ws.kernels_done[i], ws.comm_waited[i]));
      RA_ASSIGN_OR_RETURN(const double add, ElapsedSeconds(ws.comm_waited[i], ws.step_done[i]));
      // Events of one stream complete in order; max() only guards the timer's resolution.
      RingStepTiming& st = timings.steps[i];
      st.compute_seconds = std::max(0.0, st.compute_seconds) + std::max(0.0, add);
      st.comm_wait_seconds = std::max(0.0, wait);
    }
    if (s_.return_send) {
      RA_ASSIGN_OR_RETURN(const double hop,
                          ElapsedSeconds(ws.step_done[s_.world - 1], ws.return_waited));
      timings.steps.back().comm_wait_seconds += std::max(0.0, hop);
    }
    timings.total_seconds = SecondsSince(t0);
    return timings;
  }

  // EnqueueSteps' hooks: this rank's contribution to the block in hand (zeroed first unless the
  // step writes it); the transfers wait for the previous step's add (the accumulator sent is
  // finished, the receive buffer read by it); after them, the received accumulator added.
  absl::Status EnqueueKernels(const RingStepPlan& step, const KvBlock& kv, int* calls) {
    State& ws = ws_->state();
    const DkvBlock mine = Contribution(step);
    if (mine.elems > 0 && step.output != StepOutput::kWrite) {
      RA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(mine.dk, 0, mine.Bytes(), ws.compute));
    }
    return ComputeBackwardStep(backend_, OnCompute(ws), s_, step, t_, kv, dq_acc_, ws.row_acc(),
                               mine, options_, alibi_, scale_, calls);
  }
  cudaEvent_t ReadyEvent(int step) const { return ws_->state().step_done[step]; }
  absl::Status AfterTransfers(const RingStepPlan& step) {
    State& ws = ws_->state();
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.comm_waited[step.step], ws.compute));
    if (step.dkv_recv) {
      // Ranks block .. rank - 1 received, this rank's added: the host executor's order.
      const DkvBlock mine = Contribution(step);
      RA_RETURN_IF_ERROR(LaunchAddFloat(mine.dk, ws.dkv(step.dkv_recv->buffer),
                                        static_cast<int64_t>(2 * mine.elems), ws.compute));
    }
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.step_done[step.step], ws.compute));
    return absl::OkStatus();
  }

 private:
  DkvBlock Contribution(const RingStepPlan& step) const {
    return DkvBlock::At(ws_->state().dkv(step.dkv_buffer), shape_, step.block_rows);
  }
  // The caller's dk and dv as the fp32 accumulator's halves (fp32 gradients only).
  DkvBlock CallerGrads() const {
    return {static_cast<float*>(t_.dk), static_cast<float*>(t_.dv),
            static_cast<size_t>(t_.shape(s_.rows).kv_elems())};
  }

  // One rank: one call (after D) that writes the gradients, fp32, straight into the caller's
  // buffers, or into the workspace and then rounded.
  absl::Status EnqueueOneCall() {
    State& ws = ws_->state();
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.start[0], ws.compute));
    const DkvBlock grads =
        grads_in_place_ ? CallerGrads() : DkvBlock::At(ws.dkv(0), shape_, s_.rows);
    if (s_.rows > 0) {
      const KvBlock kv{static_cast<const std::byte*>(t_.k), static_cast<const std::byte*>(t_.v)};
      AttentionBackwardParams bp =
          SegmentPairBackwardParams(t_, s_.rows, *s_.one_call, kv, s_.rows, *s_.one_call, dq_acc_,
                                    ws.row_acc(), grads, options_, alibi_, scale_);
      // Written, not added: every element of dq, dk and dv (zeros where nothing contributes),
      // so the call is not skipped even if it were wholly masked.
      bp.accumulate = false;
      RA_RETURN_IF_ERROR(backend_.Backward(bp, OnCompute(ws)));
      kernel_calls_[0] = 1;
    }
    // The step's other events, so that timings read the same on every path.
    for (cudaEvent_t e : {ws.kernels_done[0], ws.comm_waited[0], ws.step_done[0]}) {
      RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(e, ws.compute));
    }
    RA_RETURN_IF_ERROR(EnqueueStoreDq());
    return EnqueueStoreDkv(grads);
  }

  // The ring: the steps, then the return hop and the rounding.
  absl::Status EnqueueRing() {
    State& ws = ws_->state();
    const size_t dq_floats = static_cast<size_t>(t_.shape(s_.rows).q_elems());
    if (dq_floats > 0 && !s_.first_writes()) {
      RA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dq_acc_, 0, dq_floats * sizeof(float), ws.compute));
    }
    const RingBuffers b = ws.Buffers(t_.k, t_.v, shape_.WithRows(0, s_.max_rows).kv_bytes());
    RA_RETURN_IF_ERROR(EnqueueSteps(comm_, ws, s_, b, *this, &kernel_calls_));
    // dq is final once the last step's calls are done: rounded while the return hop travels.
    RA_RETURN_IF_ERROR(EnqueueStoreDq());
    if (!s_.return_recv) return EnqueueStoreDkv(Contribution(s_.steps.back()));
    const DkvBlock own = grads_in_place_
                             ? CallerGrads()
                             : DkvBlock::At(ws.dkv(s_.return_recv->buffer), shape_, s_.rows);
    // The complete accumulator of block rank + 1 to its owner, this rank's own from rank - 1.
    const RingTransfers x = ReturnHopTransfers(s_, b, shape_, own);
    RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(ws.comm, ws.step_done[s_.world - 1], 0));
    RA_RETURN_IF_ERROR(comm_.Enqueue(x.send_ops(), x.recv_ops(), ws.comm));
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.return_done, ws.comm));
    RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(ws.compute, ws.return_done, 0));
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.return_waited, ws.compute));
    return EnqueueStoreDkv(own);
  }

  // The fp32 gradients rounded once into the caller's (a copy for fp32; nothing when they are
  // the caller's already).
  absl::Status EnqueueStoreDq() {
    if (grads_in_place_) return absl::OkStatus();
    return LaunchConvertFromFloat(dq_acc_, t_.dq, t_.grad_dtype, t_.shape(s_.rows).q_elems(),
                                  ws_->state().compute);
  }
  absl::Status EnqueueStoreDkv(const DkvBlock& own) {
    if (own.dk == t_.dk && own.dv == t_.dv) return absl::OkStatus();  // written in place
    const cudaStream_t compute = ws_->state().compute;
    const int64_t n = static_cast<int64_t>(own.elems);
    RA_RETURN_IF_ERROR(LaunchConvertFromFloat(own.dk, t_.dk, t_.grad_dtype, n, compute));
    return LaunchConvertFromFloat(own.dv, t_.dv, t_.grad_dtype, n, compute);
  }

  DeviceCommunicator& comm_;
  AttentionBackend& backend_;
  const ShardPlan& plan_;
  const RingBackwardTensors& t_;
  const RingAttentionOptions& options_;
  DeviceRingWorkspace* const ws_;
  const AttentionShape shape_;
  const bool grads_in_place_;
  RingSchedule s_;
  const float* alibi_ = nullptr;  // device copy of options.alibi_slopes, or null
  float scale_ = 0;
  float* dq_acc_ = nullptr;        // the caller's dq (fp32) or the workspace's
  std::vector<int> kernel_calls_;  // [world]
};

}  // namespace

absl::StatusOr<RingTimings> RingFlashAttnForwardDevice(
    DeviceCommunicator& comm, AttentionBackend& backend, const ShardPlan& plan,
    const RingShardTensors& t, const RingAttentionOptions& options, DeviceRingWorkspace* ws) {
  return AbortAndDrainOnFailure(comm, ws, ForwardCall(comm, backend, plan, t, options, ws).Run());
}

absl::StatusOr<RingTimings> RingFlashAttnBackwardDevice(
    DeviceCommunicator& comm, AttentionBackend& backend, const ShardPlan& plan,
    const RingBackwardTensors& t, const RingAttentionOptions& options, DeviceRingWorkspace* ws) {
  return AbortAndDrainOnFailure(comm, ws, BackwardCall(comm, backend, plan, t, options, ws).Run());
}

}  // namespace ringattn
