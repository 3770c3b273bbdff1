// What the fast kernel supports, and the closed-set dispatch from runtime (head_dim, dtype,
// tiling) to the compiled instantiations.
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cuda/device_seq_bounds.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/cuda/flash_fwd_configs.h"
#include "kernels/cuda/flash_fwd_hopper.h"
#include "kernels/cuda/flash_instantiations.h"
#include "kernels/cuda/tiling_lookup.h"

namespace ringattn {
namespace {

bool AlignedTo(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace

// The kernels copy 16-byte chunks of rows.
absl::Status CheckFastKernelRows(const char* name, const void* ptr, int64_t batch_stride,
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
  RA_RETURN_IF_ERROR(
      CheckFastKernelRows("q", p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride));
  RA_RETURN_IF_ERROR(
      CheckFastKernelRows("k", p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride));
  RA_RETURN_IF_ERROR(
      CheckFastKernelRows("v", p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride));
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
  // The partial is read two fp32 elements at a time, with o's (even) strides.
  if (p.partial_o != nullptr && !AlignedTo(p.partial_o, 2 * sizeof(float))) {
    return absl::InvalidArgumentError("cuda: partial_o must be 8-byte aligned");
  }
  if (p.heads > 65535 || p.batch > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda: heads and batch must be <= 65535 (grid limits), got ", p.heads, " and ", p.batch));
  }
  return absl::OkStatus();
}

namespace {

absl::Status UnsupportedHeadDim(int head_dim) {
  return absl::InvalidArgumentError(absl::StrCat("unsupported head_dim ", head_dim));
}

absl::Status Launch(const AttentionParams& p, int config, const uint32_t* skip_if_set,
                    cudaStream_t stream) {
  RA_RETURN_IF_ERROR(CheckDeviceSeqBounds(p));
  return WithInstantiation(
      p.head_dim, p.dtype,
      [&](auto d, auto t) {
        return LaunchFlashForward<decltype(d)::value, decltype(t)::value>(p, config, skip_if_set,
                                                                          stream);
      },
      [&] { return UnsupportedHeadDim(p.head_dim); });
}

// The Hopper kernel as a row of FlashForwardConfigs (after the table's rows).
FlashForwardConfig HopperConfig(int head_dim, const HopperForwardVariant& variant) {
  FlashForwardConfig c;
  c.name = variant.name;
  c.head_dim = head_dim;
  c.block_m = 128;
  c.block_n = 128;
  c.warps = 8;  // consumer warps; a producer warpgroup besides
  c.rows_per_warp = 16;
  c.stages = 2;
  c.min_ctas_per_sm = 1;
  c.one_barrier = true;
  c.ex2_combine = true;
  c.global_heavy_first = true;
  c.hopper = true;
  return c;
}

// RINGATTN_FLASH_FWD_CONFIG, read once ("" when unset).
const std::string& ForcedForwardConfig() {
  static const std::string* const forced = [] {
    const char* env = std::getenv("RINGATTN_FLASH_FWD_CONFIG");
    return new std::string(env == nullptr ? "" : env);
  }();
  return *forced;
}

absl::Status LaunchHopper(const AttentionParams& p, int variant, const uint32_t* skip_if_set,
                          cudaStream_t stream) {
  RA_RETURN_IF_ERROR(CheckDeviceSeqBounds(p));
  return LaunchFlashForwardHopper(p, variant, skip_if_set, stream);
}

}  // namespace

std::string FlashForwardConfig::Describe() const {
  if (hopper) {
    return absl::StrCat("M", block_m, " N", block_n, ", wgmma: producer warpgroup (TMA) + ",
                        warps / 4, " consumer warpgroups x ", block_m / (warps / 4), " rows, ",
                        stages, " stages");
  }
  return absl::StrCat("M", block_m, " N", block_n, ", ", warps, " warps x ", rows_per_warp,
                      " rows, Q ", q_in_regs ? "regs" : "smem", ", ", stages,
                      " stages, >=", min_ctas_per_sm, " CTA/SM, ", one_barrier ? 1 : 2, " barrier",
                      one_barrier ? "" : "s", ", ", ex2_combine ? "ex2" : "expf", " Combine, ",
                      global_heavy_first ? "global" : "v1", " grid order");
}

std::vector<FlashForwardConfig> FlashForwardConfigs(int head_dim) {
  std::vector<FlashForwardConfig> configs = CompiledConfigs<flash_fwd::Tilings, FlashForwardConfig>(
      head_dim, [](const flash_fwd::Tiling& t) {
        FlashForwardConfig c;
        c.block_m = t.block_m;
        c.block_n = t.block_n;
        c.warps = t.warps;
        c.rows_per_warp = t.block_m / t.warps;
        c.q_in_regs = t.q_in_regs;
        c.stages = t.stages;
        c.min_ctas_per_sm = t.min_ctas_per_sm;
        c.one_barrier = t.one_barrier;
        c.ex2_combine = t.ex2_combine;
        c.global_heavy_first = t.global_heavy_first;
        return c;
      });
  if (!HopperForwardHasHeadDim(head_dim)) return configs;
  // The default first: the Hopper kernel's default variant where it is the default.
  const bool hopper_default = HopperForwardIsDefault(head_dim);
  if (hopper_default) {
    configs.front().is_default = false;
    configs.insert(configs.begin(),
                   HopperConfig(head_dim, kHopperForwardVariants[kHopperForwardDefaultVariant]));
    configs.front().is_default = true;
  }
  for (int v = 0; v < static_cast<int>(std::size(kHopperForwardVariants)); ++v) {
    if (hopper_default && v == kHopperForwardDefaultVariant) continue;
    configs.push_back(HopperConfig(head_dim, kHopperForwardVariants[v]));
  }
  return configs;
}

absl::Status FlashForward(const AttentionParams& p, cudaStream_t stream,
                          const uint32_t* skip_if_set) {
  RA_RETURN_IF_ERROR(CheckFlashForwardSupport(p));
  const std::string& forced = ForcedForwardConfig();
  const int forced_variant = HopperForwardVariantIndex(forced);
  const bool forced_hopper = forced_variant >= 0;
  if (HopperForwardHasHeadDim(p.head_dim) &&
      (forced_hopper || (forced.empty() && HopperForwardIsDefault(p.head_dim)))) {
    const absl::Status hopper = LaunchHopper(
        p, forced_hopper ? forced_variant : kHopperForwardDefaultVariant, skip_if_set, stream);
    // Unforced, an operand layout the copy engine refuses runs on the mma.sync kernel.
    if (forced_hopper || hopper.code() != absl::StatusCode::kInvalidArgument) return hopper;
  }
  RA_ASSIGN_OR_RETURN(
      const int index,
      ForcedTilingIndex<flash_fwd::Tilings>(
          "forward", "RINGATTN_FLASH_FWD_CONFIG",
          forced_hopper ? std::string_view() : std::string_view(forced), p.head_dim));
  return Launch(p, index, skip_if_set, stream);
}

absl::Status FlashForwardWithConfig(const AttentionParams& p, std::string_view config,
                                    cudaStream_t stream) {
  RA_RETURN_IF_ERROR(CheckFlashForwardSupport(p));
  if (const int variant = HopperForwardVariantIndex(config);
      variant >= 0 && HopperForwardHasHeadDim(p.head_dim)) {
    return LaunchHopper(p, variant, nullptr, stream);
  }
  RA_ASSIGN_OR_RETURN(const int index,
                      CompiledTilingIndex<flash_fwd::Tilings>("forward", p.head_dim, config));
  return Launch(p, index, nullptr, stream);
}

absl::StatusOr<FlashKernelResources> FlashForwardResources(int head_dim, DType dtype,
                                                           std::string_view config) {
  if (dtype != DType::kBF16 && dtype != DType::kF16) {
    return absl::InvalidArgumentError("cuda: the fast kernel takes bf16 or fp16");
  }
  if (const int variant = HopperForwardVariantIndex(config);
      variant >= 0 && HopperForwardHasHeadDim(head_dim)) {
    return FlashForwardHopperResources(head_dim, dtype, variant);
  }
  RA_ASSIGN_OR_RETURN(const int index,
                      CompiledTilingIndex<flash_fwd::Tilings>("forward", head_dim, config));
  return WithInstantiation(
      head_dim, dtype,
      [&](auto d, auto t) {
        return FlashForwardKernelResources<decltype(d)::value, decltype(t)::value>(index);
      },
      [&]() -> absl::StatusOr<FlashKernelResources> { return UnsupportedHeadDim(head_dim); });
}

}  // namespace ringattn
