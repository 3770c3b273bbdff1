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

std::vector<ShardPiece> ShardPieces(const ShardPlan& plan, int rank, int64_t outer,
                                size_t row_bytes) {
  std::vector<ShardPiece> runs;
  const int64_t rows = plan.shards[rank].rows;
  for (int64_t b = 0; b < outer; ++b) {
    const size_t whole_b = static_cast<size_t>(b * plan.seqlen) * row_bytes;
    const size_t shard_b = static_cast<size_t>(b * rows) * row_bytes;
    for (const Segment& seg : plan.shards[rank].segments) {
      if (seg.stride == 1) {
        runs.push_back({whole_b + static_cast<size_t>(seg.start) * row_bytes,
                        shard_b + static_cast<size_t>(seg.local_offset) * row_bytes,
                        static_cast<size_t>(seg.length) * row_bytes});
        continue;
      }
      for (int64_t i = 0; i < seg.length; ++i) {
        runs.push_back({whole_b + static_cast<size_t>(seg.start + i * seg.stride) * row_bytes,
                        shard_b + static_cast<size_t>(seg.local_offset + i) * row_bytes,
                        row_bytes});
      }
    }
  }
  return runs;
}

namespace {

// Copies rank's rows from `from` to `to`: whole [outer, seqlen, row_bytes] to shard [outer, rows,
// row_bytes] (kToShard) or back.
template <bool kToShard>
void CopyShardRows(const ShardPlan& plan, int rank, const void* from, int64_t outer,
                   size_t row_bytes, void* to) {
  const auto* src = static_cast<const std::byte*>(from);
  auto* dst = static_cast<std::byte*>(to);
  for (const ShardPiece& run : ShardPieces(plan, rank, outer, row_bytes)) {
    std::memcpy(dst + (kToShard ? run.shard_offset : run.whole_offset),
                src + (kToShard ? run.whole_offset : run.shard_offset), run.bytes);
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
