// Element types of attention tensors and their scalar conversions (host and device).
//
// fp16 and bf16 conversions are written out bit by bit so that the CPU backend needs no
// compiler extension; round-to-nearest-even, NaN and infinity preserved.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

#if defined(__CUDACC__)
#define RA_HD __host__ __device__ __forceinline__
#else
#define RA_HD inline
#endif

namespace ringattn {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline constexpr int DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

inline constexpr std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "fp32";
    case DType::kF16: return "fp16";
    case DType::kBF16: return "bf16";
  }
  return "unknown";
}

RA_HD uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

RA_HD float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

RA_HD float Bf16ToFloat(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }

RA_HD uint16_t FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

RA_HD float F16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    if (mant == 0) return BitsFloat(sign);
    // Subnormal: value = mant * 2^-24.
    float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
}

RA_HD uint16_t FloatToF16(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;        // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;       // rounds to inf (>= 65520)
  if (abs < 0x38800000u) {                             // below the smallest normal, 2^-14
    // Subnormal or zero: round abs / 2^-24 to nearest even integer.
    const float v = BitsFloat(abs) * 16777216.0f;      // exact scaling by 2^24
    float r = v + 12582912.0f;                         // 1.5 * 2^23 forces integer rounding
    r -= 12582912.0f;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t e = (abs >> 23) - 112u;
  uint32_t m = abs & 0x7fffffu;
  uint32_t h = (e << 10) | (m >> 13);
  const uint32_t rest = m & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent
  return sign | static_cast<uint16_t>(h);
}

// Loads element i of a buffer of type `t` as float.
RA_HD float LoadAsFloat(const void* base, int64_t i, DType t) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(base)[i];
    case DType::kF16: return F16ToFloat(static_cast<const uint16_t*>(base)[i]);
    case DType::kBF16: return Bf16ToFloat(static_cast<const uint16_t*>(base)[i]);
  }
  return 0.0f;
}

// Stores a float as element i of a buffer of type `t`.
RA_HD void StoreFromFloat(void* base, int64_t i, DType t, float x) {
  switch (t) {
    case DType::kF32: static_cast<float*>(base)[i] = x; return;
    case DType::kF16: static_cast<uint16_t*>(base)[i] = FloatToF16(x); return;
    case DType::kBF16: static_cast<uint16_t*>(base)[i] = FloatToBf16(x); return;
  }
}

// Rounds a float through type `t` and back (what storing it would keep).
RA_HD float RoundThrough(float x, DType t) {
  switch (t) {
    case DType::kF32: return x;
    case DType::kF16: return F16ToFloat(FloatToF16(x));
    case DType::kBF16: return Bf16ToFloat(FloatToBf16(x));
  }
  return x;
}

}  // namespace ringattn
