// The score function and the mask, as a policy every backend applies the same way (host and
// device). Positions are global (see AttentionParams): the causal and window masks compare a
// query's position with a key's, so a ring step whose query shard sits after its key shard
// masks nothing, one whose query shard sits before masks everything, and the diagonal step
// masks a triangle.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/attention_params.h"

namespace ringattn {

// Inclusive range of key positions a query may attend to.
struct KeySpan {
  int64_t lo;
  int64_t hi;
};

inline constexpr int64_t kMinPos = -(int64_t{1} << 62);
inline constexpr int64_t kMaxPos = int64_t{1} << 62;

// The causal and window part of the mask. Window sides past the position range saturate at
// kMinPos/kMaxPos (a side near INT64_MAX once overflowed q_pos + window_right into a span
// that held no key).
RA_HD KeySpan WindowKeySpan(const AttentionParams& p, int64_t q_pos) {
  KeySpan s{kMinPos, kMaxPos};
  if (p.window_left >= 0) s.lo = p.window_left >= q_pos - kMinPos ? kMinPos : q_pos - p.window_left;
  if (p.window_right >= 0) {
    s.hi = p.window_right >= kMaxPos - q_pos ? kMaxPos : q_pos + p.window_right;
  }
  if (p.causal && s.hi > q_pos) s.hi = q_pos;
  return s;
}

// Index of the packed sequence holding position `pos` in `bounds` (num_seqs + 1 entries,
// AttentionParams::seq_bounds): the last i < num_seqs with bounds[i] <= pos, by binary search.
RA_HD int64_t SequenceOf(const int64_t* bounds, int num_seqs, int64_t pos) {
  int64_t lo = 0, hi = num_seqs - 1;  // the answer is in [lo, hi]
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (bounds[mid] <= pos) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Every mask as one inclusive span of key positions per query. Both ends are non-decreasing in
// the query position (the window's and the sequence's alike), which block classification and
// the kernels' key ranges rely on. Packed sequences clamp the span to the query's sequence:
// host code reads seq_bounds, device code its device copy (seq_bounds_device). kPacked false
// leaves packing out at compile time (the GPU kernels' plain instantiations, which are never
// launched with sequences: their code stays what it was without them).
RA_HD const int64_t* PackedBounds(const AttentionParams& p) {
#if defined(__CUDA_ARCH__)
  return p.seq_bounds_device;
#else
  return p.seq_bounds;
#endif
}
template <bool kPacked = true>
RA_HD KeySpan AllowedKeySpan(const AttentionParams& p, int64_t q_pos) {
  KeySpan s = WindowKeySpan(p, q_pos);
  if constexpr (!kPacked) return s;
  const int64_t* bounds = PackedBounds(p);
  if (bounds != nullptr) {
    const int64_t i = SequenceOf(bounds, p.num_seqs, q_pos);
    if (s.lo < bounds[i]) s.lo = bounds[i];
    if (s.hi > bounds[i + 1] - 1) s.hi = bounds[i + 1] - 1;
  }
  return s;
}

// The packed-sequence clamp of a run of query positions [q_lo, q_hi] (a kernel's query block):
// when one sequence holds them all (`uniform`), its key positions [lo, hi], so that the run's
// spans need no search each (AllowedKeySpan with a clamp); else the spans search per position.
// Without packed sequences, uniform and unbounded.
struct SeqClamp {
  int64_t lo;
  int64_t hi;
  bool uniform;
};
template <bool kPacked = true>
RA_HD SeqClamp SequenceClamp(const AttentionParams& p, int64_t q_lo, int64_t q_hi) {
  if constexpr (kPacked) {
    const int64_t* bounds = PackedBounds(p);
    if (bounds != nullptr) {
      const int64_t i = SequenceOf(bounds, p.num_seqs, q_lo);
      if (q_hi < bounds[i + 1]) return {bounds[i], bounds[i + 1] - 1, true};
      return {kMinPos, kMaxPos, false};
    }
  }
  return {kMinPos, kMaxPos, true};
}
// AllowedKeySpan of a position of the run `clamp` was made for.
template <bool kPacked = true>
RA_HD KeySpan AllowedKeySpan(const AttentionParams& p, const SeqClamp& clamp, int64_t q_pos) {
  if (!clamp.uniform) return AllowedKeySpan<kPacked>(p, q_pos);
  KeySpan s = WindowKeySpan(p, q_pos);
  if constexpr (kPacked) {
    if (s.lo < clamp.lo) s.lo = clamp.lo;
    if (s.hi > clamp.hi) s.hi = clamp.hi;
  }
  return s;
}

RA_HD bool InSpan(const KeySpan& s, int64_t k_pos) { return k_pos >= s.lo && k_pos <= s.hi; }

// One pair; loops over a query's keys take its AllowedKeySpan once and test InSpan.
RA_HD bool KeyAllowed(const AttentionParams& p, int64_t q_pos, int64_t k_pos) {
  return InSpan(AllowedKeySpan(p, q_pos), k_pos);
}

// Positions of a row: one run, or two when the row is at or past the split (see
// AttentionParams::q_pos_split). Monotone in the row either way.
RA_HD int64_t QueryPos(const AttentionParams& p, int64_t row) {
  return row < p.q_pos_split ? p.q_pos_offset + row * p.q_pos_stride
                             : p.q_pos_offset2 + (row - p.q_pos_split) * p.q_pos_stride;
}
RA_HD int64_t KeyPos(const AttentionParams& p, int64_t row) {
  return row < p.k_pos_split ? p.k_pos_offset + row * p.k_pos_stride
                             : p.k_pos_offset2 + (row - p.k_pos_split) * p.k_pos_stride;
}

// x when finite, else NaN: (x - x) is 0 for finite x and NaN for +-inf and NaN. No branch, so
// that loops over it vectorise. (Relies on IEEE arithmetic: no -ffinite-math-only.)
RA_HD float NanUnlessFinite(float x) { return (x - x) + x; }

// Score of query position q_pos against key position k_pos in head h, from the raw dot
// product q.k (unscaled). Softcap applies to the scaled score, ALiBi after it. A score that is
// not a finite fp32 number (NaN or infinite inputs, or finite ones whose q.k or scaled score
// overflow) is NaN, before softcap could bound it: it poisons its row (reference_attention.h),
// where an infinite score would have vanished as a masked key (-inf) or been bounded by tanh.
RA_HD float ModScore(const AttentionParams& p, int h, float dot, int64_t q_pos, int64_t k_pos) {
  float s = NanUnlessFinite(dot * p.softmax_scale);
  if (p.softcap > 0.0f) s = p.softcap * std::tanh(s / p.softcap);
  if (p.alibi_slopes != nullptr) {
    const int64_t d = q_pos > k_pos ? q_pos - k_pos : k_pos - q_pos;
    s = NanUnlessFinite(s - p.alibi_slopes[h] * static_cast<float>(d));
  }
  return s;
}

// Dropout of pair (q_pos, k_pos) of head h in batch b (AttentionParams::dropout_p): the factor
// its probability is multiplied by, 0 (dropped) or 1 / (1 - p) (kept). A counter-based hash
// (SplitMix64's finaliser over the seed and the pair's coordinates) rather than a stateful
// generator: any caller, in any order, on any device, gets the same mask for the same pair.
RA_HD uint64_t DropoutMix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}
RA_HD float DropoutFactor(const AttentionParams& p, int b, int h, int64_t q_pos, int64_t k_pos) {
  if (p.dropout_p <= 0.0f) return 1.0f;
  uint64_t x = DropoutMix(p.dropout_seed ^ 0x9e3779b97f4a7c15ull);
  x = DropoutMix(x ^ (static_cast<uint64_t>(b) << 32 ^ static_cast<uint64_t>(h)));
  x = DropoutMix(x ^ static_cast<uint64_t>(q_pos));
  x = DropoutMix(x ^ static_cast<uint64_t>(k_pos) * 0xd6e8feb86659fd93ull);
  // The top 24 bits as a uniform in [0, 1).
  const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
  return u < p.dropout_p ? 0.0f : 1.0f / (1.0f - p.dropout_p);
}

// Block-level mask classification for a tile of query positions [q_lo, q_hi] against key
// positions [k_lo, k_hi] (both inclusive): whether any pair may be allowed, and whether every
// pair is. Positions are monotone in the row index (strides are positive), so the extreme
// queries bound the spans.
struct BlockMask {
  bool any;
  bool all;
};

// With `clamp`: SequenceClamp of a run holding q_lo and q_hi (no search when uniform).
template <bool kPacked = true>
RA_HD BlockMask ClassifyBlock(const AttentionParams& p, const SeqClamp& clamp, int64_t q_lo,
                              int64_t q_hi, int64_t k_lo, int64_t k_hi) {
  const KeySpan first = AllowedKeySpan<kPacked>(p, clamp, q_lo);
  const KeySpan last = AllowedKeySpan<kPacked>(p, clamp, q_hi);
  // The union of spans is within [first.lo, last.hi]; the intersection is [last.lo, first.hi].
  BlockMask b;
  b.any = !(k_hi < first.lo || k_lo > last.hi);
  b.all = k_lo >= last.lo && k_hi <= first.hi;
  return b;
}
template <bool kPacked = true>
RA_HD BlockMask ClassifyBlock(const AttentionParams& p, int64_t q_lo, int64_t q_hi, int64_t k_lo,
                              int64_t k_hi) {
  return ClassifyBlock<kPacked>(p, SeqClamp{kMinPos, kMaxPos, false}, q_lo, q_hi, k_lo, k_hi);
}

}  // namespace ringattn
