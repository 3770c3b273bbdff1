// What the backward kernel supports, the prologue it needs (dq zeroed, D computed) and the
// closed-set dispatch from runtime (head_dim, dtype, tiling) to the compiled instantiations.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/cuda/device_seq_bounds.h"
#include "kernels/cuda/flash_bwd.h"
#include "kernels/cuda/flash_bwd_configs.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/cuda/flash_instantiations.h"
#include "kernels/cuda/tiling_lookup.h"

namespace ringattn {
namespace {

// dq, dk or dv: written and added two floats at a time.
absl::Status CheckGradLayout(const char* name, const float* ptr, int64_t batch_stride,
                             int64_t row_stride, int64_t head_stride) {
  if (ptr == nullptr) return absl::OkStatus();  // empty (validated)
  if (reinterpret_cast<uintptr_t>(ptr) % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda: ", name, " must be 8-byte aligned"));
  }
  if (batch_stride % 2 != 0 || row_stride % 2 != 0 || head_stride % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda: ", name, " strides must be even, got batch ", batch_stride, ", row ",
                     row_stride, ", head ", head_stride));
  }
  return absl::OkStatus();
}

absl::Status UnsupportedHeadDim(int head_dim) {
  return absl::InvalidArgumentError(absl::StrCat("unsupported head_dim ", head_dim));
}

absl::Status Run(const AttentionBackwardParams& p, float* delta_scratch, int config,
                 cudaStream_t stream) {
  RA_RETURN_IF_ERROR(CheckFlashBackwardSupport(p));
  RA_RETURN_IF_ERROR(CheckDeviceSeqBounds(p.fwd));
  AttentionBackwardParams call = p;
  if (call.delta == nullptr) {
    if (delta_scratch == nullptr && p.fwd.seqlen_q > 0) {
      return absl::InvalidArgumentError("cuda: delta is null and no scratch was given for it");
    }
    RA_RETURN_IF_ERROR(LaunchComputeDelta(p, delta_scratch, stream));
    call.delta = delta_scratch;
  }
  if (!call.accumulate) RA_RETURN_IF_ERROR(LaunchZeroDq(call, stream));
  return WithInstantiation(
      p.fwd.head_dim, p.fwd.dtype,
      [&](auto d, auto t) {
        return LaunchFlashBackward<decltype(d)::value, decltype(t)::value>(call, config, stream);
      },
      [&] { return UnsupportedHeadDim(p.fwd.head_dim); });
}

}  // namespace

absl::Status CheckFlashBackwardSupport(const AttentionBackwardParams& p) {
  AttentionParams fwd = p.fwd;
  fwd.o = nullptr;  // the forward's output slot is not used by the backward
  RA_RETURN_IF_ERROR(CheckFlashForwardSupport(fwd));
  if (p.out_dtype != p.fwd.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda: out_dtype (", std::string(DTypeName(p.out_dtype)), ") must be the input dtype (",
        std::string(DTypeName(p.fwd.dtype)), "): dout is a tensor-core operand"));
  }
  RA_RETURN_IF_ERROR(CheckFastKernelRows("dout", p.dout, p.dout_batch_stride, p.dout_row_stride,
                                         p.dout_head_stride));
  RA_RETURN_IF_ERROR(
      CheckGradLayout("dq", p.dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride));
  RA_RETURN_IF_ERROR(
      CheckGradLayout("dk", p.dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride));
  RA_RETURN_IF_ERROR(
      CheckGradLayout("dv", p.dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride));
  return absl::OkStatus();
}

absl::Status FlashBackward(const AttentionBackwardParams& p, float* delta_scratch,
                           cudaStream_t stream) {
  RA_ASSIGN_OR_RETURN(const int index,
                      ForcedOrDefaultTilingIndex<flash_bwd::Tilings>(
                          "backward", "RINGATTN_FLASH_BWD_CONFIG", p.fwd.head_dim));
  return Run(p, delta_scratch, index, stream);
}

absl::Status FlashBackwardAllocatingDelta(const AttentionBackwardParams& p, cudaStream_t stream) {
  if (p.delta != nullptr || p.fwd.seqlen_q == 0) return FlashBackward(p, nullptr, stream);
  RA_RETURN_IF_ERROR(CheckFlashBackwardSupport(p));
  const int64_t span = (p.fwd.batch - 1) * p.lse_batch_stride +
                       (p.fwd.heads - 1) * p.lse_head_stride + p.fwd.seqlen_q;  // lse's view
  void* scratch = nullptr;
  RA_CUDA_RETURN_IF_ERROR(
      cudaMallocAsync(&scratch, static_cast<size_t>(span) * sizeof(float), stream));
  const absl::Status run = FlashBackward(p, static_cast<float*>(scratch), stream);
  const cudaError_t freed = cudaFreeAsync(scratch, stream);
  RA_RETURN_IF_ERROR(run);
  RA_CUDA_RETURN_IF_ERROR(freed);
  return absl::OkStatus();
}

absl::Status FlashBackwardWithConfig(const AttentionBackwardParams& p, float* delta_scratch,
                                     std::string_view config, cudaStream_t stream) {
  RA_ASSIGN_OR_RETURN(const int index,
                      CompiledTilingIndex<flash_bwd::Tilings>("backward", p.fwd.head_dim, config));
  return Run(p, delta_scratch, index, stream);
}

std::vector<FlashBackwardConfig> FlashBackwardConfigs(int head_dim) {
  return CompiledConfigs<flash_bwd::Tilings, FlashBackwardConfig>(
      head_dim, [](const flash_bwd::Tiling& t) {
        FlashBackwardConfig c;
        c.block_n = t.block_n;
        c.block_m = t.block_m;
        c.warps = t.warps;
        c.d_split = t.d_split;
        c.min_ctas_per_sm = t.min_ctas_per_sm;
        c.head_major = t.head_major;
        return c;
      });
}

absl::StatusOr<FlashBackwardResources> FlashBackwardKernelResources(int head_dim, DType dtype,
                                                                    std::string_view config) {
  RA_ASSIGN_OR_RETURN(const int index,
                      CompiledTilingIndex<flash_bwd::Tilings>("backward", head_dim, config));
  if (dtype != DType::kBF16 && dtype != DType::kF16) {
    return absl::InvalidArgumentError("cuda: backward kernels are bf16 or fp16");
  }
  return WithInstantiation(
      head_dim, dtype,
      [&](auto d, auto t) {
        return FlashBackwardResourcesOf<decltype(d)::value, decltype(t)::value>(index);
      },
      [&]() -> absl::StatusOr<FlashBackwardResources> { return UnsupportedHeadDim(head_dim); });
}

}  // namespace ringattn
