// The device ring with every rank a thread of this process on the current GPU, over the
// in-process device transport: the device twin of inprocess_ring.h. What the GPU tests and the
// ring benchmark use to put a ring of W ranks beside a single kernel call on one card.
//
// W ranks on one GPU share its SMs, so a W-rank ring here measures the ring's overheads and
// its overlap (the kernels of all ranks run concurrently), not W GPUs' worth of throughput.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "ring/device_ring.h"
#include "ring/layout.h"
#include "ring/ring_step.h"
#include "ring/testing/inprocess_ranks.h"  // WholeAttention, BackendFactory
#include "ring/transport/device_communicator.h"

namespace ringattn {

// A ring of `world` ranks on the device current at Create, kept across calls: per rank a
// backend (made by the factory in the rank's thread at its first Run), a DeviceRingWorkspace
// and a communicator of one InProcessDeviceGroup (made again after a failed Run). Repeated Runs
// of one size allocate nothing on the device. One Run at a time.
class DeviceInProcessRing {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceInProcessRing>> Create(
      int world, BackendFactory make_backend,
      std::chrono::milliseconds timeout = std::chrono::seconds(60));

  // Runs every rank in its own thread on shards[r] (device pointers, rows in `plan`'s local
  // order; inputs ready on the device) and returns per-rank timings, [world]. Any rank's error
  // is returned (the first by rank order); one failing rank releases the others at once.
  absl::StatusOr<std::vector<RingTimings>> Run(const ShardPlan& plan,
                                               absl::Span<const RingShardTensors> shards,
                                               const RingAttentionOptions& options);

  int world() const { return world_; }
  // Device memory held by the ranks' workspaces, in bytes.
  size_t workspace_bytes() const;

  ~DeviceInProcessRing();
  DeviceInProcessRing(const DeviceInProcessRing&) = delete;
  DeviceInProcessRing& operator=(const DeviceInProcessRing&) = delete;

 private:
  DeviceInProcessRing(int world, BackendFactory make_backend, std::chrono::milliseconds timeout,
                      int device);
  absl::Status EnsureGroup();

  const int world_;
  const BackendFactory make_backend_;
  const std::chrono::milliseconds timeout_;
  const int device_;
  std::vector<std::unique_ptr<AttentionBackend>> backends_;       // [world], made lazily
  std::vector<std::unique_ptr<DeviceRingWorkspace>> workspaces_;  // [world]
  std::vector<std::unique_ptr<DeviceCommunicator>> comms_;        // [world]
};

// Runs the device ring over a whole problem in HOST memory: shards the inputs by the layout
// (ExtractShard), copies each rank's shard to the current GPU, runs the ranks as threads, copies
// the outputs back and writes them into whole.out / whole.lse in sequence order (InsertShard).
// Outputs are poisoned with NaN on the device first, so a row the ring fails to write shows.
// Returns per-rank timings, [world]; any rank's error is returned (the first by rank order).
absl::StatusOr<std::vector<RingTimings>> RunDeviceRingInProcess(
    const WholeAttention& whole, int world, Layout layout, const RingAttentionOptions& options,
    const BackendFactory& make_backend,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

namespace device_ring_internal {

// What the in-process device rings (forward and backward) share.

// Keeps *comms when it holds `world` healthy communicators of one InProcessDeviceGroup, makes a
// new group otherwise (a group that failed stays aborted; a healthy one is reused, its per-pair
// order intact, as every successful run matched every transfer it posted).
absl::Status EnsureHealthyGroup(int world, std::chrono::milliseconds timeout,
                                std::vector<std::unique_ptr<DeviceCommunicator>>* comms);

// One rank's part of a run, in the rank's own thread.
using RankRun = std::function<absl::StatusOr<RingTimings>(int rank, DeviceCommunicator& comm)>;

// Runs run_rank(r, *comms[r]) for every rank in its own thread with `device` current, and
// returns per-rank timings, [world]. A rank that fails aborts the group, so the others are
// released at once; the first error by rank order is returned.
absl::StatusOr<std::vector<RingTimings>> RunRanksInThreads(
    int device, absl::Span<const std::unique_ptr<DeviceCommunicator>> comms,
    const RankRun& run_rank);

}  // namespace device_ring_internal
}  // namespace ringattn
