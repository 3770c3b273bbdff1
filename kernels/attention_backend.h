// The interface every attention kernel backend implements, and the registry that makes one
// by name. A backend computes one AttentionParams call; it owns whatever it caches (cuDNN
// graphs, thread pools) between calls.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/memory_space.h"
#include "kernels/attention_params.h"

namespace ringattn {

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  virtual std::string_view name() const = 0;
  virtual MemorySpace memory_space() const = 0;
  // Validates `p` against what this backend supports, then computes it. Must support
  // merge_into_output (fp32 o, non-null lse).
  virtual absl::Status Forward(const AttentionParams& p) = 0;
  // Whether Forward takes two runs of positions (AttentionParams::q_pos_split / k_pos_split);
  // the ring then computes a two-segment shard (zigzag) in one call instead of up to four.
  virtual bool supports_position_runs() const { return false; }
  // Whether Forward takes a read-only partial result to merge with before writing
  // (AttentionParams::partial_o / partial_lse); those that do not refuse it.
  virtual bool supports_partial_input() const { return false; }
  // Whether Forward takes packed variable-length sequences (AttentionParams::seq_bounds); the
  // rings refuse them up front, before any transfer, for a backend that does not.
  virtual bool supports_packed_sequences() const { return false; }
};

// "cpu" (fast blocked fp32) or "cpu_reference" (fp64, slow); GPU backends register in
// their own libraries. Unknown names give InvalidArgument listing the known ones.
absl::StatusOr<std::unique_ptr<AttentionBackend>> MakeCpuBackend(std::string_view name);

}  // namespace ringattn
