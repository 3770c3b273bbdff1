// Ring flash attention backward on GPUs: the device twin of the host ring backward
// (ring_backward.h), with exactly its schedule (drawn there) and its fixed-order sums
// (ring_backward_step.h holds what they share), and the structure of the device forward
// (device_ring.h): a compute and a comm stream owned by a workspace, CUDA events, the host
// never waiting inside the loop.
//
// Rank r of W, step s (the K/V block of rank src = r - s in hand). The dK/dV accumulators
// alternate between two buffers, mine[s % 2]; a third, `recv`, receives:
//
//   comm stream:    wait step_done[s-1] | Enqueue(K, V in hand -> r+1 (s < W-1);
//                   mine[(s-1) % 2] -> r+1 (s >= 1: the block finished at step s-1);
//                   K, V <- r-1 into slot[s % 2] (s < W-1); recv <- r-1 (s >= 1: the block
//                   computed now, holding ranks src .. r-1)) | record comm_done[s]
//   compute stream: record start[s] | zero mine[s % 2] | backward calls (query segment x key
//                   segment) into dq_acc and mine[s % 2] | record kernels_done[s] |
//                   wait comm_done[s] | record comm_waited[s] | mine[s % 2] += recv (s >= 1) |
//                   record step_done[s]
//
// The host enqueues each step's kernels (up to kernels_done[s]) before its transfers, so that
// NCCL's host-side group launch overlaps them. Where step 0 is one call over both whole shards
// (BackwardStepWrites: every layout with the cuda kernels) it writes dq and mine[0] instead of
// adding, and neither is zeroed first.
//
// Why the comm stream waits for step_done[s-1], once, before the whole batch: (a) the slot it
// receives K/V into was in hand at step s-1 (read by that step's kernels); (b) the accumulator
// it sends, mine[(s-1) % 2], is finished only after step s-1's add; (c) `recv`, which it
// receives into, is read by step s-1's add. All three are before step_done[s-1]. The compute
// stream's wait on comm_done[s] at step s puts the next K/V block in hand and the received
// accumulator in `recv` (for the add), and it also covers mine[s % 2]'s reuse at step s+1:
// that buffer was sent at step s. After step W-1, the return hop (comm stream, after
// step_done[W-1]) sends mine[(W-1) % 2], the complete accumulator of block r+1, to its owner
// and receives this rank's own from r-1; the compute stream waits for it and rounds the fp32
// gradients once into the caller's dtype (with fp32 gradients the dq accumulator is the
// caller's dq and the return hop lands in the caller's dk and dv: no copy).
//
// With one rank whose shard is one run of positions (every layout with one rank) the driver
// makes a single backward call (after D = rowsum(dO * O)) that writes the gradients, fp32,
// straight into the caller's buffers, or into the workspace and then rounded.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/attention_backward_params.h"
#include "ring/layout.h"
#include "ring/ring_backward_step.h"  // RingBackwardTensors
#include "ring/ring_step.h"           // RingAttentionOptions, RingTimings
#include "ring/transport/device_communicator.h"

namespace ringattn {

// What the device backward keeps between calls on one rank: its streams, K/V receive slots,
// the fp32 dq accumulator and D, three dK/dV accumulators, the device copy of the ALiBi slopes
// and the events. Buffers grow when a call needs more and are reused otherwise, so the steady
// state allocates nothing per call and nothing per step. One workspace serves one rank and one
// call at a time, on the device that was current when it was first used (a call on another
// device is FailedPrecondition).
class DeviceRingBackwardWorkspace {
 public:
  DeviceRingBackwardWorkspace() = default;
  // Waits for its streams, then frees everything. Every CUDA error is reported on stderr.
  ~DeviceRingBackwardWorkspace();
  DeviceRingBackwardWorkspace(const DeviceRingBackwardWorkspace&) = delete;
  DeviceRingBackwardWorkspace& operator=(const DeviceRingBackwardWorkspace&) = delete;

  // Null until the first call.
  cudaStream_t compute_stream() const { return compute_stream_; }
  cudaStream_t comm_stream() const { return comm_stream_; }
  // Device memory held, in bytes.
  size_t bytes_reserved() const;

  // Sizes one call needs. Internal to the driver, public for the tests.
  struct Needs {
    size_t slot_bytes = 0;   // one K/V receive slot: K then V of the largest shard
    size_t dq_elems = 0;     // fp32 dq accumulator [batch, rows, heads, head_dim]
    size_t delta_elems = 0;  // D [batch, heads, rows]
    size_t dkv_elems = 0;    // one dK/dV accumulator: [2][batch, max rows, heads_k, head_dim]
    int dkv_buffers = 0;     // how many of them: 1 (one rank) or 3 (mine x2, recv)
    int steps = 0;           // events per kind
  };
  // Creates the streams and events and grows the buffers to `needs`, on the current device.
  absl::Status Reserve(const Needs& needs);
  // Uploads `slopes` ([heads], host) unless the device copy holds them already (the copy is
  // ordered on the compute stream) and returns the device pointer, or null for none.
  absl::StatusOr<const float*> AlibiSlopes(const std::vector<float>& slopes);

  std::byte* slot(int i) const { return slots_ + static_cast<size_t>(i) * slot_bytes_; }  // 0, 1
  float* dq_acc() const { return dq_acc_; }
  float* delta() const { return delta_; }
  // i: 0 and 1 the alternating accumulators, 2 the receive buffer.
  float* dkv(int i) const { return dkv_ + static_cast<size_t>(i) * dkv_stride_; }

  cudaEvent_t start_event(int step) const { return start_[step]; }
  cudaEvent_t kernels_done_event(int step) const { return kernels_done_[step]; }
  cudaEvent_t comm_done_event(int step) const { return comm_done_[step]; }
  cudaEvent_t comm_waited_event(int step) const { return comm_waited_[step]; }
  cudaEvent_t step_done_event(int step) const { return step_done_[step]; }
  cudaEvent_t return_done_event() const { return return_done_; }
  cudaEvent_t return_waited_event() const { return return_waited_; }

 private:
  int device_ = -1;
  cudaStream_t compute_stream_ = nullptr;
  cudaStream_t comm_stream_ = nullptr;
  // Two receive slots, each [2][batch, max_rows, heads_k, head_dim] (K then V), in one block.
  std::byte* slots_ = nullptr;
  size_t slot_bytes_ = 0;
  float* dq_acc_ = nullptr;  // [batch, rows, heads, head_dim]
  size_t dq_capacity_ = 0;
  float* delta_ = nullptr;  // [batch, heads, rows]
  size_t delta_capacity_ = 0;
  // dkv_buffers_ accumulators of dkv_stride_ floats each, in one block.
  float* dkv_ = nullptr;
  size_t dkv_stride_ = 0;
  int dkv_buffers_ = 0;
  float* alibi_ = nullptr;  // [heads]
  size_t alibi_capacity_ = 0;
  std::vector<float> alibi_host_;  // what alibi_ holds
  // Per step; timing enabled (the driver reads elapsed times between them).
  std::vector<cudaEvent_t> start_, kernels_done_, comm_done_, comm_waited_, step_done_;
  cudaEvent_t return_done_ = nullptr;    // comm stream, after the return hop
  cudaEvent_t return_waited_ = nullptr;  // compute stream, once the return hop has landed
};

// Runs the backward ring on this rank. `t` holds device pointers (rows in the plan's local
// order); `backend` must be a CudaBackwardBackend ("cuda", "cudnn"; its stream is set to the
// workspace's compute stream for the call and restored afterwards). Every rank of `comm` must
// call it with the same plan, options and sizes as its forward. q, k, v, out, lse and dout
// must be ready on the device when it is called; dq, dk and dv (t.grad_dtype) are ready when
// it returns OK: it waits for its streams through comm.WaitStream (timeout comm.timeout()).
// Timings from CUDA events, per step: compute = start..kernels_done + comm_waited..step_done
// (the add), comm wait = kernels_done..comm_waited (the time the compute stream idled for the
// transfers); the last step's comm wait includes the return hop (step_done..return_waited);
// total is host wall time. On any failure the communicator is aborted (so peers fail rather
// than wait) and the workspace's streams are drained before returning.
absl::StatusOr<RingTimings> RingFlashAttnBackwardDevice(DeviceCommunicator& comm,
                                                        AttentionBackwardBackend& backend,
                                                        const ShardPlan& plan,
                                                        const RingBackwardTensors& t,
                                                        const RingAttentionOptions& options,
                                                        DeviceRingBackwardWorkspace* ws);

// into[i] += from[i] for i < n, fp32, enqueued on `stream`; n == 0 enqueues nothing. The
// driver's accumulator add, exposed for the tests.           into, from: [n] fp32
absl::Status LaunchAddFloat(float* into, const float* from, int64_t n, cudaStream_t stream);

}  // namespace ringattn
