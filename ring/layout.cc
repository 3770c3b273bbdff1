#include "ring/layout.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace ringattn {
namespace {

// Start and length of chunk `i` when `total` rows are cut into `chunks` near-equal chunks,
// the first total % chunks chunks one row longer.
Segment Chunk(int64_t total, int64_t chunks, int64_t i) {
  const int64_t base = total / chunks;
  const int64_t extra = total % chunks;
  Segment s;
  s.start = i * base + std::min(i, extra);
  s.length = base + (i < extra ? 1 : 0);
  return s;
}

void AddSegment(Shard* shard, Segment s) {
  if (s.length == 0) return;
  s.local_offset = shard->rows;
  shard->rows += s.length;
  shard->segments.push_back(s);
}

// Calls fn(whole_row, shard_row) for every row of rank's shard.
template <typename Fn>
void ForEachShardRow(const ShardPlan& plan, int rank, Fn fn) {
  for (const Segment& s : plan.shards[rank].segments) {
    for (int64_t i = 0; i < s.length; ++i) fn(s.start + i * s.stride, s.local_offset + i);
  }
}

}  // namespace

std::string_view LayoutName(Layout layout) {
  switch (layout) {
    case Layout::kContiguous:
      return "contiguous";
    case Layout::kZigzag:
      return "zigzag";
    case Layout::kStripe:
      return "stripe";
  }
  return "unknown";
}

absl::StatusOr<Layout> ParseLayout(std::string_view name) {
  for (Layout l : {Layout::kContiguous, Layout::kZigzag, Layout::kStripe}) {
    if (name == LayoutName(l)) return l;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown layout '", std::string(name),
                                                 "'; expected one of contiguous, zigzag, stripe"));
}

Layout AutoLayout(bool causal) { return causal ? Layout::kZigzag : Layout::kContiguous; }

int64_t ShardPlan::max_rows() const {
  int64_t m = 0;
  for (const Shard& s : shards) m = std::max(m, s.rows);
  return m;
}

absl::StatusOr<ShardPlan> PlanShards(int64_t seqlen, int world, Layout layout) {
  if (seqlen < 0)
    return absl::InvalidArgumentError(absl::StrCat("seqlen must be >= 0, got ", seqlen));
  if (world < 1)
    return absl::InvalidArgumentError(absl::StrCat("world size must be >= 1, got ", world));
  ShardPlan plan;
  plan.layout = layout;
  plan.seqlen = seqlen;
  plan.world = world;
  plan.shards.resize(world);
  for (int r = 0; r < world; ++r) {
    Shard& shard = plan.shards[r];
    switch (layout) {
      case Layout::kContiguous:
        AddSegment(&shard, Chunk(seqlen, world, r));
        break;
      case Layout::kZigzag:
        AddSegment(&shard, Chunk(seqlen, 2 * world, r));
        AddSegment(&shard, Chunk(seqlen, 2 * world, 2 * world - 1 - r));
        break;
      case Layout::kStripe: {
        Segment s;
        s.start = r;
        s.stride = world;
        s.length = seqlen > r ? (seqlen - r + world - 1) / world : 0;
        AddSegment(&shard, s);
        break;
      }
    }
  }
  return plan;
}

namespace {

// Copies rank's rows from `from` to `to`: whole [outer, seqlen, row_bytes] to shard [outer, rows,
// row_bytes] (kToShard) or back.
template <bool kToShard>
void CopyShardRows(const ShardPlan& plan, int rank, const void* from, int64_t outer,
                   size_t row_bytes, void* to) {
  const auto* src = static_cast<const std::byte*>(from);
  auto* dst = static_cast<std::byte*>(to);
  const int64_t rows = plan.shards[rank].rows;
  const int64_t src_rows = kToShard ? plan.seqlen : rows;
  const int64_t dst_rows = kToShard ? rows : plan.seqlen;
  for (int64_t b = 0; b < outer; ++b) {
    const std::byte* src_b = src + b * src_rows * row_bytes;
    std::byte* dst_b = dst + b * dst_rows * row_bytes;
    ForEachShardRow(plan, rank, [&](int64_t whole_row, int64_t shard_row) {
      const int64_t from_row = kToShard ? whole_row : shard_row;
      const int64_t to_row = kToShard ? shard_row : whole_row;
      std::memcpy(dst_b + to_row * row_bytes, src_b + from_row * row_bytes, row_bytes);
    });
  }
}

}  // namespace

void ExtractShard(const ShardPlan& plan, int rank, const void* whole, int64_t outer,
                  size_t row_bytes, void* shard) {
  CopyShardRows<true>(plan, rank, whole, outer, row_bytes, shard);
}

void InsertShard(const ShardPlan& plan, int rank, const void* shard, int64_t outer,
                 size_t row_bytes, void* whole) {
  CopyShardRows<false>(plan, rank, shard, outer, row_bytes, whole);
}

}  // namespace ringattn
