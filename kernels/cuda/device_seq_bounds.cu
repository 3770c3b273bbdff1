// Device copies of packed-sequence bounds (see device_seq_bounds.h).
#include "kernels/cuda/device_seq_bounds.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "base/cuda_check.h"
#include "base/status_macros.h"

namespace ringattn {

absl::Status WithDeviceSeqBounds(const AttentionParams& p, cudaStream_t stream,
                                 absl::FunctionRef<absl::Status(const AttentionParams& with)> run) {
  if (p.seq_bounds == nullptr) return run(p);
  const size_t bytes = (static_cast<size_t>(p.num_seqs) + 1) * sizeof(int64_t);
  void* copy = nullptr;
  RA_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&copy, bytes, stream));
  const absl::Status status = [&]() -> absl::Status {
    RA_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(copy, p.seq_bounds, bytes, cudaMemcpyHostToDevice, stream));
    AttentionParams with = p;
    with.seq_bounds_device = static_cast<const int64_t*>(copy);
    return run(with);
  }();
  const cudaError_t freed = cudaFreeAsync(copy, stream);
  RA_RETURN_IF_ERROR(status);
  RA_CUDA_RETURN_IF_ERROR(freed);
  return absl::OkStatus();
}

absl::Status WithDeviceSeqBounds(
    const AttentionBackwardParams& p, cudaStream_t stream,
    absl::FunctionRef<absl::Status(const AttentionBackwardParams& with)> run) {
  return WithDeviceSeqBounds(p.fwd, stream, [&](const AttentionParams& fwd) {
    AttentionBackwardParams with = p;
    with.fwd = fwd;
    return run(with);
  });
}

absl::Status CheckDeviceSeqBounds(const AttentionParams& p) {
  if (p.seq_bounds != nullptr && p.seq_bounds_device == nullptr) {
    return absl::InternalError(
        "seq_bounds without its device copy (WithDeviceSeqBounds): the kernels would ignore "
        "the packed sequences");
  }
  return absl::OkStatus();
}

}  // namespace ringattn
