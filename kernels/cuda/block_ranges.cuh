// Which blocks a flash kernel's CTA computes and which blocks of the other side it must visit:
// the block a CTA owns, from its grid index (forward: a query block; backward: a key block),
// and the live range of blocks that may hold an allowed (query, key) pair for it under the
// mask (score_mod.h's spans; positions grow with the row index, so each range is found by two
// binary searches, and is empty when nothing is allowed).
#pragma once

#include <cstdint>

#include "kernels/attention_params.h"
#include "kernels/cuda/kernel_primitives.cuh"
#include "kernels/score_mod.h"

namespace ringattn {
namespace flash {

// Blocks [begin, end) of one side.
struct BlockRange {
  int64_t begin;
  int64_t end;
};

// The key blocks (kBlockN keys each) that may hold an allowed key for some query position in
// [q_pos_lo, q_pos_hi]: exactly the blocks for which ClassifyBlock(...).any holds.
// kPacked: whether packed sequences may be set (AllowedKeySpan).
template <int kBlockN, bool kPacked>
__device__ __forceinline__ BlockRange LiveKeyBlocks(const AttentionParams& p, int64_t q_pos_lo,
                                                    int64_t q_pos_hi) {
  const int64_t num_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const KeySpan first = AllowedKeySpan<kPacked>(p, q_pos_lo);
  const KeySpan last = AllowedKeySpan<kPacked>(p, q_pos_hi);
  int64_t lo = 0, hi = num_blocks;  // first block whose last key is at or after first.lo
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    const int64_t last_key = Min64((mid + 1) * kBlockN, p.seqlen_k) - 1;
    if (KeyPos(p, last_key) >= first.lo) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int64_t begin = lo;
  hi = num_blocks;  // first block from `begin` on whose first key is after last.hi
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (KeyPos(p, mid * kBlockN) > last.hi) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return {begin, lo};
}

// The query blocks (kBlockM rows each) that may hold a query allowed to see some key position
// in [k_lo, k_hi]: ClassifyBlock(...).any over the block's first and last rows.
template <int kBlockM, bool kPacked>
__device__ __forceinline__ BlockRange LiveQueryBlocks(const AttentionParams& p, int64_t k_lo,
                                                      int64_t k_hi) {
  const int64_t num_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  int64_t lo = 0, hi = num_blocks;  // first block whose last row's span ends at or after k_lo
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    const int64_t last_row = Min64((mid + 1) * kBlockM, p.seqlen_q) - 1;
    if (AllowedKeySpan<kPacked>(p, QueryPos(p, last_row)).hi >= k_lo) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int64_t begin = lo;
  hi = num_blocks;  // first block from `begin` on whose first row's span starts after k_hi
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (AllowedKeySpan<kPacked>(p, QueryPos(p, mid * kBlockM)).lo > k_hi) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return {begin, lo};
}

// The forward CTA's query block, head and batch. Heaviest query blocks first (under a causal
// mask the last query block sees the most keys, so starting it first shortens the grid's
// tail), in one of two grid orders:
//   kGlobalHeavyFirst false (v1's): grid (m_blocks, heads, batch), heaviest first within each
//     (batch, head);
//   kGlobalHeavyFirst true: grid (m_blocks * batch * heads) in one dimension, (batch, head)
//     fastest: every pair's heaviest block before any lighter one.
// (docs/performance_notes.md, prediction 11, for the scheduling model.)
struct QueryBlockWork {
  int64_t m_block;
  int head;
  int batch;
};
template <bool kGlobalHeavyFirst>
__device__ __forceinline__ QueryBlockWork QueryBlockOf(const AttentionParams& p) {
  if constexpr (kGlobalHeavyFirst) {
    // 32-bit: gridDim.x = m_blocks * pairs < 2^31 (checked at launch).
    const uint32_t heads = static_cast<uint32_t>(p.heads);
    const uint32_t pairs = static_cast<uint32_t>(p.batch) * heads;
    const uint32_t m_rev = blockIdx.x / pairs;
    const uint32_t pair = blockIdx.x - m_rev * pairs;
    return {static_cast<int64_t>(gridDim.x / pairs - 1 - m_rev), static_cast<int>(pair % heads),
            static_cast<int>(pair / heads)};
  } else {
    return {static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x, static_cast<int>(blockIdx.y),
            static_cast<int>(blockIdx.z)};
  }
}

// The backward CTA's key block, K/V head and batch, from a one-dimensional grid of
// n_blocks * batch * heads_k CTAs: kHeadMajor, every key block of one (batch, K/V head) before
// the next pair's; else key block slowest across all pairs. Either way key blocks ascend.
struct KeyBlockWork {
  uint32_t n_block;
  int kv_head;
  int batch;
};
template <bool kHeadMajor>
__device__ __forceinline__ KeyBlockWork KeyBlockOf(const AttentionParams& p) {
  const uint32_t pairs = static_cast<uint32_t>(p.batch) * static_cast<uint32_t>(p.heads_k);
  const uint32_t n_blocks = gridDim.x / pairs;
  uint32_t n_block, pair;
  if constexpr (kHeadMajor) {
    pair = blockIdx.x / n_blocks;
    n_block = blockIdx.x - pair * n_blocks;
  } else {
    n_block = blockIdx.x / pairs;
    pair = blockIdx.x - n_block * pairs;
  }
  return {n_block, static_cast<int>(pair % static_cast<uint32_t>(p.heads_k)),
          static_cast<int>(pair / static_cast<uint32_t>(p.heads_k))};
}

}  // namespace flash
}  // namespace ringattn
