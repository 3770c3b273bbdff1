// The shape of one attention problem, from the request to the kernel params: element type and
// sizes of q [batch, seqlen_q, heads, head_dim] and k, v [batch, seqlen_k, heads_k, head_dim]
// (heads % heads_k == 0: GQA; heads_k == 1: MQA), with the sizes derived from them. The
// coordinator's validated request, the worker RPCs' shard header, the ring's shard tensors and
// AttentionParams all carry this one type (a shard is the same shape with its own rows).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/attention_params.h"
#include "kernels/dtype.h"

namespace ringattn {

struct AttentionShape {
  DType dtype = DType::kF32;  // of q, k, v (and out)
  int batch = 0;
  int64_t seqlen_q = 0;
  int64_t seqlen_k = 0;
  int heads = 0;    // query heads
  int heads_k = 0;  // key/value heads
  int head_dim = 0;

  // One sequence of `rows` rows for q and k alike (self-attention; a ring shard).
  static AttentionShape Self(DType dtype, int batch, int64_t rows, int heads, int heads_k,
                             int head_dim) {
    return {dtype, batch, rows, rows, heads, heads_k, head_dim};
  }
  // The same heads and dtype over other row counts (a shard of this problem).
  AttentionShape WithRows(int64_t rows_q, int64_t rows_k) const {
    AttentionShape s = *this;
    s.seqlen_q = rows_q;
    s.seqlen_k = rows_k;
    return s;
  }

  size_t elem_bytes() const { return static_cast<size_t>(DTypeSize(dtype)); }
  int64_t q_row_elems() const { return int64_t{heads} * head_dim; }    // one row of q / out
  int64_t kv_row_elems() const { return int64_t{heads_k} * head_dim; }  // one row of k / v
  int64_t q_elems() const { return batch * seqlen_q * q_row_elems(); }
  int64_t kv_elems() const { return batch * seqlen_k * kv_row_elems(); }
  int64_t lse_elems() const { return int64_t{batch} * heads * seqlen_q; }  // [batch, heads, seqlen_q]
  size_t q_bytes() const { return static_cast<size_t>(q_elems()) * elem_bytes(); }
  size_t kv_bytes() const { return static_cast<size_t>(kv_elems()) * elem_bytes(); }
  size_t lse_bytes() const { return static_cast<size_t>(lse_elems()) * sizeof(float); }

  bool operator==(const AttentionShape&) const = default;
};

// Sets p's sizes and dtype (o_dtype too) from `s`; strides and pointers are left alone.
inline void SetShape(const AttentionShape& s, AttentionParams* p) {
  p->dtype = s.dtype;
  p->o_dtype = s.dtype;
  p->batch = s.batch;
  p->seqlen_q = s.seqlen_q;
  p->seqlen_k = s.seqlen_k;
  p->heads = s.heads;
  p->heads_k = s.heads_k;
  p->head_dim = s.head_dim;
}

// The shape p describes (dtype of q, k, v).
inline AttentionShape ShapeOf(const AttentionParams& p) {
  return {p.dtype, p.batch, p.seqlen_q, p.seqlen_k, p.heads, p.heads_k, p.head_dim};
}

}  // namespace ringattn
