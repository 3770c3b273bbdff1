// The simple GPU kernel (see reference_attention.h). Written to be obviously correct: scalar
// fp32 arithmetic, the score function and mask from score_mod.h, a two-pass softmax with the
// row maximum known before any exp, and the ring merge from softmax_state.h. Non-finite inputs
// as the fp64 reference (kernels/cpu/reference_attention.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/cuda/device_seq_bounds.h"
#include "kernels/cuda/reference_attention.h"
#include "kernels/dtype.h"
#include "kernels/score_mod.h"
#include "kernels/softmax_state.h"

namespace ringattn {
namespace {

constexpr int kThreads = 128;  // one block per query row
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeadDim = 256;                        // largest supported head_dim
constexpr int kDimsPerThread = kMaxHeadDim / kThreads;  // output columns a thread owns
constexpr int64_t kMaxBlocks = 4096;                    // the grid strides over the rows
static_assert(kMaxHeadDim % kThreads == 0, "each thread owns a whole number of columns");

__device__ __forceinline__ float NegInf() { return -std::numeric_limits<float>::infinity(); }

// max(a, b), NaN when either is (fmaxf drops a NaN): a row whose visible scores include NaN is
// NaN (reference_attention.h), never taken for wholly masked.
__device__ __forceinline__ float MaxKeepingNan(float a, float b) {
  return a != a || b != b ? a + b : fmaxf(a, b);
}

// Reductions over the block. `scratch` holds one float per warp; it is free again on return
// (the trailing barrier keeps a following call from overwriting it while it is still read).
__device__ float BlockMax(float x, float* scratch) {  // scratch: [kWarps]
  for (int offset = 16; offset > 0; offset /= 2) {
    x = MaxKeepingNan(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < kWarps; ++w) r = MaxKeepingNan(r, scratch[w]);
  __syncthreads();
  return r;
}

__device__ float BlockSum(float x, float* scratch) {  // scratch: [kWarps]
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  float r = 0.0f;
  for (int w = 0; w < kWarps; ++w) r += scratch[w];  // same order in every thread
  __syncthreads();
  return r;
}

// One query row `row` of head h in batch b (block-uniform). Returns early, uniformly, for a
// wholly masked row with merge_into_output (its partial stays bit for bit).
__device__ __forceinline__ void ReferenceRow(const AttentionParams& p, int64_t row, int h, int b,
                                             float* q_row, float* weights, bool* visible,
                                             float* scratch) {
  const int kv_head = h / (p.heads / p.heads_k);
  const int tid = threadIdx.x;
  const int dim = p.head_dim;

  const int64_t q_offset = b * p.q_batch_stride + row * p.q_row_stride + h * p.q_head_stride;
  for (int d = tid; d < dim; d += kThreads) q_row[d] = LoadAsFloat(p.q, q_offset + d, p.dtype);
  __syncthreads();

  const int64_t q_pos = QueryPos(p, row);
  // Score of key j (allowed or not: the caller tests KeyAllowed first).
  auto score = [&](int64_t j) {
    const int64_t k_offset = b * p.k_batch_stride + j * p.k_row_stride + kv_head * p.k_head_stride;
    float dot = 0.0f;
    for (int d = 0; d < dim; ++d) dot += q_row[d] * LoadAsFloat(p.k, k_offset + d, p.dtype);
    return ModScore(p, h, dot, q_pos, KeyPos(p, j));
  };

  // Pass 1: the row maximum over allowed keys; -inf when none is allowed, NaN when a score is
  // (ModScore makes every score fp32 cannot hold NaN).
  float local_max = NegInf();
  for (int64_t j = tid; j < p.seqlen_k; j += kThreads) {
    if (KeyAllowed(p, q_pos, KeyPos(p, j))) local_max = MaxKeepingNan(local_max, score(j));
  }
  const float row_max = BlockMax(local_max, scratch);  // the same value in every thread

  // Pass 2 (skipped for a fully masked row): chunks of kThreads keys. Each thread scores one key
  // of the chunk into `weights`; then each thread adds the chunk's weighted V values of the
  // columns it owns. score(j) repeats pass 1's arithmetic exactly, so every score <= row_max.
  float acc[kDimsPerThread] = {};  // columns tid, tid + kThreads, ...
  float local_sum = 0.0f;
  if (row_max != NegInf()) {
    for (int64_t chunk = 0; chunk < p.seqlen_k; chunk += kThreads) {
      const int64_t j = chunk + tid;
      float w = 0.0f;
      const bool allowed = j < p.seqlen_k && KeyAllowed(p, q_pos, KeyPos(p, j));
      if (allowed) w = expf(score(j) - row_max);
      local_sum += w;  // the softmax's normaliser: dropout comes after it
      weights[tid] = allowed ? w * DropoutFactor(p, b, h, q_pos, KeyPos(p, j)) : 0.0f;
      visible[tid] = allowed;
      __syncthreads();
      const int64_t count = p.seqlen_k - chunk < kThreads ? p.seqlen_k - chunk : kThreads;
      for (int64_t jj = 0; jj < count; ++jj) {
        const float wj = weights[jj];
        // Masked: contributes nothing, V not read. A visible key adds wj v even at wj = 0
        // (0 * inf = NaN, as the fp64 reference).
        if (!visible[jj]) continue;
        const int64_t v_offset =
            b * p.v_batch_stride + (chunk + jj) * p.v_row_stride + kv_head * p.v_head_stride;
        for (int i = 0; i < kDimsPerThread; ++i) {
          const int d = tid + i * kThreads;
          if (d < dim) acc[i] += wj * LoadAsFloat(p.v, v_offset + d, p.dtype);
        }
      }
      __syncthreads();  // `weights` is rewritten by the next chunk
    }
  }
  const float sum = BlockSum(local_sum, scratch);

  // Finish: lse = max + log(sum); the normalised row. A fully masked row: o = 0, lse = -inf.
  const bool empty = row_max == NegInf();
  const float lse = empty ? NegInf() : row_max + logf(sum);
  const float norm = empty ? 0.0f : 1.0f / sum;
  const int64_t o_offset = b * p.o_batch_stride + row * p.o_row_stride + h * p.o_head_stride;
  // lse: [batch, heads, seqlen_q], seqlen_q contiguous.
  float* lse_slot =
      p.lse == nullptr ? nullptr : p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + row;

  if (!p.merge_into_output && p.partial_o != nullptr) {
    // Merged with the read-only partial (o's and lse's strides), then written.
    const float old_lse = p.partial_lse[b * p.lse_batch_stride + h * p.lse_head_stride + row];
    const LseMerge merge =
        empty ? LseMerge{old_lse == NegInf() ? 0.0f : 1.0f, 0.0f, old_lse} : MergeLse(old_lse, lse);
    const float* old_o = p.partial_o + o_offset;  // [head_dim] fp32
    for (int i = 0; i < kDimsPerThread; ++i) {
      const int d = tid + i * kThreads;
      if (d >= dim) continue;
      const float mine = merge.wb * (acc[i] * norm);
      StoreFromFloat(p.o, o_offset + d, p.o_dtype,
                     old_lse == NegInf() ? mine : merge.wa * old_o[d] + mine);
    }
    if (tid == 0 && lse_slot != nullptr) *lse_slot = merge.lse;
    return;
  }
  if (!p.merge_into_output) {
    for (int i = 0; i < kDimsPerThread; ++i) {
      const int d = tid + i * kThreads;
      if (d < dim) StoreFromFloat(p.o, o_offset + d, p.o_dtype, acc[i] * norm);
    }
    if (tid == 0 && lse_slot != nullptr) *lse_slot = lse;
    return;
  }
  // Merge into the fp32 partial (o, lse). Nothing to add: leave it bit for bit. (`empty` is the
  // same in every thread, so this return and the barrier below are uniform.)
  if (empty) return;
  const float old_lse = *lse_slot;
  __syncthreads();  // every thread has read the old lse before thread 0 overwrites it
  const LseMerge merge = MergeLse(old_lse, lse);
  float* o = static_cast<float*>(p.o) + o_offset;  // [head_dim], fp32 by validation
  for (int i = 0; i < kDimsPerThread; ++i) {
    const int d = tid + i * kThreads;
    if (d >= dim) continue;
    const float mine = merge.wb * (acc[i] * norm);
    // An empty old partial is not read, so a never-written o cannot leak NaN; a negligible one
    // is (0 * NaN is NaN: a NaN of v reaches every row that sees its key).
    o[d] = old_lse == NegInf() ? mine : merge.wa * o[d] + mine;
  }
  if (tid == 0) *lse_slot = merge.lse;
}

// Grid: up to kMaxBlocks blocks striding over the (batch, head, query row) items; block:
// kThreads. Computes one query row of one head per item. With `run_if_set` non-null, it computes
// only when *run_if_set != 0 (the non-finite guard's careful path, non_finite_guard.h).
__global__ void __launch_bounds__(kThreads)
    ReferenceAttentionKernel(const __grid_constant__ AttentionParams p,
                             const uint32_t* run_if_set) {
  __shared__ float q_row[kMaxHeadDim];  // [head_dim] the query, as float
  __shared__ float weights[kThreads];   // [kThreads] exp(score - max) of one chunk of keys
  __shared__ bool visible[kThreads];    // [kThreads] whether each key of the chunk is allowed
  __shared__ float scratch[kWarps];     // [kWarps] block reductions

  if (run_if_set != nullptr && *run_if_set == 0) return;
  const int64_t items = p.seqlen_q * p.heads * p.batch;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    __syncthreads();  // the previous item is done with the shared arrays
    ReferenceRow(p, item % p.seqlen_q, static_cast<int>(item / p.seqlen_q % p.heads),
                 static_cast<int>(item / p.seqlen_q / p.heads), q_row, weights, visible, scratch);
  }
}

}  // namespace

absl::Status CudaReferenceForward(const AttentionParams& p, cudaStream_t stream,
                                  const uint32_t* run_if_set) {
  RA_RETURN_IF_ERROR(CheckDeviceSeqBounds(p));
  if (p.head_dim > kMaxHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat("cuda_reference: head_dim ", p.head_dim,
                                                   " exceeds the kernel's maximum ", kMaxHeadDim));
  }
  if (p.seqlen_q == 0 || p.heads == 0 || p.batch == 0) return absl::OkStatus();  // no rows
  // Enough blocks to fill the device several times over; few enough that a guarded call whose
  // flag is clear (every block returns at once) costs a few microseconds.
  const int64_t items = p.seqlen_q * p.heads * p.batch;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(items, kMaxBlocks));
  ReferenceAttentionKernel<<<blocks, kThreads, 0, stream>>>(p, run_if_set);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace ringattn
