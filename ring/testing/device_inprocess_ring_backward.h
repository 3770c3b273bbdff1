// The device ring backward with every rank a thread of this process on the current GPU, over
// the in-process device transport: the backward twin of device_inprocess_ring.h (and the
// device twin of inprocess_ring_backward.h). What the GPU tests use to run a backward ring of
// W ranks on one card.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/attention_backward_params.h"
#include "ring/device_ring_backward.h"
#include "ring/layout.h"
#include "ring/ring_step.h"
#include "ring/testing/inprocess_ring_backward.h"  // WholeAttentionBackward, BackwardBackendFactory
#include "ring/transport/device_communicator.h"

namespace ringattn {

// A backward ring of `world` ranks on the device current at Create, kept across calls: per
// rank a backward backend (made by the factory in the rank's thread at its first Run), a
// DeviceRingBackwardWorkspace and a communicator of one InProcessDeviceGroup (made again after
// a failed Run). Repeated Runs of one size allocate nothing on the device. One Run at a time.
class DeviceInProcessRingBackward {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceInProcessRingBackward>> Create(
      int world, BackwardBackendFactory make_backend,
      std::chrono::milliseconds timeout = std::chrono::seconds(60));

  // Runs every rank in its own thread on shards[r] (device pointers, rows in `plan`'s local
  // order; inputs ready on the device) and returns per-rank timings, [world]. Any rank's error
  // is returned (the first by rank order); one failing rank releases the others at once.
  absl::StatusOr<std::vector<RingTimings>> Run(const ShardPlan& plan,
                                               absl::Span<const RingBackwardTensors> shards,
                                               const RingAttentionOptions& options);

  int world() const { return world_; }
  // Device memory held by the ranks' workspaces, in bytes.
  size_t workspace_bytes() const;

  ~DeviceInProcessRingBackward();
  DeviceInProcessRingBackward(const DeviceInProcessRingBackward&) = delete;
  DeviceInProcessRingBackward& operator=(const DeviceInProcessRingBackward&) = delete;

 private:
  DeviceInProcessRingBackward(int world, BackwardBackendFactory make_backend,
                              std::chrono::milliseconds timeout, int device);

  const int world_;
  const BackwardBackendFactory make_backend_;
  const std::chrono::milliseconds timeout_;
  const int device_;
  std::vector<std::unique_ptr<AttentionBackwardBackend>> backends_;       // [world], made lazily
  std::vector<std::unique_ptr<DeviceRingBackwardWorkspace>> workspaces_;  // [world]
  std::vector<std::unique_ptr<DeviceCommunicator>> comms_;                // [world]
};

// Runs the device ring backward over a whole problem in HOST memory: shards the inputs, the
// forward's out and lse and dout by the layout (ExtractShard), copies each rank's shard to the
// current GPU, runs the ranks as threads, copies the gradients back and writes them into
// whole.dq / dk / dv in sequence order (InsertShard). The gradients are poisoned with NaN on
// the device first, so an element the ring fails to write shows. Returns per-rank timings,
// [world]; any rank's error is returned (the first by rank order).
absl::StatusOr<std::vector<RingTimings>> RunDeviceRingBackwardInProcess(
    const WholeAttentionBackward& whole, int world, Layout layout,
    const RingAttentionOptions& options, const BackwardBackendFactory& make_backend,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

}  // namespace ringattn
