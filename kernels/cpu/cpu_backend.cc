// The CPU backends behind the AttentionBackend interface: "cpu" (the fast blocked kernel) and
// "cpu_reference" (the fp64 oracle, whose result is written out like the fast kernel's so that
// the ring can run on either).
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/attention_backend.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/reference_attention.h"

namespace ringattn {
namespace {

constexpr std::string_view kCpuName = "cpu";
constexpr std::string_view kCpuReferenceName = "cpu_reference";

class FlashCpuBackend final : public AttentionBackend {
 public:
  std::string_view name() const override { return kCpuName; }
  bool supports_position_runs() const override { return true; }
  bool supports_packed_sequences() const override { return true; }
  bool supports_partial_input() const override { return true; }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }
  absl::Status Forward(const AttentionParams& p) override { return FlashCpuForward(p); }
};

class ReferenceCpuBackend final : public AttentionBackend {
 public:
  std::string_view name() const override { return kCpuReferenceName; }
  bool supports_position_runs() const override { return true; }
  bool supports_packed_sequences() const override { return true; }
  bool supports_partial_input() const override { return true; }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }

  // ReferenceForward validates; its double result is rounded to float and written (or
  // merged) row by row through the same WriteOutputRow as the fast kernel.
  absl::Status Forward(const AttentionParams& p) override {
    RA_ASSIGN_OR_RETURN(ReferenceResult ref, ReferenceForward(p));
    std::vector<float> o_row(p.head_dim);  // [head_dim]
    for (int b = 0; b < p.batch; ++b) {
      for (int64_t i = 0; i < p.seqlen_q; ++i) {
        for (int h = 0; h < p.heads; ++h) {
          // ref.o is contiguous [batch, seqlen_q, heads, head_dim].
          const double* ref_row = &ref.o[((b * p.seqlen_q + i) * p.heads + h) * p.head_dim];
          for (int d = 0; d < p.head_dim; ++d) o_row[d] = static_cast<float>(ref_row[d]);
          // ref.lse is contiguous [batch, heads, seqlen_q].
          const float lse = static_cast<float>(ref.lse[(b * p.heads + h) * p.seqlen_q + i]);
          WriteOutputRow(p, b, h, i, o_row.data(), lse);
        }
      }
    }
    return absl::OkStatus();
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionBackend>> MakeCpuBackend(std::string_view name) {
  if (name == kCpuName) return std::make_unique<FlashCpuBackend>();
  if (name == kCpuReferenceName) return std::make_unique<ReferenceCpuBackend>();
  return absl::InvalidArgumentError(absl::StrCat("unknown kernel backend '", std::string(name),
                                                 "'; expected one of cpu, cpu_reference"));
}

}  // namespace ringattn
