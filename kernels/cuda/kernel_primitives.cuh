// Element types and device primitives of the flash kernels (forward and backward): the
// sm_80-class PTX they are built from (cp.async, ldmatrix, mma.sync m16n8k16 with fp32
// accumulators, ex2, shared-memory loads and stores) and a few scalar helpers. Every function
// is __forceinline__ and holds one instruction or a handful; none owns a schedule.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels/dtype.h"

namespace ringattn {
namespace flash {

// log2(e): the kernels exponentiate with ex2, e^x = 2^(x log2 e).
inline constexpr float kLog2e = 1.4426950408889634f;

// ---- Element types --------------------------------------------------------------------------

// The 16-bit input type of kDType (bf16 or fp16), and Pack: two floats rounded to it as one
// 32-bit mma operand register, `lo` in the low half (the lower column).
template <DType kDType>
struct Element {
  static_assert(kDType == DType::kBF16 || kDType == DType::kF16, "mma operands are 16-bit");
  using T = std::conditional_t<kDType == DType::kBF16, __nv_bfloat16, __half>;
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    uint32_t u;
    if constexpr (kDType == DType::kBF16) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
      memcpy(&u, &v, sizeof(u));
    } else {
      const __half2 v = __floats2half2_rn(lo, hi);
      memcpy(&u, &v, sizeof(u));
    }
    return u;
  }
};

// ---- Copies global -> shared (cp.async) -----------------------------------------------------

// The shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy, bypassing L1; with `fill` false nothing is read and the 16
// bytes are zero-filled (rows past the end of the sequence).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool fill) {
  const int src_bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
// 4-byte global -> shared copy (through L1).
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---- Shared memory -> registers, and back ---------------------------------------------------

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i of
// every lane receives (row lane / 4, columns 2 (lane % 4) + {0, 1}) of matrix i.
__device__ __forceinline__ void Ldmatrix4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// The same, transposed: register i receives (rows 2 (lane % 4) + {0, 1}, column lane / 4).
__device__ __forceinline__ void Ldmatrix4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void StoreShared32(uint32_t addr, uint32_t value) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(value) : "memory");
}
__device__ __forceinline__ void StoreSharedF32(uint32_t addr, float value) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(value) : "memory");
}
__device__ __forceinline__ float2 LoadSharedF32x2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}

// ---- Tensor cores ---------------------------------------------------------------------------

// d += a * b for one m16n8k16 tile: a 16x16 (row-major fragment, 4 regs), b 16x8 (column
// fragment, 2 regs), d 16x8 fp32 (4 regs). Fragment layouts: docs/kernels.md.
template <DType kDType>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (kDType == DType::kBF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(kDType == DType::kF16, "mma operands are bf16 or fp16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---- Scalars --------------------------------------------------------------------------------

// 2^x by the SFU (relative error ~2^-22; flushes subnormal results to 0; 2^-inf = +0).
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// e^x as 2^(x log2 e) by the SFU: the exponential the forward hands to Combine's code
// (CombineWith, softmax_state.h) in place of std::exp's accurate expf. Host-callable too
// (std::exp2), only so that CombineWith's host/device template accepts it.
struct Ex2Exp {
  __host__ __device__ __forceinline__ float operator()(float x) const {
#ifdef __CUDA_ARCH__
    return Exp2(x * kLog2e);
#else
    return std::exp2(x * kLog2e);
#endif
  }
};

__device__ __forceinline__ float NegInf() { return -std::numeric_limits<float>::infinity(); }

__device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

// `x` through a mov the compiler cannot see through: values derived from it are recomputed
// where used instead of being hoisted out of a loop and held in registers (docs/kernels.md,
// "Registers").
__device__ __forceinline__ uint32_t Opaque(uint32_t x) {
  uint32_t y;
  asm volatile("mov.b32 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}
__device__ __forceinline__ int64_t Opaque64(int64_t x) {
  int64_t y;
  asm volatile("mov.b64 %0, %1;\n" : "=l"(y) : "l"(x));
  return y;
}

}  // namespace flash
}  // namespace ringattn
