// The two CUDA backends: thin wrappers that validate and launch on the call's stream.
#include "kernels/cuda/cuda_backend.h"

#include <memory>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/backend_registry.h"
#include "kernels/dtype.h"
#include "kernels/cuda/device_seq_bounds.h"
#include "kernels/cuda/flash_bwd.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/cuda/fp32_inputs.h"
#include "kernels/cuda/non_finite_guard.h"
#include "kernels/cuda/reference_attention.h"
#include "kernels/params_check.h"
#include "kernels/score_mod.h"

namespace ringattn {
namespace {

// Whether some (query, key) pair of `p` may be allowed (positions grow with the row, so the
// extreme rows bound the spans). Without one, no input can change the answer.
bool AnyPairAllowed(const AttentionParams& p) {
  if (p.seqlen_q == 0 || p.seqlen_k == 0) return false;
  return ClassifyBlock(p, QueryPos(p, 0), QueryPos(p, p.seqlen_q - 1), KeyPos(p, 0),
                       KeyPos(p, p.seqlen_k - 1))
      .any;
}

// The fast kernel on `fast` behind the guard, the simple kernel on `p` (`fast` is `p`, or its
// 16-bit copies).
absl::Status Guarded(const AttentionParams& p, const AttentionParams& fast, cudaStream_t stream) {
  if (!AnyPairAllowed(p)) return FlashForward(fast, stream);
  return GuardedForward(
      p, RowSpan{0, p.seqlen_q}, RowSpan{0, p.seqlen_k}, stream,
      [&](const uint32_t* careful) { return FlashForward(fast, stream, careful); }, &fast);
}

class FlashCudaBackend final : public CudaBackend {
 public:
  std::string_view name() const override { return "cuda"; }
  BackendCapabilities capabilities() const override {
    return {.backward = true,
            .position_runs = true,
            .partial_input = true,
            .packed_sequences = true,
            .dropout = true,
            .fp32_inputs = true,
            .fp32_forward_operands = DType::kF16,   // fp32_inputs.h
            .fp32_backward_operands = DType::kBF16,
            .non_finite_rule = true};
  }

 protected:
  // The fast kernel behind the non-finite guard (non_finite_guard.h): a call whose inputs hold
  // NaN, infinities or huge values is computed by the simple kernel instead, decided on the
  // device. A call that allows no pair skips the guard: its inputs are not read. fp32 inputs
  // run on fp16 copies (fp32_inputs.h); the guard scans the copies, so that a value beyond
  // fp16's range sends the call to the simple kernel, which reads the fp32 originals. Packed
  // sequences: the kernels read a device copy of the bounds (device_seq_bounds.h). Every
  // requirement is checked before any device work (fp32: on the copies' shape).
  absl::Status DoForward(const AttentionParams& p, const ExecutionContext& ctx) override {
    RA_RETURN_IF_ERROR(ValidateParams(p));
    const cudaStream_t stream = StreamOf(ctx);
    const bool fp32 = p.dtype == DType::kF32;
    RA_RETURN_IF_ERROR(CheckFlashForwardSupport(fp32 ? HalfCopyShape(p, DType::kF16) : p));
    return WithDeviceSeqBounds(p, stream, [&](const AttentionParams& with) -> absl::Status {
      if (!fp32) return Guarded(with, with, stream);
      return WithHalfInputs(with, stream, [&](const AttentionParams& half) {
        return Guarded(with, half, stream);
      });
    });
  }
  absl::Status DoBackward(const AttentionBackwardParams& p, const ExecutionContext& ctx) override {
    RA_RETURN_IF_ERROR(ValidateBackwardParams(p));
    const cudaStream_t stream = StreamOf(ctx);
    const bool fp32 = p.fwd.dtype == DType::kF32;
    if (fp32 && p.out_dtype != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat("cuda: out_dtype (",
                                                     std::string(DTypeName(p.out_dtype)),
                                                     ") must be the input dtype (fp32)"));
    }
    RA_RETURN_IF_ERROR(CheckFlashBackwardSupport(fp32 ? HalfCopyShape(p) : p));
    return WithDeviceSeqBounds(p, stream, [&](const AttentionBackwardParams& with) {
      if (!fp32) return FlashBackwardAllocatingDelta(with, stream);
      return WithHalfInputs(with, stream, [&](const AttentionBackwardParams& half) {
        return FlashBackwardAllocatingDelta(half, stream);
      });
    });
  }
  absl::Status DoComputeDelta(const AttentionBackwardParams& p, float* delta,
                              const ExecutionContext& ctx) override {
    if (p.out == nullptr || p.dout == nullptr) {
      return absl::InvalidArgumentError("cuda: ComputeDelta needs out and dout");
    }
    return LaunchComputeDelta(p, delta, StreamOf(ctx));
  }
};

class ReferenceCudaBackend final : public CudaBackend {
 public:
  std::string_view name() const override { return "cuda_reference"; }
  BackendCapabilities capabilities() const override {
    return {
        .position_runs = true,
        .partial_input = true,
        .packed_sequences = true,
        .dropout = true,
        .fp32_inputs = true,
        .non_finite_rule = true};
  }

 protected:
  absl::Status DoForward(const AttentionParams& p, const ExecutionContext& ctx) override {
    RA_RETURN_IF_ERROR(ValidateParams(p));
    const cudaStream_t stream = StreamOf(ctx);
    return WithDeviceSeqBounds(p, stream, [&](const AttentionParams& with) {
      return CudaReferenceForward(with, stream);
    });
  }
};

}  // namespace

// Kept in every program that links ra_kernels_cuda (kernels/cuda/CMakeLists.txt: --undefined).
extern "C" const bool ringattn_register_cuda_backends = RegisterBackends({
    {"cuda", [] { return std::unique_ptr<AttentionBackend>(new FlashCudaBackend()); }},
    {"cuda_reference",
     [] { return std::unique_ptr<AttentionBackend>(new ReferenceCudaBackend()); }},
});

}  // namespace ringattn
