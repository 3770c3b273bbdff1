// Deterministic inputs addressed by global position, so that every rank can make its own shard
// of a random Q, K or V without the whole tensor existing anywhere: element (b, pos, h, d) of
// tensor `id` is a hash of (seed, id, b, pos, h, d) mapped to [-1, 1), rounded to the dtype.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "ring/layout.h"

namespace ringattn {

// Value of one element of a synthetic tensor, before rounding to a dtype.
float SyntheticValue(uint64_t seed, uint32_t id, int64_t b, int64_t pos, int64_t h, int64_t d);

// Fills `out` [batch, rows, heads, head_dim] (element type dtype) with the rows of rank's shard
// of the synthetic whole tensor [batch, plan.seqlen, heads, head_dim].
void FillSyntheticShard(uint64_t seed, uint32_t id, const ShardPlan& plan, int rank, int batch,
                        int heads, int head_dim, DType dtype, void* out);

// Fills a whole tensor [batch, seqlen, heads, head_dim] (a plan of one rank).
void FillSynthetic(uint64_t seed, uint32_t id, int batch, int64_t seqlen, int heads, int head_dim,
                   DType dtype, void* out);

}  // namespace ringattn
