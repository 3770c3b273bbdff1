#include "worker/pitched_runs.h"

namespace ringattn {

std::vector<PitchedRun> PitchedRuns(const std::vector<CopySpan>& spans) {
  std::vector<PitchedRun> runs;
  for (size_t i = 0; i < spans.size();) {
    const CopySpan& a = spans[i];
    PitchedRun r{i, 1, a.bytes, a.bytes, a.bytes};
    if (i + 1 < spans.size() && spans[i + 1].bytes == a.bytes && spans[i + 1].dst > a.dst &&
        spans[i + 1].src > a.src) {
      const size_t dp = static_cast<size_t>(spans[i + 1].dst - a.dst);
      const size_t sp = static_cast<size_t>(spans[i + 1].src - a.src);
      if (dp >= a.bytes && sp >= a.bytes) {
        r.dst_pitch = dp;
        r.src_pitch = sp;
        while (i + r.count < spans.size()) {
          const CopySpan& prev = spans[i + r.count - 1];
          const CopySpan& next = spans[i + r.count];
          if (next.bytes != a.bytes || next.dst != prev.dst + dp || next.src != prev.src + sp) {
            break;
          }
          ++r.count;
        }
      }
    }
    runs.push_back(r);
    i += r.count;
  }
  return runs;
}

}  // namespace ringattn
