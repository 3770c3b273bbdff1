// Runs the ring backward over a whole sequence with every rank a thread of this process
// (in-process transport): shards the inputs, the forward's results and dO by the layout, runs
// every rank, and writes the whole gradients back in sequence order. The backward twin of
// inprocess_ring.h, for the tests and the comparison framework.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention_backward_params.h"
#include "ring/layout.h"
#include "ring/ring_backward.h"

namespace ringattn {

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

using BackwardBackendFactory =
    std::function<absl::StatusOr<std::unique_ptr<AttentionBackwardBackend>>()>;

// Per-rank timings, [world]. Any rank's error is returned (the first by rank order).
absl::StatusOr<std::vector<RingTimings>> RunRingBackwardInProcess(
    const WholeAttentionBackward& whole, int world, Layout layout,
    const RingAttentionOptions& options, const BackwardBackendFactory& make_backend,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

}  // namespace ringattn
