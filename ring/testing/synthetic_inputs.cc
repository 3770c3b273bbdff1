#include "ring/testing/synthetic_inputs.h"

namespace ringattn {
namespace {

// SplitMix64's finaliser: a cheap bijective mix with good avalanche.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

float SyntheticValue(uint64_t seed, uint32_t id, int64_t b, int64_t pos, int64_t h, int64_t d) {
  uint64_t x = Mix(seed ^ (static_cast<uint64_t>(id) << 56));
  x = Mix(x ^ static_cast<uint64_t>(b));
  x = Mix(x ^ static_cast<uint64_t>(pos));
  x = Mix(x ^ (static_cast<uint64_t>(h) << 32 | static_cast<uint64_t>(d)));
  // 24 random bits to [-1, 1).
  return static_cast<float>(x >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

void FillSyntheticShard(uint64_t seed, uint32_t id, const ShardPlan& plan, int rank, int batch,
                        int heads, int head_dim, DType dtype, void* out) {
  const Shard& shard = plan.shards[rank];
  const int64_t row = static_cast<int64_t>(heads) * head_dim;
  for (int b = 0; b < batch; ++b) {
    for (const Segment& s : shard.segments) {
      for (int64_t i = 0; i < s.length; ++i) {
        const int64_t pos = s.start + i * s.stride;
        const int64_t base = (b * shard.rows + s.local_offset + i) * row;
        for (int h = 0; h < heads; ++h) {
          for (int d = 0; d < head_dim; ++d) {
            StoreFromFloat(out, base + h * head_dim + d, dtype,
                           SyntheticValue(seed, id, b, pos, h, d));
          }
        }
      }
    }
  }
}

void FillSynthetic(uint64_t seed, uint32_t id, int batch, int64_t seqlen, int heads, int head_dim,
                   DType dtype, void* out) {
  absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, 1, Layout::kContiguous);
  FillSyntheticShard(seed, id, *plan, 0, batch, heads, head_dim, dtype, out);
}

}  // namespace ringattn
