// The one interface every attention kernel backend implements: the forward of one call and,
// where the backend has one, its backward, on the stream the caller passes. A backend owns
// whatever it caches between calls (cuDNN graphs and workspace, thread pools). Backends are
// made by name through the registry (backend_registry.h).
#pragma once

#include <atomic>
#include <string_view>

#include "absl/status/status.h"
#include "base/memory_space.h"
#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"

namespace ringattn {

// What a backend computes beyond a plain call. An option a backend does not claim, it refuses
// with InvalidArgument naming the option, never computes silently wrong (the conformance suite,
// backend_conformance_test.cc, checks both sides for every registered backend).
struct BackendCapabilities {
  // Backward and ComputeDelta; without it they return UNIMPLEMENTED naming the backend.
  bool backward = false;
  // Two runs of positions per call (AttentionParams::q_pos_split / k_pos_split): the ring then
  // computes a two-segment (zigzag) shard in one call instead of up to four.
  bool position_runs = false;
  // A read-only partial result merged before writing (AttentionParams::partial_o, forward).
  bool partial_input = false;
  // Packed variable-length sequences (AttentionParams::seq_bounds); the rings refuse them up
  // front, before any transfer, for a backend without.
  bool packed_sequences = false;
  // dropout_p > 0 (AttentionParams::dropout_p).
  bool dropout = false;
  // fp32 q, k and v (AttentionParams::dtype; every backend takes bf16 and fp16).
  bool fp32_inputs = false;
  // The precision fp32 inputs are computed at: kF32 when as they are, else the 16-bit type a
  // backend rounds them to for its kernels' operands (the forward's; the backward's).
  DType fp32_forward_operands = DType::kF32;
  DType fp32_backward_operands = DType::kF32;
  // Non-finite inputs and scores give what the fp64 reference's rule says
  // (reference_attention.h): NaN exactly in the rows that see them. Without it a NaN or an
  // infinity may also reach other rows of its tile or vanish (docs/security.md).
  bool non_finite_rule = false;
};

// Where one call runs. `stream` is a cudaStream_t passed opaquely, so that host code needs no
// CUDA headers; null is the legacy default stream. Host backends ignore it. `cancel`, when set,
// is polled by host backends between blocks of work: once it reads true the call stops and
// returns CANCELLED, its outputs partly written (the host ring passes its communicator's
// aborted(), so that a cancelled request does not finish its step). Device backends ignore it:
// their work is enqueued, not run, by the call.
struct ExecutionContext {
  void* stream = nullptr;
  const std::atomic<bool>* cancel = nullptr;
};

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;

  virtual std::string_view name() const = 0;
  // Where the tensors of a call live.
  virtual MemorySpace memory_space() const = 0;
  virtual BackendCapabilities capabilities() const { return {}; }

  // Validates `p` against what this backend supports, then computes it. Device backends enqueue
  // on ctx's stream (without a context: the legacy default stream) and return without
  // synchronising (launch errors are returned, errors while the kernel runs surface at the next
  // synchronising call). Every backend takes merge_into_output (fp32 o, non-null lse).
  absl::Status Forward(const AttentionParams& p, const ExecutionContext& ctx = {}) {
    return DoForward(p, ctx);
  }
  // The gradients of `p` (attention_backward_params.h), validated first, written or added
  // (p.accumulate) into its fp32 dq, dk and dv.
  absl::Status Backward(const AttentionBackwardParams& p, const ExecutionContext& ctx = {}) {
    return DoBackward(p, ctx);
  }
  // D = rowsum(dO * O) of p's query rows into `delta` (p.lse's strides, this backend's memory
  // space), so that a caller making several calls for the same rows computes it once. Reads
  // only out, dout and the sizes.
  absl::Status ComputeDelta(const AttentionBackwardParams& p, float* delta,
                            const ExecutionContext& ctx = {}) {
    return DoComputeDelta(p, delta, ctx);
  }

 protected:
  // What a backend implements. Those it does not override return UNIMPLEMENTED naming it.
  virtual absl::Status DoForward(const AttentionParams& p, const ExecutionContext& ctx);
  virtual absl::Status DoBackward(const AttentionBackwardParams& p, const ExecutionContext& ctx);
  virtual absl::Status DoComputeDelta(const AttentionBackwardParams& p, float* delta,
                                      const ExecutionContext& ctx);
};

}  // namespace ringattn
