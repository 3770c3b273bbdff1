// Ring flash attention on GPUs, forward and backward: the device executor of the ring's
// schedule (schedule.h), with the host executor's steps and fixed-order sums (host_ring.h).
// Each rank's shard is in device memory; K/V blocks (and the backward's dK/dV accumulators)
// travel over a DeviceCommunicator while the block in hand is computed, on the two streams of a
// DeviceRingWorkspace. The host only enqueues, and waits once, at the end, through the
// communicator's watchdog (WaitStream). Step s, in the order the host enqueues it:
//
//   compute: record start[s] | backward: zero this rank's dK/dV (unless the step writes) |
//            the step's calls | record kernels_done[s]
//   comm:    wait ready[s-1] | Enqueue(the step's transfers) | record comm_done[s]
//   compute: wait comm_done[s] | backward: record comm_waited[s] | add the received
//            accumulator | record step_done[s]
//
// (the comm line and the wait on comm_done only for a step with transfers, the wait on ready
// from step 1; ready is kernels_done forward, step_done backward). Forward: a fill of the fp32
// accumulators before step 0 and a rounding into out after the last, unless those steps write
// them (RingSchedule). Backward: then the return hop (comm: wait step_done[W-1] | Enqueue |
// record return_done; compute: wait return_done | record return_waited) and one rounding of the
// gradients. One rank (RingSchedule::one_call) is one kernel call into the caller's outputs.
// docs/architecture.md ("The ring step") has the whys.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>

#include "absl/status/statusor.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_backward_params.h"
#include "ring/accumulator_kernels.h"  // LaunchFillFloat, LaunchAddFloat, LaunchConvertFromFloat
#include "ring/layout.h"
#include "ring/ring_step.h"
#include "ring/transport/device_communicator.h"

namespace ringattn {

// What the device executor keeps between calls on one rank, for either direction: its two
// streams (compute, and comm at the higher priority), K/V receive slots, fp32 accumulators, the
// device copy of the ALiBi slopes and the timing events. Buffers grow when a call needs more and
// are reused otherwise: the steady state allocates nothing per call or step. One workspace
// serves one rank and one call at a time, on the device current at its first use (a call on
// another device is FailedPrecondition).
class DeviceRingWorkspace {
 public:
  DeviceRingWorkspace();
  // Waits for its streams, then frees everything. Every CUDA error is reported on stderr.
  ~DeviceRingWorkspace();
  DeviceRingWorkspace(const DeviceRingWorkspace&) = delete;
  DeviceRingWorkspace& operator=(const DeviceRingWorkspace&) = delete;

  // Null until the first call.
  cudaStream_t compute_stream() const;
  cudaStream_t comm_stream() const;
  // Device memory held, in bytes.
  size_t bytes_reserved() const;

  struct State;  // the executor's (device_ring.cu)
  State& state() { return *state_; }

 private:
  std::unique_ptr<State> state_;
};

// Runs the forward ring on this rank. `t` holds device pointers (rows in the plan's local
// order); `backend` is a device backend ("cuda", "cuda_reference", "cudnn"), every call of it
// made with the workspace's compute stream as its ExecutionContext. Every rank of `comm` must
// call it with the same plan, options and sizes. Q, K and V must be ready on the device when it
// is called (e.g. the stream that wrote them synchronized); out and lse are ready when it
// returns OK (timeout comm.timeout()). Timings from CUDA events, per step: compute =
// start..kernels_done, comm wait = max(0, kernels_done..comm_done), the time the compute stream
// idled for the next block; device_seconds and launch_seconds as RingTimings says; total is
// host wall time. On any failure the communicator is aborted (so peers fail rather than wait)
// and the workspace's streams are drained before returning, so the buffers may be freed at
// once.
absl::StatusOr<RingTimings> RingFlashAttnForwardDevice(
    DeviceCommunicator& comm, AttentionBackend& backend, const ShardPlan& plan,
    const RingShardTensors& t, const RingAttentionOptions& options, DeviceRingWorkspace* ws);

// Runs the backward ring on this rank, as the forward: `backend` a device backend with a
// backward ("cuda", "cudnn"); q, k, v, out, lse and dout ready when called, dq, dk and dv
// (t.grad_dtype) when it returns OK. Timings per step: compute = start..kernels_done +
// comm_waited..step_done (the add), comm wait = kernels_done..comm_waited; the last step's
// comm wait includes the return hop (step_done..return_waited); total is host wall time.
// Failures as the forward's.
absl::StatusOr<RingTimings> RingFlashAttnBackwardDevice(
    DeviceCommunicator& comm, AttentionBackend& backend, const ShardPlan& plan,
    const RingBackwardTensors& t, const RingAttentionOptions& options, DeviceRingWorkspace* ws);

}  // namespace ringattn
