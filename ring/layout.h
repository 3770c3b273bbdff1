// How a sequence is split into the ring's shards (load-balancing layouts), and helpers that
// move rows between a whole sequence and its shards.
//
// contiguous: rank r holds one run of about seqlen / world positions. Best without a causal
//   mask; with one, rank 0's queries see one block and the last rank's see all of them.
// zigzag: the sequence is cut into 2 * world chunks; rank r holds chunks r and
//   2 * world - 1 - r, so every rank has one early and one late chunk and equal causal work.
// stripe: rank r holds positions r, r + world, r + 2 * world, ... (one strided segment); equal
//   causal work, and every ring step masks a near-triangle.
// Sizes need not divide: the first chunks get one row more. A rank may hold zero rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace ringattn {

enum class Layout { kContiguous, kZigzag, kStripe };

std::string_view LayoutName(Layout layout);
// "contiguous", "zigzag", "stripe"; anything else is InvalidArgument naming `layout`.
absl::StatusOr<Layout> ParseLayout(std::string_view name);
// The layout chosen when the caller asks for "auto": zigzag balances the causal triangle;
// without a causal mask every layout does equal work and contiguous keeps rows in order.
Layout AutoLayout(bool causal);

// `length` rows stored at local rows [local_offset, local_offset + length) hold the global
// positions start, start + stride, ..., start + (length - 1) * stride.
struct Segment {
  int64_t start = 0;
  int64_t stride = 1;
  int64_t length = 0;
  int64_t local_offset = 0;
};

struct Shard {
  std::vector<Segment> segments;  // empty segments are omitted
  int64_t rows = 0;               // sum of segment lengths
};

struct ShardPlan {
  Layout layout = Layout::kContiguous;
  int64_t seqlen = 0;
  int world = 0;
  std::vector<Shard> shards;  // [world]
  int64_t max_rows() const;
};

// InvalidArgument for seqlen < 0 or world < 1.
absl::StatusOr<ShardPlan> PlanShards(int64_t seqlen, int world, Layout layout);

// Copies rank's rows out of a whole tensor viewed as [outer, seqlen, row_bytes] into a shard
// tensor [outer, shard.rows, row_bytes]. For q/k/v/o [batch, seq, heads, head_dim] use
// outer = batch, row_bytes = heads * head_dim * element size; for lse [batch, heads, seq] use
// outer = batch * heads, row_bytes = 4.
void ExtractShard(const ShardPlan& plan, int rank, const void* whole, int64_t outer,
                  size_t row_bytes, void* shard);

// The inverse: writes a shard tensor [outer, shard.rows, row_bytes] into its rows of the
// whole tensor [outer, seqlen, row_bytes].
void InsertShard(const ShardPlan& plan, int rank, const void* shard, int64_t outer,
                 size_t row_bytes, void* whole);

// One contiguous piece of a shard copy: `bytes` at `whole_offset` of the whole tensor
// [outer, seqlen, row_bytes] and at `shard_offset` of the shard [outer, rows, row_bytes].
struct ShardPiece {
  size_t whole_offset = 0;
  size_t shard_offset = 0;
  size_t bytes = 0;
};
// Rank's rows as the fewest such pieces (a contiguous segment is one piece per outer index), in
// shard order: what ExtractShard and InsertShard copy, for copiers of their own (several
// threads, or a device copy per piece).
std::vector<ShardPiece> ShardPieces(const ShardPlan& plan, int rank, int64_t outer, size_t row_bytes);

}  // namespace ringattn
