// What the fast kernel supports, and the closed-set dispatch from runtime (head_dim, dtype) to
// the compiled instantiations.
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/status_macros.h"

namespace ringattn {
namespace {

bool AlignedTo(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// q, k or v: 16-byte aligned base and strides that are multiples of 8 elements, so that every
// row of every head starts on a 16-byte boundary (the kernel copies 16-byte chunks).
absl::Status CheckInputLayout(const char* name, const void* ptr, int64_t batch_stride,
                              int64_t row_stride, int64_t head_stride) {
  if (ptr == nullptr) return absl::OkStatus();  // empty sequence (validated)
  if (!AlignedTo(ptr, 16)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda: ", name, " must be 16-byte aligned for the fast kernel"));
  }
  if (batch_stride % 8 != 0 || row_stride % 8 != 0 || head_stride % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda: ", name, " strides must be multiples of 8 elements for the fast kernel, got batch ",
        batch_stride, ", row ", row_stride, ", head ", head_stride));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckFlashForwardSupport(const AttentionParams& p) {
  if (p.dtype != DType::kBF16 && p.dtype != DType::kF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda: dtype ", std::string(DTypeName(p.dtype)),
                     " is not supported by the fast kernel (bf16 and fp16 only); use the "
                     "cuda_reference backend for fp32 inputs"));
  }
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported head_dim ", p.head_dim,
                                                   "; the cuda kernel supports 64, 128, 256"));
  }
  RA_RETURN_IF_ERROR(CheckInputLayout("q", p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride));
  RA_RETURN_IF_ERROR(CheckInputLayout("k", p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride));
  RA_RETURN_IF_ERROR(CheckInputLayout("v", p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride));
  // o is stored two elements at a time.
  if (p.o != nullptr) {
    if (!AlignedTo(p.o, 2 * DTypeSize(p.o_dtype))) {
      return absl::InvalidArgumentError(absl::StrCat("cuda: o must be aligned to two elements (",
                                                     2 * DTypeSize(p.o_dtype), " bytes)"));
    }
    if (p.o_batch_stride % 2 != 0 || p.o_row_stride % 2 != 0 || p.o_head_stride % 2 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda: o strides must be even for the fast kernel, got batch ",
                       p.o_batch_stride, ", row ", p.o_row_stride, ", head ", p.o_head_stride));
    }
  }
  if (p.heads > 65535 || p.batch > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda: heads and batch must be <= 65535 (grid limits), got ", p.heads, " and ", p.batch));
  }
  return absl::OkStatus();
}

absl::Status FlashForward(const AttentionParams& p, cudaStream_t stream) {
  RA_RETURN_IF_ERROR(CheckFlashForwardSupport(p));
  const bool bf16 = p.dtype == DType::kBF16;
  switch (p.head_dim) {
    case 64:
      return bf16 ? LaunchFlashForward<64, DType::kBF16>(p, stream)
                  : LaunchFlashForward<64, DType::kF16>(p, stream);
    case 128:
      return bf16 ? LaunchFlashForward<128, DType::kBF16>(p, stream)
                  : LaunchFlashForward<128, DType::kF16>(p, stream);
    case 256:
      return bf16 ? LaunchFlashForward<256, DType::kBF16>(p, stream)
                  : LaunchFlashForward<256, DType::kF16>(p, stream);
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported head_dim ", p.head_dim));
}

}  // namespace ringattn
