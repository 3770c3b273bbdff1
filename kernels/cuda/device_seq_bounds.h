// Packed sequences on the GPU: AttentionParams::seq_bounds lives in host memory, and the
// kernels read a device copy (seq_bounds_device). The backends make that copy per call in
// stream-ordered scratch and free it on the stream after the call's kernels.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"

namespace ringattn {

// Runs `run(with)`: `with` is `p` with seq_bounds_device pointing at a device copy of
// p.seq_bounds (num_seqs + 1 entries), or `p` itself when it has no seq_bounds. The host array
// may be freed once this returns (the copy is staged before cudaMemcpyAsync returns).
absl::Status WithDeviceSeqBounds(const AttentionParams& p, cudaStream_t stream,
                                 absl::FunctionRef<absl::Status(const AttentionParams& with)> run);

// The same for the backward (p.fwd's bounds).
absl::Status WithDeviceSeqBounds(
    const AttentionBackwardParams& p, cudaStream_t stream,
    absl::FunctionRef<absl::Status(const AttentionBackwardParams& with)> run);

// InternalError when `p` has seq_bounds but no device copy: a launch that would ignore the
// sequences (the kernels' entry points check it).
absl::Status CheckDeviceSeqBounds(const AttentionParams& p);

}  // namespace ringattn
