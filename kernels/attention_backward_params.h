// The parameter struct of the attention backward (gradients of q, k and v): the forward's
// params and what the backward adds. Backends compute it through AttentionBackend::Backward
// (attention_backend.h).
//
// Given the forward's inputs, its output O and LSE, and dO (the gradient of a loss with
// respect to O), a backward call computes, in FlashAttention-2's notation per (batch, head):
//   P  = exp(S - lse)               the forward's probabilities, S the modded, masked scores
//   D  = rowsum(dO * O)             [seqlen_q]; `delta` below, when precomputed
//   dV = P^T dO                     summed over the query heads of each K/V head (GQA)
//   dP = dO V^T
//   dS = P * (dP - D)               the gradient of the scores
//   dX = dS * scale * (1 - tanh^2)  through softcap (the tanh of the forward); ALiBi and the
//                                   masks have no input gradient, masked pairs give 0
//   dQ = dX K,  dK = dX^T Q         (dK also summed over each K/V head's query heads)
// Everything the forward takes (positions, masks, score mods, GQA) comes in `fwd`, so that a
// ring step's backward call describes the same (query shard, key shard) pair as its forward.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/attention_params.h"

namespace ringattn {

struct AttentionBackwardParams {
  // The forward's inputs and options: q, k, v with their strides, sizes, dtype, score mods,
  // mask and positions. Not read: fwd.o, fwd.lse, their strides, fwd.o_dtype and
  // fwd.merge_into_output (the forward's results come in `out` and `lse` below).
  AttentionParams fwd;

  // ---- The forward's results and the incoming gradient --------------------------------------
  // May be null when `delta` is given (D is all the backward needs of the output).
  const void* out = nullptr;   // [batch, seqlen_q, heads, head_dim], element type out_dtype
  const void* dout = nullptr;  // [batch, seqlen_q, heads, head_dim], element type out_dtype
  DType out_dtype = DType::kF32;
  // The forward's natural-log LSE over *all* the keys the output was computed from (for a ring,
  // every rank's), -inf for a fully masked row. P = exp(S - lse) is then the true probability
  // even when this call sees only some of the keys.
  const float* lse = nullptr;  // [batch, heads, seqlen_q]
  // D = rowsum(dO * O) per query row, precomputed (a ring computes it once per shard, not once
  // per step), or null to have the kernel compute it. Same strides as lse.
  const float* delta = nullptr;  // [batch, heads, seqlen_q]

  // ---- Gradients, fp32 ------------------------------------------------------------------------
  float* dq = nullptr;  // [batch, seqlen_q, heads, head_dim]
  float* dk = nullptr;  // [batch, seqlen_k, heads_k, head_dim]
  float* dv = nullptr;  // [batch, seqlen_k, heads_k, head_dim]
  // false: overwrite dq, dk and dv (every element of each view is written, zeros where nothing
  // contributes). true: add this call's gradients to what they hold (a ring adds each step's
  // (queries, key block) contribution).
  bool accumulate = false;

  // Strides in elements; the head_dim axis is contiguous, the seqlen_q axis of lse/delta too.
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  int64_t dout_batch_stride = 0, dout_row_stride = 0, dout_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
};

// Checks the forward part as ValidateParams does and the backward's own tensors (their
// pointers; dtypes other than out_dtype are fixed): every error names the field.
absl::Status ValidateBackwardParams(const AttentionBackwardParams& p);

// Fills contiguous strides for every tensor of `p` (q/k/v in p->fwd as SetContiguousStrides,
// out/dout/dq [batch, seqlen_q, heads, head_dim], dk/dv [batch, seqlen_k, heads_k, head_dim],
// lse/delta [batch, heads, seqlen_q]) from the sizes in p->fwd.
void SetContiguousBackwardStrides(AttentionBackwardParams* p);

// Floating-point operations of one backward call as FlashAttention counts them: five
// products of the forward's size (S, dP, dV, dK, dQ) against the forward's two, so 2.5 times
// ForwardFlops (halved when causal with equal lengths).
double BackwardFlops(const AttentionBackwardParams& p);

}  // namespace ringattn
