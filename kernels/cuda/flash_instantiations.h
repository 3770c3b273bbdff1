// The (head_dim, dtype) pairs the flash kernels (forward and backward) are instantiated for,
// one flash_{fwd,bwd}_hdim<d>_<dtype>.cu each, and the switches from runtime values to them.
// Plain C++.
#pragma once

#include <type_traits>

#include "kernels/dtype.h"

// X(kHeadDim, kDType) for every instantiated pair.
#define RA_FLASH_FOR_EACH_INSTANTIATION(X)                                                        \
  X(64, ::ringattn::DType::kBF16)                                                                 \
  X(64, ::ringattn::DType::kF16) X(128, ::ringattn::DType::kBF16) X(128, ::ringattn::DType::kF16) \
      X(256, ::ringattn::DType::kBF16) X(256, ::ringattn::DType::kF16)

namespace ringattn {

inline constexpr int kFlashHeadDims[] = {64, 128, 256};

// fn(d) with d a std::integral_constant<int, head_dim> for the instantiated head dims (64, 128,
// 256), otherwise() for any other; both return the same type.
template <typename Fn, typename Otherwise>
auto WithHeadDim(int head_dim, Fn&& fn, Otherwise&& otherwise) {
  switch (head_dim) {
    case 64:
      return fn(std::integral_constant<int, 64>{});
    case 128:
      return fn(std::integral_constant<int, 128>{});
    case 256:
      return fn(std::integral_constant<int, 256>{});
  }
  return otherwise();
}

// fn(t) with t a std::integral_constant<DType, dtype> for bf16, else for fp16 (the kernels' two
// element types; callers check the dtype first).
template <typename Fn>
auto WithHalfDtype(DType dtype, Fn&& fn) {
  return dtype == DType::kBF16 ? fn(std::integral_constant<DType, DType::kBF16>{})
                               : fn(std::integral_constant<DType, DType::kF16>{});
}

// fn(d, t): WithHeadDim and WithHalfDtype together, otherwise() for a head dim not instantiated.
template <typename Fn, typename Otherwise>
auto WithInstantiation(int head_dim, DType dtype, Fn&& fn, Otherwise&& otherwise) {
  return WithHeadDim(
      head_dim, [&](auto d) { return WithHalfDtype(dtype, [&](auto t) { return fn(d, t); }); },
      otherwise);
}

}  // namespace ringattn
