// The backward kernel's launch, and the definitions behind flash_bwd.h's LaunchFlashBackward
// and FlashBackwardResourcesOf for this build's tilings (kCompiledTilings). Each
// flash_bwd_hdim<d>_<dtype>.cu instantiates them for its pair with RA_FLASH_BWD_INSTANTIATE.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/attention_backward_params.h"
#include "kernels/cuda/flash_bwd.h"
#include "kernels/cuda/flash_bwd_configs.h"
#include "kernels/cuda/flash_bwd_kernel.cuh"
#include "kernels/cuda/flash_bwd_traits.h"
#include "kernels/cuda/kernel_resources.cuh"
#include "kernels/cuda/tiling_lookup.h"

namespace ringattn {
namespace flash_bwd {

template <typename Traits, DType kDType, bool kScoreMods>
absl::Status Launch(const AttentionBackwardParams& p, cudaStream_t stream) {
  const int64_t n_blocks = (p.fwd.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  const int64_t ctas = n_blocks * p.fwd.batch * p.fwd.heads_k;
  if (ctas == 0) return absl::OkStatus();
  if (ctas > int64_t{0x7fffffff}) {
    return absl::InvalidArgumentError("cuda: seqlen_k too large for the grid (2^31 - 1 blocks)");
  }
  RA_RETURN_IF_ERROR(
      (flash::PrepareSharedMemory<Traits>(&FlashBwdKernel<Traits, kDType, kScoreMods>)));
  FlashBwdKernel<Traits, kDType, kScoreMods>
      <<<static_cast<unsigned>(ctas), Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <typename Traits, DType kDType>
absl::Status LaunchWithTraits(const AttentionBackwardParams& p, cudaStream_t stream) {
  const bool mods = p.fwd.softcap > 0.0f || p.fwd.alibi_slopes != nullptr ||
                    p.fwd.dropout_p > 0.0f || p.fwd.seq_bounds_device != nullptr;
  return mods ? Launch<Traits, kDType, true>(p, stream) : Launch<Traits, kDType, false>(p, stream);
}

}  // namespace flash_bwd

template <int kHeadDim, DType kDType>
absl::Status LaunchFlashBackward(const AttentionBackwardParams& p, int config,
                                 cudaStream_t stream) {
  return WithCompiledTraits<flash_bwd::Tilings, flash_bwd::FlashBwdTraits, kHeadDim>(
      "backward", config, [&](auto traits) {
        return flash_bwd::LaunchWithTraits<decltype(traits), kDType>(p, stream);
      });
}

template <int kHeadDim, DType kDType>
absl::StatusOr<FlashBackwardResources> FlashBackwardResourcesOf(int config) {
  return WithCompiledTraits<flash_bwd::Tilings, flash_bwd::FlashBwdTraits, kHeadDim>(
      "backward", config, [](auto traits) {
        using Traits = decltype(traits);
        return flash::TilingResources<Traits>(&flash_bwd::FlashBwdKernel<Traits, kDType, false>,
                                              &flash_bwd::FlashBwdKernel<Traits, kDType, true>);
      });
}

}  // namespace ringattn

// Explicit instantiation of the backward's entry points for one (head_dim, dtype); at namespace
// scope outside ringattn.
#define RA_FLASH_BWD_INSTANTIATE(kHeadDim, kDType)                       \
  template absl::Status ringattn::LaunchFlashBackward<kHeadDim, kDType>( \
      const ringattn::AttentionBackwardParams&, int, cudaStream_t);      \
  template absl::StatusOr<ringattn::FlashBackwardResources>              \
  ringattn::FlashBackwardResourcesOf<kHeadDim, kDType>(int)
