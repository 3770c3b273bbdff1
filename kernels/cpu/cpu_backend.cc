// The CPU backends, forward and backward, in host memory:
//   "cpu"            the fast blocked fp32 kernels (flash_cpu.h, flash_cpu_backward.h);
//   "cpu_reference"  the fp64 oracles (reference_attention.h, reference_backward.h; slow), their
//                    double results rounded to fp32 and written, merged or added like the fast
//                    kernels', so that a ring can run on either. Its backward takes the
//                    forward's statistics as given, so that a ring step's call computes that
//                    step's contribution.
// Both take every option (capabilities all true), ignore the context's stream and stop at its
// `cancel` (the reference backward tests it only before it starts).
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/status_macros.h"
#include "kernels/attention_backend.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/flash_cpu_backward.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/cpu/reference_backward.h"

namespace ringattn {
namespace {

// What both CPU backends take and where they compute.
class CpuBackend : public AttentionBackend {
 public:
  MemorySpace memory_space() const override { return MemorySpace::kHost; }
  BackendCapabilities capabilities() const override {
    return {.backward = true,
            .position_runs = true,
            .partial_input = true,
            .packed_sequences = true,
            .dropout = true,
            .fp32_inputs = true,
            .non_finite_rule = true};
  }
};

class FlashCpuBackend final : public CpuBackend {
 public:
  std::string_view name() const override { return "cpu"; }

 protected:
  absl::Status DoForward(const AttentionParams& p, const ExecutionContext& ctx) override {
    return FlashCpuForward(p, {.cancel = ctx.cancel});
  }
  absl::Status DoBackward(const AttentionBackwardParams& p, const ExecutionContext& ctx) override {
    return FlashCpuBackward(p, {.cancel = ctx.cancel});
  }
  absl::Status DoComputeDelta(const AttentionBackwardParams& p, float* delta,
                              const ExecutionContext& ctx) override {
    return FlashCpuBackwardDelta(p, delta, {.cancel = ctx.cancel});
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

// CANCELLED when ctx.cancel is set: the reference backward tests it once, before it starts.
absl::Status CheckNotCancelled(const ExecutionContext& ctx) {
  if (Cancelled(ctx.cancel)) return absl::CancelledError("the fp64 reference was cancelled");
  return absl::OkStatus();
}

class ReferenceCpuBackend final : public CpuBackend {
 public:
  std::string_view name() const override { return "cpu_reference"; }

 protected:
  // ReferenceForward validates; its double result is rounded to float and written (or
  // merged) row by row through the same WriteOutputRow as the fast kernel.
  absl::Status DoForward(const AttentionParams& p, const ExecutionContext& ctx) override {
    RA_ASSIGN_OR_RETURN(ReferenceResult ref, ReferenceForward(p, ctx.cancel));
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

  absl::Status DoBackward(const AttentionBackwardParams& p, const ExecutionContext& ctx) override {
    RA_RETURN_IF_ERROR(CheckNotCancelled(ctx));
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
  absl::Status DoComputeDelta(const AttentionBackwardParams& p, float* delta,
                              const ExecutionContext& ctx) override {
    RA_RETURN_IF_ERROR(CheckNotCancelled(ctx));
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

// Kept in every program that links ra_kernels_cpu (kernels/CMakeLists.txt: --undefined).
extern "C" const bool ringattn_register_cpu_backends = RegisterBackends({
    {"cpu", [] { return std::unique_ptr<AttentionBackend>(new FlashCpuBackend()); }},
    {"cpu_reference", [] { return std::unique_ptr<AttentionBackend>(new ReferenceCpuBackend()); }},
});

}  // namespace ringattn
