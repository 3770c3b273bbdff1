// Copies grouped for 2-D copy engines (cudaMemcpy2D): a shard's rows gathered out of a whole
// tensor, or scattered back, are a few runs of equal pieces at constant pitches, so a device
// moves them in a few calls instead of one per piece.
#pragma once

#include <cstddef>
#include <vector>

#include "base/shared_memory.h"

namespace ringattn {

// Spans [first, first + count) of a list: span first + i copies `bytes` from
// spans[first].src + i * src_pitch to spans[first].dst + i * dst_pitch. Both pitches are at
// least `bytes` (rows never overlap); count 1 has pitches equal to its bytes.
struct PitchedRun {
  size_t first = 0;
  size_t count = 1;
  size_t bytes = 0;
  size_t dst_pitch = 0;
  size_t src_pitch = 0;
};

// `spans` in order as runs (greedy: each run as long as the pitches of its first two spans
// hold); together they copy exactly what the spans copy.
std::vector<PitchedRun> PitchedRuns(const std::vector<CopySpan>& spans);

}  // namespace ringattn
