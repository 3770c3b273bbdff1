// The epilogue of a cudnn backend call: turns cuDNN's (O, Stats) over the live block of rows
// into the call's outputs.
//
// For every (batch, query row i, head) of the call:
//   lse_new = Stats[b, h, i - live_begin] when i is in the live block, else -inf;
//   merge:    when lse_new is -inf the row is left untouched (bit for bit); otherwise
//             MergeLse(lse, lse_new) (softmax_state.h) gives the weights and
//             o = wa * o + wb * o_new (the old o is not read when its lse is -inf: a stale or
//             NaN o of an empty partial does not leak; a negligible one is, so that its NaN
//             stays), lse = merged lse;
//   no merge: lse = lse_new (when lse is not null); o = o_new converted to o_dtype for a live row
//             (skipped when cuDNN already wrote o in place), o = 0 for a row outside the block.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace ringattn {

struct CudnnEpilogueParams {
  int batch = 0;
  int heads = 0;
  int head_dim = 0;
  int64_t seqlen_q = 0;  // rows of the call

  // Rows [live_begin, live_begin + live_count) have cuDNN results (live_count may be 0).
  int64_t live_begin = 0;
  int64_t live_count = 0;
  // cuDNN's Stats of the live rows: packed [batch, heads, live_count] fp32.
  const float* stats = nullptr;
  // cuDNN's O of the live rows (row index relative to live_begin), element type o_new_dtype.
  const void* o_new = nullptr;
  DType o_new_dtype = DType::kBF16;
  int64_t o_new_batch_stride = 0, o_new_row_stride = 0, o_new_head_stride = 0;

  // The call's outputs (row index absolute).
  void* o = nullptr;
  DType o_dtype = DType::kF32;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  float* lse = nullptr;  // may be null without merge
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  bool merge = false;
  // cuDNN wrote o of the live rows in place (no merge, o_dtype == o_new_dtype): the kernel only
  // writes lse and the zero rows outside the live block.
  bool o_written_in_place = false;
  // The non-finite guard's device word (non_finite_guard.h), or null: set, the kernel writes
  // nothing (the careful kernel computes the call).
  const uint32_t* skip_if_set = nullptr;
};

// Enqueues the epilogue on `stream`. Launches nothing when there is nothing to do.
absl::Status LaunchCudnnEpilogue(const CudnnEpilogueParams& e, cudaStream_t stream);

// Fills n int32 values with `value` on `stream` (the padding mask's sequence lengths).
absl::Status LaunchFillInt32(int32_t* out, int64_t n, int32_t value, cudaStream_t stream);

}  // namespace ringattn
