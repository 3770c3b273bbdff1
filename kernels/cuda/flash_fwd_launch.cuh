// The forward kernel's launch: grid, shared memory and the choice between the plain and the
// score-mod instantiation, and the definitions behind flash_fwd.h's LaunchFlashForward and
// FlashForwardKernelResources for this build's tilings (kCompiledTilings). Each
// flash_fwd_hdim<d>_<dtype>.cu instantiates them for its pair with RA_FLASH_FWD_INSTANTIATE.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/attention_params.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/cuda/flash_fwd_configs.h"
#include "kernels/cuda/flash_fwd_kernel.cuh"
#include "kernels/cuda/flash_fwd_traits.h"
#include "kernels/cuda/kernel_resources.cuh"
#include "kernels/cuda/tiling_lookup.h"

namespace ringattn {
namespace flash_fwd {

template <typename Traits, DType kDType, bool kScoreMods>
absl::Status Launch(const AttentionParams& p, const uint32_t* skip_if_set, cudaStream_t stream) {
  const int64_t m_blocks = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  // QueryBlockOf's order. The one-dimensional grid's limit, 2^31 - 1 CTAs, is 2.7e11 query
  // rows over all (batch, head) pairs: tensors far past any device memory.
  const int64_t ctas = Traits::kGlobalHeavyFirst ? m_blocks * p.batch * p.heads : m_blocks;
  if (ctas > int64_t{0x7fffffff}) {
    return absl::InvalidArgumentError("cuda: seqlen_q too large for the grid (2^31 - 1 blocks)");
  }
  const dim3 grid = Traits::kGlobalHeavyFirst
                        ? dim3(static_cast<unsigned>(ctas))
                        : dim3(static_cast<unsigned>(m_blocks), static_cast<unsigned>(p.heads),
                               static_cast<unsigned>(p.batch));
  RA_RETURN_IF_ERROR(
      (flash::PrepareSharedMemory<Traits>(&FlashFwdKernel<Traits, kDType, kScoreMods>)));
  FlashFwdKernel<Traits, kDType, kScoreMods>
      <<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p, skip_if_set);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <typename Traits, DType kDType>
absl::Status LaunchWithTraits(const AttentionParams& p, const uint32_t* skip_if_set,
                              cudaStream_t stream) {
  if (p.seqlen_q == 0) return absl::OkStatus();
  const bool score_mods = p.softcap > 0.0f || p.alibi_slopes != nullptr || p.dropout_p > 0.0f ||
                          p.seq_bounds_device != nullptr;
  return score_mods ? Launch<Traits, kDType, true>(p, skip_if_set, stream)
                    : Launch<Traits, kDType, false>(p, skip_if_set, stream);
}

}  // namespace flash_fwd

template <int kHeadDim, DType kDType>
absl::Status LaunchFlashForward(const AttentionParams& p, int config, const uint32_t* skip_if_set,
                                cudaStream_t stream) {
  return WithCompiledTraits<flash_fwd::Tilings, flash_fwd::FlashFwdTraits, kHeadDim>(
      "forward", config, [&](auto traits) {
        return flash_fwd::LaunchWithTraits<decltype(traits), kDType>(p, skip_if_set, stream);
      });
}

template <int kHeadDim, DType kDType>
absl::StatusOr<FlashKernelResources> FlashForwardKernelResources(int config) {
  return WithCompiledTraits<flash_fwd::Tilings, flash_fwd::FlashFwdTraits, kHeadDim>(
      "forward", config, [](auto traits) {
        using Traits = decltype(traits);
        return flash::TilingResources<Traits>(&flash_fwd::FlashFwdKernel<Traits, kDType, false>,
                                              &flash_fwd::FlashFwdKernel<Traits, kDType, true>);
      });
}

}  // namespace ringattn

// Explicit instantiation of the forward's entry points for one (head_dim, dtype); at namespace
// scope outside ringattn.
#define RA_FLASH_FWD_INSTANTIATE(kHeadDim, kDType)                           \
  template absl::Status ringattn::LaunchFlashForward<kHeadDim, kDType>(      \
      const ringattn::AttentionParams&, int, const uint32_t*, cudaStream_t); \
  template absl::StatusOr<ringattn::FlashKernelResources>                    \
  ringattn::FlashForwardKernelResources<kHeadDim, kDType>(int)
