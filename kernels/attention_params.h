// The one parameter struct every attention backend (cpu, cuda, cudnn) takes.
//
// The host fills it once per call; kernels see nothing else. Tensors are raw pointers with
// 64-bit strides counted in elements, so a backend can read a shard, a view into a packed
// buffer or a whole sequence alike. Positions are explicit: a ring step computes the queries
// of one shard against the keys of another, and the mask needs their global positions.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace ringattn {

inline constexpr int64_t kUnboundedWindow = -1;

// AttentionParams::q_pos_split / k_pos_split when the positions are one run.
inline constexpr int64_t kNoPosSplit = int64_t{1} << 62;

struct AttentionParams {
  // ---- Tensors -------------------------------------------------------------------------------
  const void* q = nullptr;  // [batch, seqlen_q, heads, head_dim], element type `dtype`
  const void* k = nullptr;  // [batch, seqlen_k, heads_k, head_dim], element type `dtype`
  const void* v = nullptr;  // [batch, seqlen_k, heads_k, head_dim], element type `dtype`
  void* o = nullptr;        // [batch, seqlen_q, heads, head_dim], element type `o_dtype`
  // Natural-log log-sum-exp of the scaled, masked scores of each query row. -inf for a row
  // with every key masked (its output row is then 0). May be null when not wanted, except
  // with `merge_into_output`.
  float* lse = nullptr;  // [batch, heads, seqlen_q]

  // Strides in elements. The head_dim axis is always contiguous (stride 1).
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // the seqlen_q axis has stride 1

  // ---- Sizes ---------------------------------------------------------------------------------
  int batch = 0;
  int64_t seqlen_q = 0;
  int64_t seqlen_k = 0;
  int heads = 0;    // query heads
  int heads_k = 0;  // key/value heads; heads % heads_k == 0 (GQA; 1 is MQA)
  int head_dim = 0;

  DType dtype = DType::kF32;    // element type of q, k, v
  DType o_dtype = DType::kF32;  // element type of o

  // ---- Score function: s = q.k * softmax_scale; s = softcap * tanh(s / softcap) when
  // softcap > 0; s -= alibi_slope[h] * |q_pos - k_pos|; then the mask.
  float softmax_scale = 1.0f;
  float softcap = 0.0f;                  // 0 disables
  const float* alibi_slopes = nullptr;   // [heads] fp32, or null

  // ---- Dropout on the probabilities (training): pair (q_pos, k_pos) of head h in batch b is
  // dropped with probability dropout_p, by a counter-based hash of (dropout_seed, b, h, q_pos,
  // k_pos) in global positions (DropoutFactor, score_mod.h), so that every ring step, layout and
  // the backward see the mask one call over the whole sequence would; kept probabilities are
  // scaled by 1 / (1 - dropout_p). The LSE is the softmax's, before dropout. Backends that
  // have no dropout refuse dropout_p > 0 (the CPU backends have it).
  float dropout_p = 0.0f;  // in [0, 1)
  uint64_t dropout_seed = 0;

  // ---- Mask, in global positions: query row i sits at q_pos_offset + i * q_pos_stride, key
  // row j at k_pos_offset + j * k_pos_stride. A single call over a whole sequence uses
  // offsets 0 and strides 1; a ring step passes the positions of its query and key shards
  // (stride > 1 for the stripe layout).
  int64_t q_pos_offset = 0, q_pos_stride = 1;
  int64_t k_pos_offset = 0, k_pos_stride = 1;
  // Two runs of positions (a zigzag shard's two chunks in one call): rows at or after
  // q_pos_split sit at q_pos_offset2 + (row - q_pos_split) * q_pos_stride instead; the second
  // run must start after the first ends, so that positions still grow with the row (what the
  // kernels' block classification needs). kNoPosSplit (the default) is one run. Backends that
  // take two runs say so (BackendCapabilities::position_runs); cudnn does not.
  int64_t q_pos_split = kNoPosSplit, q_pos_offset2 = 0;
  int64_t k_pos_split = kNoPosSplit, k_pos_offset2 = 0;
  // Packed variable-length sequences (FlashAttention's cu_seqlens, in positions): positions
  // [seq_bounds[i], seq_bounds[i + 1]) form sequence i, and a key is allowed only within its
  // query's sequence (then causal, window and ALiBi apply as for one sequence, on the same
  // global positions). num_seqs + 1 entries, non-decreasing, covering every position of the
  // call; host memory. Null (the default): one sequence. The cpu and cuda backends take it;
  // cudnn refuses it (INVALID_ARGUMENT naming seq_bounds).
  const int64_t* seq_bounds = nullptr;
  int num_seqs = 0;
  // The same bounds in device memory, which GPU kernels read (AllowedKeySpan on the device). Set
  // by the GPU backends themselves (kernels/cuda/device_seq_bounds.h); callers leave it null.
  const int64_t* seq_bounds_device = nullptr;
  bool causal = false;  // key allowed only when k_pos <= q_pos
  // Key allowed only when q_pos - window_left <= k_pos <= q_pos + window_right;
  // kUnboundedWindow (-1) on a side means no limit there.
  int64_t window_left = kUnboundedWindow;
  int64_t window_right = kUnboundedWindow;

  // ---- Output mode ---------------------------------------------------------------------------
  // false: write o and lse. true: o (fp32) and lse already hold a partial result over other
  // keys; merge this call's result into them by log-sum-exp (the ring's accumulation).
  bool merge_into_output = false;
  // Without merge_into_output: a partial result over other keys, read-only, that this call's
  // result is merged with (log-sum-exp) before o is written in o_dtype and lse (if non-null):
  // partial_o fp32 with o's strides, partial_lse with lse's strides; both or neither. The
  // ring's last step, so that the fp32 accumulators are rounded inside the kernel's epilogue
  // instead of in a pass of their own. A row this call masks wholly gets the partial as it is
  // (rounded). Backends that take it say so (BackendCapabilities::partial_input).
  const float* partial_o = nullptr;    // [batch, seqlen_q, heads, head_dim] fp32
  const float* partial_lse = nullptr;  // [batch, heads, seqlen_q]
};

}  // namespace ringattn
