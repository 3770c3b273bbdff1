// What a worker computes with: a kernel backend and a transport, behind one interface so that
// the worker service does not care whether the ring runs on the CPU (Gloo TCP, host memory) or
// on a GPU (NCCL, device memory). An engine connects a ring; a connection runs the forward and
// the backward on this rank's shard, whose tensors arrive and leave in host memory (gRPC
// messages, staging) or, on GPU engines, in the device's own memory (AllocateShard), where the
// connection computes on them in place.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "base/shared_memory.h"
#include "kernels/attention_backend.h"
#include "ring/layout.h"
#include "ring/ring_step.h"
#include "worker/coordinator_store.h"

namespace ringattn {

// One formed ring, from this rank's side.
class RingConnection {
 public:
  virtual ~RingConnection() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // Runs the forward ring; `t` holds host pointers. Every rank calls it with the same plan.
  virtual absl::StatusOr<RingTimings> Forward(const ShardPlan& plan, const RingShardTensors& t,
                                              const RingAttentionOptions& options) = 0;
  // Runs the backward ring (host_ring.h); `t` holds host pointers, gradients in t.grad_dtype.
  // Every rank calls it with the same plan and the same options as its forward. UNIMPLEMENTED
  // where the engine has no backward (the default).
  virtual absl::StatusOr<RingTimings> Backward(const ShardPlan& plan,
                                               const RingBackwardTensors& t,
                                               const RingAttentionOptions& options);
  // Fails the ring (a call in flight, and peers waiting on this rank, fail promptly).
  // Thread-safe and idempotent.
  virtual void Abort(const absl::Status& reason) = 0;
};

class RingEngine {
 public:
  virtual ~RingEngine() = default;
  // The kernel backend's name (cpu, cuda, cudnn, ...).
  virtual std::string backend_name() const = 0;
  // "cpu" or the GPU's name.
  virtual std::string device_name() const = 0;
  // "gloo" or "nccl".
  virtual std::string transport() const = 0;
  // Host memory of `bytes` that this engine's connections copy to and from at their best speed:
  // page-locked on GPU engines (cudaMallocHost), plain on the host engine (the default).
  virtual absl::StatusOr<std::shared_ptr<char>> AllocateHost(size_t bytes);
  // Memory for a shard tensor that this engine's connections compute on where it lies (no copy
  // in Forward/Backward): device memory on GPU engines, AllocateHost on the host engine.
  virtual absl::StatusOr<std::shared_ptr<char>> AllocateShard(size_t bytes);
  // Makes `mapping` (a client's shared memory) a source and target of CopyShard: GPU engines
  // register its pages with the device once per mapping (true); false where the engine cannot
  // (then stage through AllocateHost with ParallelCopy). The host engine: true, nothing done.
  virtual absl::StatusOr<bool> PinHost(SharedMemoryMapping& mapping);
  // Runs `spans`, copies between pinned host memory (PinHost) and memory from AllocateShard, at
  // this engine's best speed; FAILED_PRECONDITION naming `what` when shared memory shrank under
  // a host-side copy. Thread-safe.
  virtual absl::Status CopyShard(const std::vector<CopySpan>& spans, absl::string_view what);
  // A client's GPU allocation exported by CUDA IPC (`handle`: cudaIpcMemHandle_t bytes), opened
  // on this engine's device once per handle and kept open while cached or held; `bytes` from
  // its start must lie in it (INVALID_ARGUMENT otherwise, or for a handle that does not open).
  // FAILED_PRECONDITION on the host engine, which has no GPU.
  virtual absl::StatusOr<std::shared_ptr<char>> OpenCudaShared(const std::string& handle,
                                                               int64_t bytes);
  // GPU engines: the device's memory now (cudaMemGetInfo: every process's use of it); nullopt
  // on the host engine (the default) or when the query fails.
  struct DeviceMemory {
    int64_t used_bytes = 0;
    int64_t total_bytes = 0;
  };
  virtual std::optional<DeviceMemory> DeviceMemoryNow() const { return std::nullopt; }
  // Joins ring `rank` of `world` through `store` (keys already confined to this ring).
  virtual absl::StatusOr<std::unique_ptr<RingConnection>> Connect(
      int rank, int world, std::shared_ptr<CoordinatorStore> store,
      std::chrono::milliseconds timeout) = 0;
};

struct RingEngineOptions {
  // auto (a GPU when there is one: cuda, else cpu) or a registered backend
  // (backend_registry.h): cpu, cpu_reference, and in a build with them cuda, cuda_reference,
  // cudnn. Host backends run on the host engine, device ones on the device engine.
  std::string kernel = "auto";
  int device = 0;  // GPU index (taken modulo the number of GPUs)
  std::string gloo_hostname = "127.0.0.1";
  std::string gloo_interface;
};

// InvalidArgument for a kernel this build does not register (naming those it does);
// Unavailable for a GPU kernel without a GPU (or in a build without the NCCL device ring).
absl::StatusOr<std::unique_ptr<RingEngine>> MakeRingEngine(const RingEngineOptions& options);

}  // namespace ringattn
