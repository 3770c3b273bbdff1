// Runs the ring over a whole sequence with every rank a thread of this process (in-process
// transport): shards the inputs by the layout, runs every rank, and writes the whole output
// back in sequence order. What the tests and the comparison framework use to put a ring of W
// ranks beside a single-device run.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/attention_backend.h"
#include "ring/host_ring.h"
#include "ring/layout.h"

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

using BackendFactory = std::function<absl::StatusOr<std::unique_ptr<AttentionBackend>>()>;

// Per-rank timings, [world]. Any rank's error is returned (the first by rank order).
absl::StatusOr<std::vector<RingTimings>> RunRingInProcess(
    const WholeAttention& whole, int world, Layout layout, const RingAttentionOptions& options,
    const BackendFactory& make_backend,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

}  // namespace ringattn
