// What the host ring backward (ring_backward.h) and the device ring backward
// (device_ring_backward.h) share: the shard tensors they take, their checks, the fp32 dK/dV
// accumulator of one K/V block and one ring step's backward calls. Both drivers run the same
// schedule (drawn in ring_backward.h); only where the bytes live and how a step waits differ,
// so everything that is neither lives here, once (as ring_step.h does for the forwards).
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/attention_backward_params.h"
#include "kernels/dtype.h"
#include "ring/layout.h"
#include "ring/ring_step.h"  // RingAttentionOptions, RingShardTensors, ShardGeometry

namespace ringattn {

// This rank's shard, rows in the plan's local order, all contiguous, in the memory the backend
// and the communicator expect (host for RingFlashAttnBackward, device for
// RingFlashAttnBackwardDevice).
struct RingBackwardTensors {
  DType dtype = DType::kBF16;      // q, k, v, out, dout
  DType grad_dtype = DType::kF32;  // dq, dk, dv: dtype or fp32
  int batch = 0;
  int heads = 0;
  int heads_k = 0;
  int head_dim = 0;
  const void* q = nullptr;     // [batch, rows, heads, head_dim]
  const void* k = nullptr;     // [batch, rows, heads_k, head_dim]
  const void* v = nullptr;     // [batch, rows, heads_k, head_dim]
  const void* out = nullptr;   // [batch, rows, heads, head_dim]: the ring forward's output
  const float* lse = nullptr;  // [batch, heads, rows]: the ring forward's LSE
  const void* dout = nullptr;  // [batch, rows, heads, head_dim]
  void* dq = nullptr;          // [batch, rows, heads, head_dim], grad_dtype
  void* dk = nullptr;          // [batch, rows, heads_k, head_dim], grad_dtype
  void* dv = nullptr;          // [batch, rows, heads_k, head_dim], grad_dtype
};

// Checks the options (as the forward does: dropout and return_attn_probs are refused with
// the forward's errors) and the tensors' sizes and grad_dtype.
absl::Status ValidateRingBackward(const RingAttentionOptions& options,
                                  const RingBackwardTensors& t);

// InvalidArgument unless every pointer of `t` is set, when `rank` holds rows > 0 (a rank with
// no rows has nothing to point at).
absl::Status CheckShardTensorsSet(const RingBackwardTensors& t, int rank, int64_t rows);

// The forward's view of the shard (q, k, v and sizes; no out/lse), for what ring_step.h
// shares with the forward: option checks, geometry, the segment pairs' params.
RingShardTensors ForwardView(const RingBackwardTensors& t);

// The fp32 dK/dV accumulator of one K/V block of `rows` rows: dk [batch, rows, heads_k,
// head_dim] followed by dv of the same shape, at the start of a buffer sized for the largest
// shard (host or device memory). Sent and received as one transfer of Bytes().
struct DkvBlock {
  float* dk = nullptr;
  float* dv = nullptr;
  size_t elems = 0;  // of each of dk and dv

  static DkvBlock At(float* buffer, int batch, int64_t rows, const ShardGeometry& g) {
    const size_t elems = static_cast<size_t>(batch) * rows * g.kv_row_elems;
    return {buffer, buffer == nullptr ? nullptr : buffer + elems, elems};
  }
  // Floats of one dK/dV accumulator of a shard of `rows` rows (dk and dv).
  static size_t Floats(int batch, int64_t rows, const ShardGeometry& g) {
    return 2 * static_cast<size_t>(batch) * rows * g.kv_row_elems;
  }
  size_t Bytes() const { return 2 * elems * sizeof(float); }
};

// The backward call for local query segment `qs` against key segment `ks` of the block in
// hand (whose shard has `k_rows` rows), adding into the fp32 dq accumulator [batch, q_rows,
// heads, head_dim] and the block's dK/dV accumulator. The forward's SegmentPairParams places
// q, k, v and the positions; its o and lse slots carry dq and delta, which have the shapes of
// the forward's o and lse accumulators. `alibi` in the backend's memory space.
AttentionBackwardParams SegmentPairBackwardParams(
    const RingBackwardTensors& t, const ShardGeometry& g, int64_t q_rows, const Segment& qs,
    const KvBlock& kv, int64_t k_rows, const Segment& ks, float* dq_acc, float* delta,
    const DkvBlock& dkv, const RingAttentionOptions& options, const float* alibi, float scale);

// D = rowsum(dout * out) of every local query row, by the backend (on its stream, for a
// device backend), into delta [batch, heads, rows]: once per rank rather than once per call.
absl::Status ComputeShardDelta(AttentionBackwardBackend& backend, const RingBackwardTensors& t,
                               int64_t rows, float* delta);

// Whether the step of `rank`'s queries against the block of `src` is one backward call over
// every local query row and every key row of the block, so that with accumulate off it
// writes all of dq and the block's dK/dV (zeros where nothing contributes): the first step
// then needs no zeroed accumulators (the drivers' first step, over the rank's own block).
bool BackwardStepWrites(const ShardPlan& plan, int rank, int src,
                        const AttentionBackwardBackend& backend);

// One step's backward calls (StepCalls: one per step where the backend takes two runs of
// positions, else per segment pair): this rank's queries against the block owned by
// `src` (`kv`), each call not wholly masked, adding into dq_acc
// and `dkv`. The caller zeroes `dkv` first (it holds this rank's contribution to the block
// only): the host with a fill, the device on its compute stream. With `write` (only where
// BackwardStepWrites), the one call is made with accumulate off, writing dq_acc and `dkv`
// whole, and neither needs zeroing. Adds the calls made to *kernel_calls.
absl::Status ComputeBackwardStep(AttentionBackwardBackend& backend, const ShardPlan& plan, int rank,
                                 int src, const RingBackwardTensors& t, const ShardGeometry& g,
                                 const KvBlock& kv, float* dq_acc, float* delta,
                                 const DkvBlock& dkv, const RingAttentionOptions& options,
                                 const float* alibi, float scale, bool write, int* kernel_calls);

}  // namespace ringattn
