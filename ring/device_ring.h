// Ring flash attention forward on GPUs: the device twin of the host driver (ring_attention.h),
// with the same algorithm and step order (ring_step.h holds what they share). Each rank holds
// one shard of Q, K and V in device memory; K/V blocks travel around the ring over a
// DeviceCommunicator while the block in hand is computed, and partial results merge by
// log-sum-exp into fp32 accumulators (in the kernel's epilogue), rounded once at the end.
// Where a step is one kernel call over every local row (PlanRingOutput: every layout with the
// cuda kernels), the first step writes the accumulators (no initialisation pass) and the last
// merges with them and writes the caller's output in its dtype (no rounding pass).
//
// Two streams per rank, owned by a DeviceRingWorkspace. Step s (block of rank r - s in hand),
// in the order the host enqueues it:
//
//   compute stream: record start[s] | kernels (query segment x key segment, merged) |
//                   record compute_done[s]
//   comm stream:    wait compute_done[s-1] | Enqueue(send in-hand -> r+1, recv <- r-1 into
//                   the free slot) | record comm_done[s]
//   compute stream: wait comm_done[s]
//
// The slot received into at step s was in hand at step s - 1, hence the comm stream's wait on
// compute_done[s-1]; the compute stream's wait on comm_done[s] puts the next block in hand.
// Step 0 computes and sends straight from the caller's K/V. The host never waits inside the
// loop; it waits once at the end, through the communicator's watchdog (WaitStream).
//
// With one rank the driver makes a single kernel call straight into the caller's output (its
// dtype, no accumulators, no conversion), so a one-rank ring costs what the kernel alone does.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention_backend.h"
#include "ring/layout.h"
#include "ring/ring_step.h"
#include "ring/transport/device_communicator.h"

namespace ringattn {

// What the device driver keeps between calls on one rank: its streams, receive slots, fp32
// accumulators, the device copy of the ALiBi slopes and the timing events. Buffers grow when a
// call needs more and are reused otherwise, so the steady state allocates nothing per call and
// nothing per step. One workspace serves one rank and one call at a time, on the device that
// was current when it was first used (a call on another device is FailedPrecondition).
class DeviceRingWorkspace {
 public:
  DeviceRingWorkspace() = default;
  // Waits for its streams, then frees everything. Every CUDA error is reported on stderr.
  ~DeviceRingWorkspace();
  DeviceRingWorkspace(const DeviceRingWorkspace&) = delete;
  DeviceRingWorkspace& operator=(const DeviceRingWorkspace&) = delete;

  // Null until the first call.
  cudaStream_t compute_stream() const { return compute_stream_; }
  cudaStream_t comm_stream() const { return comm_stream_; }
  // Device memory held, in bytes.
  size_t bytes_reserved() const;

  // Sizes one call needs. Internal to the driver, public for the tests.
  struct Needs {
    size_t slot_bytes = 0;  // one receive slot: K then V of the largest shard
    size_t o_elems = 0;     // fp32 accumulator o: [batch, rows, heads, head_dim]
    size_t lse_elems = 0;   // fp32 accumulator lse: [batch, heads, rows]
    int steps = 0;          // timing events per kind
  };
  // Creates the streams and events and grows the buffers to `needs`, on the current device.
  absl::Status Reserve(const Needs& needs);
  // Uploads `slopes` ([heads], host) unless the device copy holds them already (the copy is
  // ordered on the compute stream) and returns the device pointer, or null for none.
  absl::StatusOr<const float*> AlibiSlopes(const std::vector<float>& slopes);

  std::byte* slot(int i) const { return slots_ + static_cast<size_t>(i) * slot_bytes_; }  // i: 0, 1
  float* o_acc() const { return o_acc_; }
  float* lse_acc() const { return lse_acc_; }
  cudaEvent_t start_event(int step) const { return start_[step]; }
  cudaEvent_t compute_done_event(int step) const { return compute_done_[step]; }
  cudaEvent_t comm_done_event(int step) const { return comm_done_[step]; }
  // The call's first and last operation on the compute stream (RingTimings::device_seconds).
  cudaEvent_t begin_event() const { return begin_; }
  cudaEvent_t end_event() const { return end_; }

 private:
  int device_ = -1;
  cudaStream_t compute_stream_ = nullptr;
  cudaStream_t comm_stream_ = nullptr;
  // Two receive slots, each [2][batch, max_rows, heads_k, head_dim] (K then V), in one block.
  std::byte* slots_ = nullptr;
  size_t slot_bytes_ = 0;
  float* o_acc_ = nullptr;  // [batch, rows, heads, head_dim]
  size_t o_capacity_ = 0;
  float* lse_acc_ = nullptr;  // [batch, heads, rows]
  size_t lse_capacity_ = 0;
  float* alibi_ = nullptr;  // [heads]
  size_t alibi_capacity_ = 0;
  std::vector<float> alibi_host_;  // what alibi_ holds
  // Per step; timing enabled (the driver reads elapsed times between them).
  std::vector<cudaEvent_t> start_, compute_done_, comm_done_;
  cudaEvent_t begin_ = nullptr, end_ = nullptr;
};

// Runs the forward ring on this rank. `t` holds device pointers (rows in the plan's local
// order); `backend` must be a CudaBackend (its stream is set to the workspace's compute stream
// for the call and restored afterwards). Every rank of `comm` must call it with the same plan,
// options and sizes. Q, K and V must be ready on the device when it is called (e.g. the stream
// that wrote them synchronized); out and lse are ready when it returns OK: it waits for its
// streams through comm.WaitStream (timeout comm.timeout()). Timings come from CUDA events:
// per step, compute = start..compute_done and comm wait = max(0, compute_done..comm_done), the
// time the compute stream idled for the next block; total is host wall time of the call.
// On any failure the communicator is aborted (so peers fail rather than wait) and the
// workspace's streams are drained before returning, so the buffers may be freed at once.
absl::StatusOr<RingTimings> RingFlashAttnForwardDevice(
    DeviceCommunicator& comm, AttentionBackend& backend, const ShardPlan& plan,
    const RingShardTensors& t, const RingAttentionOptions& options, DeviceRingWorkspace* ws);

// The small kernels of the driver, exposed for the tests. Each enqueues on `stream` and
// returns launch errors; n == 0 enqueues nothing.
// x[i] = value for i < n.                                          x: [n] fp32
absl::Status LaunchFillFloat(float* x, int64_t n, float value, cudaStream_t stream);
// dst[i] = src[i] rounded to `dtype` (round to nearest even, as StoreFromFloat on the host).
absl::Status LaunchConvertFromFloat(const float* src, void* dst, DType dtype, int64_t n,
                                    cudaStream_t stream);  // src: [n] fp32, dst: [n] dtype

}  // namespace ringattn
