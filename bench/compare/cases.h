// The cases the comparison runs: built-in presets and a small case file format.
//
// A case is one whole-sequence attention problem (shape, dtype, options) together with the ring
// sizes to try and how often to time it. Every implementation of the comparison runs every case
// (a single-device implementation at world size 1 only).
//
// Case file: one case per line, either `key=value` pairs separated by spaces or a flat JSON
// object; blank lines and lines starting with '#' are ignored. Keys (all optional but seqlen):
//   name      string            shown in the report (default: made from the shape)
//   batch     int               1
//   seqlen    int               whole-sequence length, before sharding
//   heads     int               8
//   heads_k   int               key/value heads (GQA), 0 or absent: equal to heads
//   head_dim  int               64, 128 or 256
//   dtype     fp32|fp16|bf16    bf16
//   causal    bool              false
//   window    left,right        -1,-1 (unbounded)   JSON: [left, right]
//   softcap   float             0 (off)
//   alibi     bool              false (the standard slopes 2^(-8 (h + 1) / heads))
//   cu_seqlens list of int      none: packed variable-length sequences, 0,...,seqlen
//                               (JSON: [0, 100, 300]); the GPU kernels report it unsupported
//   layout    auto|contiguous|zigzag|stripe   auto (zigzag when causal)
//   worlds    list of int       1,2,4               JSON: [1, 2, 4]
//   warmup    int               1 (untimed calls before the timed ones)
//   repeats   int               5 (timed calls)
//   backward  bool              true (measure gradients where an implementation has them)
//   gpus      int               0 (GPUs the case needs: on a machine with fewer it is not run,
//                               every implementation's row says why; 0 needs none)
// Example lines:
//   name=tiny seqlen=300 heads=4 heads_k=2 dtype=fp16 causal=true worlds=1,3
//   {"name": "gqa", "seqlen": 1024, "heads": 8, "heads_k": 2, "worlds": [1, 2, 4]}
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/dtype.h"

namespace ringattn::compare {

struct ComparisonCase {
  std::string name;
  int batch = 1;
  int64_t seqlen = 0;
  int heads = 8;
  int heads_k = 0;  // 0: equal to heads
  int head_dim = 64;
  DType dtype = DType::kBF16;
  bool causal = false;
  int64_t window_left = -1;   // -1: unbounded
  int64_t window_right = -1;  // -1: unbounded
  float softcap = 0.0f;
  bool alibi = false;
  std::vector<int64_t> cu_seqlens;  // packed sequences (AttentionParams::seq_bounds); empty: one
  std::string layout = "auto";
  std::vector<int> worlds = {1, 2, 4};
  int warmup = 1;
  int repeats = 5;
  bool backward = true;
  // GPUs the case is for (a ring with a GPU per rank at its sizes); 0: none. A machine with
  // fewer skips it, which keeps a preset meant for 8 GPUs quick on 2.
  int gpus = 0;

  int kv_heads() const { return heads_k > 0 ? heads_k : heads; }
};

// A named list of cases and the implementations that run them by default.
struct CaseSet {
  std::string name;  // the preset's name or the case file's path
  std::vector<ComparisonCase> cases;
  // Implementations run when the command line names none ("auto" picks by machine).
  std::vector<std::string> default_implementations;
  // The fp64 CPU reference is computed for a case only while its forward FLOPs stay under this
  // limit; above it errors are taken against the baseline implementation instead.
  double reference_flop_limit = 2e10;
};

// "ci", "quick", "gpu" and "multigpu".
std::vector<std::string> PresetNames();
// What each preset is for, one line.
std::string_view PresetDescription(std::string_view preset);
// InvalidArgument naming the known presets for any other name.
absl::StatusOr<CaseSet> PresetCases(std::string_view preset);

// Parses the text of a case file (format above). Errors name the line and the key.
absl::StatusOr<std::vector<ComparisonCase>> ParseCases(std::string_view text);
// Reads and parses a case file; the set's defaults are those of the "quick" preset with all
// implementations chosen by machine.
absl::StatusOr<CaseSet> LoadCaseFile(const std::string& path);

// Checks sizes, options and world sizes (every error names the field); fills an empty name.
absl::Status ValidateCase(ComparisonCase& c);

// A short label: "b1 s1024 h8/2 d64 bf16 causal".
std::string CaseShape(const ComparisonCase& c);

}  // namespace ringattn::compare
