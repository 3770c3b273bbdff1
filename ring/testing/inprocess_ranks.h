// Rings of W ranks as threads of this process over an in-process group: what the tests, the
// comparison framework and the benchmarks use to put a ring beside a single call.
//
// RunRanksInThreads is the core: every rank runs a given function with its communicator in a
// thread of its own, and one failing rank releases the others. On it:
//  - RunRingInProcess / RunRingBackwardInProcess: a whole problem in host memory, sharded by
//    the layout, through the host forward or backward driver over an InProcessGroup; the
//    outputs are written back in sequence order.
//  - In CUDA builds, DeviceInProcessRing / DeviceInProcessRingBackward: the device drivers over
//    an InProcessDeviceGroup on the current GPU, kept across calls; and RunDeviceRingInProcess /
//    RunDeviceRingBackwardInProcess, their whole-problem runs (shards uploaded, outputs
//    poisoned with NaN so that a row the ring fails to write shows, then downloaded). W ranks on
//    one GPU share its SMs: such a ring measures the ring's overheads and its overlap, not W
//    GPUs' worth of throughput.
// Every run returns per-rank timings, [world], or the first error by rank order.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_backward_params.h"
#include "kernels/dtype.h"
#include "ring/host_ring.h"
#include "ring/layout.h"
#include "ring/ring_step.h"
#include "ring/transport/communicator.h"
#include "ringattn_config.h"

namespace ringattn {

// A whole-sequence problem in host memory, every tensor contiguous.
struct WholeAttention {
  DType dtype = DType::kF32;
  int batch = 0;
  int64_t seqlen = 0;
  int heads = 0;
  int heads_k = 0;
  int head_dim = 0;
  const void* q = nullptr;  // [batch, seqlen, heads, head_dim]
  const void* k = nullptr;  // [batch, seqlen, heads_k, head_dim]
  const void* v = nullptr;  // [batch, seqlen, heads_k, head_dim]
  void* out = nullptr;      // [batch, seqlen, heads, head_dim]
  float* lse = nullptr;     // [batch, heads, seqlen], or null
};

// A whole-sequence backward problem in host memory, every tensor contiguous.
struct WholeAttentionBackward {
  DType dtype = DType::kF32;       // q, k, v, out, dout
  DType grad_dtype = DType::kF32;  // dq, dk, dv: dtype or fp32
  int batch = 0;
  int64_t seqlen = 0;
  int heads = 0;
  int heads_k = 0;
  int head_dim = 0;
  const void* q = nullptr;     // [batch, seqlen, heads, head_dim]
  const void* k = nullptr;     // [batch, seqlen, heads_k, head_dim]
  const void* v = nullptr;     // [batch, seqlen, heads_k, head_dim]
  const void* out = nullptr;   // [batch, seqlen, heads, head_dim]: the forward's output
  const float* lse = nullptr;  // [batch, heads, seqlen]: the forward's LSE
  const void* dout = nullptr;  // [batch, seqlen, heads, head_dim]
  void* dq = nullptr;          // [batch, seqlen, heads, head_dim], grad_dtype
  void* dk = nullptr;          // [batch, seqlen, heads_k, head_dim], grad_dtype
  void* dv = nullptr;          // [batch, seqlen, heads_k, head_dim], grad_dtype
};

// Each rank's backend is made by the factory in the rank's own thread.
using BackendFactory = std::function<absl::StatusOr<std::unique_ptr<AttentionBackend>>()>;

// Runs run_rank(r, *comms[r]) for every rank r in a thread of its own and returns the timings,
// [world]. A rank whose run fails aborts its communicator, so that peers waiting on it are
// released at once (the ring drivers abort on their own failures; this covers a rank that
// failed before its driver ran, e.g. its backend could not be made).
template <typename Comm>  // Communicator or DeviceCommunicator
absl::StatusOr<std::vector<RingTimings>> RunRanksInThreads(
    absl::Span<const std::unique_ptr<Comm>> comms,
    const std::function<absl::StatusOr<RingTimings>(int rank, Comm& comm)>& run_rank) {
  const int world = static_cast<int>(comms.size());
  std::vector<absl::StatusOr<RingTimings>> results(world, absl::UnknownError("rank did not run"));
  std::vector<std::thread> threads;
  threads.reserve(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      results[r] = run_rank(r, *comms[r]);
      if (!results[r].ok()) comms[r]->Abort(results[r].status());  // idempotent
    });
  }
  for (std::thread& t : threads) t.join();
  std::vector<RingTimings> timings;
  timings.reserve(world);
  for (int r = 0; r < world; ++r) {
    if (!results[r].ok()) return results[r].status();
    timings.push_back(*std::move(results[r]));
  }
  return timings;
}

absl::StatusOr<std::vector<RingTimings>> RunRingInProcess(
    const WholeAttention& whole, int world, Layout layout, const RingAttentionOptions& options,
    const BackendFactory& make_backend,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

// The forward's out and lse and dO are sharded like the inputs; dq, dk, dv come back.
absl::StatusOr<std::vector<RingTimings>> RunRingBackwardInProcess(
    const WholeAttentionBackward& whole, int world, Layout layout,
    const RingAttentionOptions& options, const BackendFactory& make_backend,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

namespace inprocess_internal {

// One tensor of a whole problem, [outer, seqlen, row_bytes] in sequence order, as the
// whole-problem runs shard it: an input is split into the ranks' shards before the run, an
// output's shards are gathered into it after (where wanted).
struct WholeTensor {
  const void* in = nullptr;  // an input; null for an output
  void* out = nullptr;       // an output wanted back; null for an input or an unwanted output
  int64_t outer = 0;
  size_t row_bytes = 0;
};

// The tensors of either pass, in this order: the forward's q, k, v in, out and lse out; the
// backward's q, k, v, out, dout, lse in, dq, dk, dv out. And its shard view over one rank's
// buffers of them (host or device pointers), in the same order; the forward's lse only where
// the whole problem wants it.
std::vector<WholeTensor> TensorsOf(const WholeAttention& w);
std::vector<WholeTensor> TensorsOf(const WholeAttentionBackward& w);
RingShardTensors ShardOf(const WholeAttention& w, absl::Span<void* const> buffers);
RingBackwardTensors ShardOf(const WholeAttentionBackward& w, absl::Span<void* const> buffers);

}  // namespace inprocess_internal

#if RINGATTN_HAVE_CUDA
class DeviceCommunicator;   // ring/transport/device_communicator.h
class DeviceRingWorkspace;  // ring/device_ring.h: both directions

// What the forward and the backward device rings differ in: their shard tensors (the driver
// each calls is picked by them in inprocess_ranks_device.cc).
struct DeviceForwardPass {
  using Tensors = RingShardTensors;
};
struct DeviceBackwardPass {
  using Tensors = RingBackwardTensors;
};

// A ring of `world` ranks on the device current at Create, kept across calls: per rank a
// backend (made by the factory in the rank's thread at its first Run), a workspace and a
// communicator of one InProcessDeviceGroup (made again after a failed Run). Repeated Runs of
// one size allocate nothing on the device. One Run at a time.
template <typename Pass>
class BasicDeviceInProcessRing {
 public:
  static absl::StatusOr<std::unique_ptr<BasicDeviceInProcessRing>> Create(
      int world, BackendFactory make_backend,
      std::chrono::milliseconds timeout = std::chrono::seconds(60));

  // Runs every rank in its own thread on shards[r] (device pointers, rows in `plan`'s local
  // order; inputs ready on the device). One failing rank releases the others at once.
  absl::StatusOr<std::vector<RingTimings>> Run(const ShardPlan& plan,
                                               absl::Span<const typename Pass::Tensors> shards,
                                               const RingAttentionOptions& options);

  int world() const { return world_; }
  // Device memory held by the ranks' workspaces, in bytes.
  size_t workspace_bytes() const;

  ~BasicDeviceInProcessRing();
  BasicDeviceInProcessRing(const BasicDeviceInProcessRing&) = delete;
  BasicDeviceInProcessRing& operator=(const BasicDeviceInProcessRing&) = delete;

 private:
  BasicDeviceInProcessRing(int world, BackendFactory make_backend,
                           std::chrono::milliseconds timeout, int device);

  const int world_;
  const BackendFactory make_backend_;
  const std::chrono::milliseconds timeout_;
  const int device_;
  std::vector<std::unique_ptr<AttentionBackend>> backends_;       // [world], made lazily
  std::vector<std::unique_ptr<DeviceRingWorkspace>> workspaces_;  // [world]
  std::vector<std::unique_ptr<DeviceCommunicator>> comms_;        // [world]
};

using DeviceInProcessRing = BasicDeviceInProcessRing<DeviceForwardPass>;
using DeviceInProcessRingBackward = BasicDeviceInProcessRing<DeviceBackwardPass>;
extern template class BasicDeviceInProcessRing<DeviceForwardPass>;
extern template class BasicDeviceInProcessRing<DeviceBackwardPass>;

// The whole-problem runs of the device rings, on the current GPU.
absl::StatusOr<std::vector<RingTimings>> RunDeviceRingInProcess(
    const WholeAttention& whole, int world, Layout layout, const RingAttentionOptions& options,
    const BackendFactory& make_backend,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));
absl::StatusOr<std::vector<RingTimings>> RunDeviceRingBackwardInProcess(
    const WholeAttentionBackward& whole, int world, Layout layout,
    const RingAttentionOptions& options, const BackendFactory& make_backend,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));
#endif  // RINGATTN_HAVE_CUDA

}  // namespace ringattn
