// The GPU engine: a device kernel backend (cuda, cuda_reference, cudnn) over an NCCL ring.
// Rank 0 makes the NCCL unique id and publishes it through the coordinator's store; every rank
// joins on its GPU. Shards arrive in host memory (from gRPC) and are copied to the device and
// back around the ring forward and backward (device_ring.h; kernels cuda and cudnn,
// cuda_reference has no backward); device buffers and the ring workspaces are kept between calls.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "worker/ring_engine.h"

namespace ringattn {

// The engine of a device `backend` (options.kernel its name) on GPU options.device; Unavailable
// when there is no GPU.
absl::StatusOr<std::unique_ptr<RingEngine>> MakeDeviceRingEngine(
    std::unique_ptr<AttentionBackend> backend, const RingEngineOptions& options);

// Number of CUDA devices; 0 when there is no driver or no device.
int CudaDeviceCount();

}  // namespace ringattn
