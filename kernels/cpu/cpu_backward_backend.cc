// The CPU backward backends behind AttentionBackwardBackend: "cpu" (the fast blocked kernel)
// and "cpu_reference" (fp64, with the forward's statistics as given, so that a ring step's call
// computes that step's contribution; its double result is rounded to fp32 and written or added
// like the fast kernel's).
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/attention_backward_params.h"
#include "kernels/cpu/flash_cpu_backward.h"
#include "kernels/cpu/reference_backward.h"

namespace ringattn {
namespace {

constexpr std::string_view kCpuName = "cpu";
constexpr std::string_view kCpuReferenceName = "cpu_reference";

class FlashCpuBackwardBackend final : public AttentionBackwardBackend {
 public:
  std::string_view name() const override { return kCpuName; }
  bool supports_position_runs() const override { return true; }
  bool supports_packed_sequences() const override { return true; }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }
  absl::Status Backward(const AttentionBackwardParams& p) override { return FlashCpuBackward(p); }
  absl::Status ComputeDelta(const AttentionBackwardParams& p, float* delta) override {
    return FlashCpuBackwardDelta(p, delta);
  }
};

// Writes (or adds) a contiguous fp64 gradient [batch, rows, heads, head_dim] into a strided
// fp32 view.
void WriteGradient(const std::vector<double>& grad, int batch, int64_t rows, int heads,
                   int head_dim, float* out, int64_t batch_stride, int64_t row_stride,
                   int64_t head_stride, bool accumulate) {
  size_t at = 0;
  for (int b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int h = 0; h < heads; ++h) {
        float* row = out + b * batch_stride + i * row_stride + h * head_stride;  // [head_dim]
        for (int d = 0; d < head_dim; ++d, ++at) {
          const float g = static_cast<float>(grad[at]);
          row[d] = accumulate ? row[d] + g : g;
        }
      }
    }
  }
}

class ReferenceCpuBackwardBackend final : public AttentionBackwardBackend {
 public:
  std::string_view name() const override { return kCpuReferenceName; }
  bool supports_position_runs() const override { return true; }
  bool supports_packed_sequences() const override { return true; }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }

  absl::Status Backward(const AttentionBackwardParams& p) override {
    RA_ASSIGN_OR_RETURN(ReferenceBackwardResult r, ReferenceBackwardWithForwardStats(p));
    const AttentionParams& f = p.fwd;
    WriteGradient(r.dq, f.batch, f.seqlen_q, f.heads, f.head_dim, p.dq, p.dq_batch_stride,
                  p.dq_row_stride, p.dq_head_stride, p.accumulate);
    WriteGradient(r.dk, f.batch, f.seqlen_k, f.heads_k, f.head_dim, p.dk, p.dk_batch_stride,
                  p.dk_row_stride, p.dk_head_stride, p.accumulate);
    WriteGradient(r.dv, f.batch, f.seqlen_k, f.heads_k, f.head_dim, p.dv, p.dv_batch_stride,
                  p.dv_row_stride, p.dv_head_stride, p.accumulate);
    return absl::OkStatus();
  }

  // D in double, rounded once.
  absl::Status ComputeDelta(const AttentionBackwardParams& p, float* delta) override {
    const AttentionParams& f = p.fwd;
    if (f.seqlen_q == 0) return absl::OkStatus();
    if (p.out == nullptr || p.dout == nullptr || delta == nullptr) {
      return absl::InvalidArgumentError("out, dout and delta must be non-null when seqlen_q > 0");
    }
    for (int b = 0; b < f.batch; ++b) {
      for (int h = 0; h < f.heads; ++h) {
        for (int64_t i = 0; i < f.seqlen_q; ++i) {
          const int64_t o = b * p.out_batch_stride + i * p.out_row_stride + h * p.out_head_stride;
          const int64_t g =
              b * p.dout_batch_stride + i * p.dout_row_stride + h * p.dout_head_stride;
          double sum = 0.0;
          for (int d = 0; d < f.head_dim; ++d) {
            sum += static_cast<double>(LoadAsFloat(p.out, o + d, p.out_dtype)) *
                   LoadAsFloat(p.dout, g + d, p.out_dtype);
          }
          delta[b * p.lse_batch_stride + h * p.lse_head_stride + i] = static_cast<float>(sum);
        }
      }
    }
    return absl::OkStatus();
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionBackwardBackend>> MakeCpuBackwardBackend(
    std::string_view name) {
  if (name == kCpuName) return std::make_unique<FlashCpuBackwardBackend>();
  if (name == kCpuReferenceName) return std::make_unique<ReferenceCpuBackwardBackend>();
  return absl::InvalidArgumentError(absl::StrCat("unknown backward backend '", std::string(name),
                                                 "'; expected one of cpu, cpu_reference"));
}

}  // namespace ringattn
