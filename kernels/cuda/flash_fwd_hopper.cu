// The Hopper forward kernel's launch and its instantiations (head dims 64 and 128, bf16 and
// fp16, plain and with score mods).
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <iterator>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/cuda/flash_fwd_hopper.h"
#include "kernels/cuda/flash_fwd_hopper_kernel.cuh"
#include "kernels/cuda/flash_instantiations.h"
#include "kernels/cuda/kernel_resources.cuh"
#include "kernels/cuda/tensor_map.h"

namespace ringattn {
namespace flash_fwd {
namespace {

struct TensorMaps {
  CUtensorMap q, k, v;
};

template <typename Traits>
absl::StatusOr<TensorMaps> EncodeMaps(const AttentionParams& p) {
  auto operand = [&](const void* base, int64_t rows, int64_t heads, int64_t row_stride,
                     int64_t head_stride, int64_t batch_stride) {
    RowsOperand o;
    o.base = base;
    o.dtype = p.dtype;
    o.head_dim = p.head_dim;
    o.rows = rows;
    o.heads = heads;
    o.batch = p.batch;
    o.row_stride = row_stride;
    o.head_stride = head_stride;
    o.batch_stride = batch_stride;
    return o;
  };
  TensorMaps maps;
  RA_ASSIGN_OR_RETURN(maps.q, EncodeRowsTensorMap("q",
                                                  operand(p.q, p.seqlen_q, p.heads, p.q_row_stride,
                                                          p.q_head_stride, p.q_batch_stride),
                                                  Traits::kBlockM));
  RA_ASSIGN_OR_RETURN(maps.k,
                      EncodeRowsTensorMap("k",
                                          operand(p.k, p.seqlen_k, p.heads_k, p.k_row_stride,
                                                  p.k_head_stride, p.k_batch_stride),
                                          Traits::kBlockN));
  RA_ASSIGN_OR_RETURN(maps.v,
                      EncodeRowsTensorMap("v",
                                          operand(p.v, p.seqlen_k, p.heads_k, p.v_row_stride,
                                                  p.v_head_stride, p.v_batch_stride),
                                          Traits::kBlockN));
  return maps;
}

template <typename Traits, DType kDType, bool kScoreMods>
absl::Status Launch(const AttentionParams& p, const TensorMaps& maps, const uint32_t* skip_if_set,
                    cudaStream_t stream) {
  const int64_t m_blocks = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t ctas = m_blocks * p.batch * p.heads;  // QueryBlockOf<true>'s order
  if (ctas > int64_t{0x7fffffff}) {
    return absl::InvalidArgumentError("cuda: seqlen_q too large for the grid (2^31 - 1 blocks)");
  }
  auto* kernel = &FlashFwdHopperKernel<Traits, kDType, kScoreMods>;
  RA_RETURN_IF_ERROR(flash::PrepareSharedMemory<Traits>(kernel));
  kernel<<<dim3(static_cast<unsigned>(ctas)), Traits::kThreads, Traits::kSmemBytes, stream>>>(
      p, maps.q, maps.k, maps.v, skip_if_set);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <int kHeadDim, int kSchedule, DType kDType>
absl::Status LaunchFor(const AttentionParams& p, const uint32_t* skip_if_set, cudaStream_t stream) {
  using Traits = HopperFwdTraits<kHeadDim, kSchedule>;
  if (p.seqlen_q == 0) return absl::OkStatus();
  // TMA coordinates are 32-bit (FlashForward then runs the mma.sync kernel).
  if (p.seqlen_q > int64_t{0x7fffffff} - Traits::kBlockM ||
      p.seqlen_k > int64_t{0x7fffffff} - Traits::kBlockN) {
    return absl::InvalidArgumentError("cuda: the Hopper forward takes sequences below 2^31 rows");
  }
  RA_ASSIGN_OR_RETURN(const TensorMaps maps, EncodeMaps<Traits>(p));
  const bool score_mods = p.softcap > 0.0f || p.alibi_slopes != nullptr || p.dropout_p > 0.0f ||
                          p.seq_bounds_device != nullptr;
  return score_mods ? Launch<Traits, kDType, true>(p, maps, skip_if_set, stream)
                    : Launch<Traits, kDType, false>(p, maps, skip_if_set, stream);
}

template <int kHeadDim, int kSchedule, DType kDType>
absl::StatusOr<FlashKernelResources> ResourcesFor() {
  using Traits = HopperFwdTraits<kHeadDim, kSchedule>;
  return flash::TilingResources<Traits>(&FlashFwdHopperKernel<Traits, kDType, false>,
                                        &FlashFwdHopperKernel<Traits, kDType, true>);
}

// fn(d, schedule) as integral constants for (head_dim, variant); InvalidArgument otherwise.
template <typename Fn>
auto WithHopperKernel(int head_dim, int variant, Fn&& fn)
    -> decltype(fn(std::integral_constant<int, 64>{}, std::integral_constant<int, 0>{})) {
  if (variant < 0 || variant >= static_cast<int>(std::size(kHopperForwardVariants))) {
    return absl::InvalidArgumentError(absl::StrCat("cuda: no Hopper forward variant ", variant));
  }
  auto with_d = [&](auto d) {
    switch (kHopperForwardVariants[variant].schedule) {
      case 1:
        return fn(d, std::integral_constant<int, 1>{});
      case 2:
        return fn(d, std::integral_constant<int, 2>{});
      default:
        return fn(d, std::integral_constant<int, 0>{});
    }
  };
  if (head_dim == 64) return with_d(std::integral_constant<int, 64>{});
  if (head_dim == 128) return with_d(std::integral_constant<int, 128>{});
  return absl::InvalidArgumentError("cuda: the Hopper forward takes head_dim 64 or 128");
}

}  // namespace
}  // namespace flash_fwd

int HopperForwardVariantIndex(std::string_view name) {
  for (int i = 0; i < static_cast<int>(std::size(kHopperForwardVariants)); ++i) {
    if (name == kHopperForwardVariants[i].name) return i;
  }
  return -1;
}

bool HopperForwardHasHeadDim(int head_dim) { return head_dim == 64 || head_dim == 128; }

absl::Status LaunchFlashForwardHopper(const AttentionParams& p, int variant,
                                      const uint32_t* skip_if_set, cudaStream_t stream) {
  return WithHalfDtype(p.dtype, [&](auto t) -> absl::Status {
    return flash_fwd::WithHopperKernel(p.head_dim, variant, [&](auto d, auto schedule) {
      return flash_fwd::LaunchFor<decltype(d)::value, decltype(schedule)::value,
                                  decltype(t)::value>(p, skip_if_set, stream);
    });
  });
}

absl::StatusOr<FlashKernelResources> FlashForwardHopperResources(int head_dim, DType dtype,
                                                                 int variant) {
  if (dtype != DType::kBF16 && dtype != DType::kF16) {
    return absl::InvalidArgumentError("cuda: the fast kernel takes bf16 or fp16");
  }
  return WithHalfDtype(dtype, [&](auto t) -> absl::StatusOr<FlashKernelResources> {
    return flash_fwd::WithHopperKernel(
        head_dim, variant, [&](auto d, auto schedule) -> absl::StatusOr<FlashKernelResources> {
          return flash_fwd::ResourcesFor<decltype(d)::value, decltype(schedule)::value,
                                         decltype(t)::value>();
        });
  });
}

}  // namespace ringattn
