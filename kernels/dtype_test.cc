// The fp16 / bf16 conversions of dtype.h: exhaustive round trips over every 16-bit pattern,
// round-to-nearest-even at every rounding boundary, overflow, subnormals and NaN. Expected
// values come from an independent decoder (ldexp on the fields) and from arithmetic on
// neighbouring representable values, not from the functions under test.
#include "kernels/dtype.h"

#include <cmath>
#include <cstdint>
#include <limits>

#include "gtest/gtest.h"

namespace ringattn {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- Independent decoders -------------------------------------------------------------------

// Value of an fp16 bit pattern from its fields, in double (exact).
double DecodeF16(uint16_t h) {
  const int sign = h >> 15;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  double v;
  if (exp == 0x1f) {
    v = mant == 0 ? std::numeric_limits<double>::infinity()
                  : std::numeric_limits<double>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(mant, -24);  // subnormal: mant * 2^-24
  } else {
    v = std::ldexp(1024 + mant, exp - 25);  // (1.mant) * 2^(exp - 15)
  }
  return sign ? -v : v;
}

// Value of a bf16 bit pattern from its fields, in double (exact).
double DecodeBf16(uint16_t h) {
  const int sign = h >> 15;
  const int exp = (h >> 7) & 0xff;
  const int mant = h & 0x7f;
  double v;
  if (exp == 0xff) {
    v = mant == 0 ? std::numeric_limits<double>::infinity()
                  : std::numeric_limits<double>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(mant, -133);  // subnormal: mant * 2^-126 * 2^-7
  } else {
    v = std::ldexp(128 + mant, exp - 134);  // (1.mant) * 2^(exp - 127)
  }
  return sign ? -v : v;
}

bool IsF16Nan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }
bool IsBf16Nan(uint16_t h) { return (h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0; }

// ---- Exhaustive round trips -----------------------------------------------------------------

TEST(DTypeTest, F16ToFloatMatchesFieldDecodeForAllPatterns) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = F16ToFloat(h);
    const double want = DecodeF16(h);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << bits;
    } else {
      ASSERT_EQ(static_cast<double>(f), want) << std::hex << bits;
      ASSERT_EQ(std::signbit(f), (bits & 0x8000) != 0) << std::hex << bits;  // -0 stays -0
    }
  }
}

TEST(DTypeTest, F16RoundTripsThroughFloatForAllPatterns) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const uint16_t back = FloatToF16(F16ToFloat(h));
    if (IsF16Nan(h)) {
      ASSERT_TRUE(IsF16Nan(back)) << std::hex << bits;  // the payload need not survive
    } else {
      ASSERT_EQ(back, h) << std::hex << bits;
    }
  }
}

TEST(DTypeTest, Bf16ToFloatMatchesFieldDecodeForAllPatterns) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = Bf16ToFloat(h);
    const double want = DecodeBf16(h);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << bits;
    } else {
      ASSERT_EQ(static_cast<double>(f), want) << std::hex << bits;
      ASSERT_EQ(std::signbit(f), (bits & 0x8000) != 0) << std::hex << bits;
    }
  }
}

TEST(DTypeTest, Bf16RoundTripsThroughFloatForAllPatterns) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const uint16_t back = FloatToBf16(Bf16ToFloat(h));
    if (IsBf16Nan(h)) {
      ASSERT_TRUE(IsBf16Nan(back)) << std::hex << bits;
    } else {
      ASSERT_EQ(back, h) << std::hex << bits;
    }
  }
}

// ---- Rounding at every boundary -------------------------------------------------------------

// For every pair of adjacent non-negative fp16 values (lo, hi), the float halfway between
// them must round to the one with an even mantissa, and the floats just below and above the
// midpoint to lo and hi. The midpoint needs 12 significant bits, so it is exact in float. The
// last pair is (65504, the would-be 65536), whose midpoint 65520 must round to infinity.
TEST(DTypeTest, FloatToF16RoundsToNearestEvenAtEveryBoundary) {
  for (uint32_t lo = 0; lo < 0x7c00; ++lo) {
    const uint32_t hi = lo + 1;
    const double hi_value = hi == 0x7c00 ? 65536.0 : DecodeF16(static_cast<uint16_t>(hi));
    const float mid = static_cast<float>((DecodeF16(static_cast<uint16_t>(lo)) + hi_value) / 2);
    const uint16_t even = static_cast<uint16_t>((lo & 1) == 0 ? lo : hi);
    for (const float sign : {1.0f, -1.0f}) {
      const uint16_t sign_bit = sign < 0 ? 0x8000 : 0;
      ASSERT_EQ(FloatToF16(sign * mid), even | sign_bit) << std::hex << lo;
      ASSERT_EQ(FloatToF16(sign * std::nextafter(mid, 0.0f)), lo | sign_bit) << std::hex << lo;
      ASSERT_EQ(FloatToF16(sign * std::nextafter(mid, kInf)), hi | sign_bit) << std::hex << lo;
    }
  }
}

// The same for bf16. The midpoint between bf16 values lo and lo + 1 is the float whose bits
// are (lo << 16) | 0x8000 (within lo's binade), so every boundary is reached by bit patterns.
TEST(DTypeTest, FloatToBf16RoundsToNearestEvenAtEveryBoundary) {
  for (uint32_t lo = 0; lo < 0x7f80; ++lo) {
    const uint32_t hi = lo + 1;
    const uint32_t even = (lo & 1) == 0 ? lo : hi;
    for (const uint32_t sign : {0u, 0x8000u}) {
      const uint32_t mid_bits = ((lo | sign) << 16) | 0x8000u;
      ASSERT_EQ(FloatToBf16(BitsFloat(mid_bits)), even | sign) << std::hex << lo;
      ASSERT_EQ(FloatToBf16(BitsFloat(mid_bits - 1)), lo | sign) << std::hex << lo;
      ASSERT_EQ(FloatToBf16(BitsFloat(mid_bits + 1)), hi | sign) << std::hex << lo;
    }
  }
}

TEST(DTypeTest, F16RoundingCases) {
  EXPECT_EQ(FloatToF16(1.0f), 0x3c00);
  EXPECT_EQ(FloatToF16(1.0f + 0x1p-11f), 0x3c00);             // tie, to even (down)
  EXPECT_EQ(FloatToF16(1.0f + 3 * 0x1p-11f), 0x3c02);         // tie, to even (up)
  EXPECT_EQ(FloatToF16(1.0f + 0x1p-11f + 0x1p-23f), 0x3c01);  // just above the tie
  EXPECT_EQ(FloatToF16(-2.5f), 0xc100);
  EXPECT_EQ(FloatToF16(0.1f), 0x2e66);  // 0.0999755859375
}

TEST(DTypeTest, Bf16RoundingCases) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(1.0f + 0x1p-8f), 0x3f80);             // tie, to even (down)
  EXPECT_EQ(FloatToBf16(1.0f + 3 * 0x1p-8f), 0x3f82);         // tie, to even (up)
  EXPECT_EQ(FloatToBf16(1.0f + 0x1p-8f + 0x1p-23f), 0x3f81);  // just above the tie
  EXPECT_EQ(FloatToBf16(-2.5f), 0xc020);
  EXPECT_EQ(FloatToBf16(0.1f), 0x3dcd);  // 0.10009765625
}

// ---- Overflow, infinities, NaN --------------------------------------------------------------

TEST(DTypeTest, F16OverflowsToInfinity) {
  EXPECT_EQ(FloatToF16(65504.0f), 0x7bff);   // largest finite
  EXPECT_EQ(FloatToF16(65519.99f), 0x7bff);  // below the tie
  EXPECT_EQ(FloatToF16(65520.0f), 0x7c00);   // tie rounds up to inf
  EXPECT_EQ(FloatToF16(1e6f), 0x7c00);
  EXPECT_EQ(FloatToF16(-1e6f), 0xfc00);
  EXPECT_EQ(FloatToF16(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(FloatToF16(kInf), 0x7c00);
  EXPECT_EQ(FloatToF16(-kInf), 0xfc00);
  EXPECT_EQ(F16ToFloat(0x7c00), kInf);
  EXPECT_EQ(F16ToFloat(0xfc00), -kInf);
}

TEST(DTypeTest, Bf16OverflowsToInfinity) {
  EXPECT_EQ(FloatToBf16(BitsFloat(0x7f7f0000u)), 0x7f7f);             // largest finite bf16
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to inf
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::max()), 0xff80);
  EXPECT_EQ(FloatToBf16(kInf), 0x7f80);
  EXPECT_EQ(FloatToBf16(-kInf), 0xff80);
}

TEST(DTypeTest, NanStaysNan) {
  const float quiet = std::numeric_limits<float>::quiet_NaN();
  const float signaling = BitsFloat(0x7f800001u);  // mantissa bits only in the low half
  const float negative = BitsFloat(0xffc00000u);
  for (float nan : {quiet, signaling, negative}) {
    EXPECT_TRUE(IsF16Nan(FloatToF16(nan))) << std::hex << FloatBits(nan);
    // Truncating 0x7f800001 to bf16 would give 0x7f80, infinity; the quiet bit prevents it.
    EXPECT_TRUE(IsBf16Nan(FloatToBf16(nan))) << std::hex << FloatBits(nan);
    EXPECT_TRUE(std::isnan(RoundThrough(nan, DType::kF16)));
    EXPECT_TRUE(std::isnan(RoundThrough(nan, DType::kBF16)));
  }
}

// ---- Subnormals -----------------------------------------------------------------------------

TEST(DTypeTest, F16Subnormals) {
  EXPECT_EQ(F16ToFloat(0x0001), 0x1p-24f);         // smallest subnormal
  EXPECT_EQ(F16ToFloat(0x03ff), 1023 * 0x1p-24f);  // largest subnormal
  EXPECT_EQ(F16ToFloat(0x0400), 0x1p-14f);         // smallest normal
  EXPECT_EQ(F16ToFloat(0x8001), -0x1p-24f);
  EXPECT_EQ(FloatToF16(0x1p-24f), 0x0001);
  EXPECT_EQ(FloatToF16(0x1p-25f), 0x0000);                // tie with 0, to even
  EXPECT_EQ(FloatToF16(0x1p-25f + 0x1p-40f), 0x0001);     // just above the tie
  EXPECT_EQ(FloatToF16(3 * 0x1p-25f), 0x0002);            // tie between 1 and 2, to even
  EXPECT_EQ(FloatToF16(0x1p-14f - 0x1p-25f), 0x0400);     // tie 0x3ff / 0x400, to even
  EXPECT_EQ(FloatToF16(0x1p-30f), 0x0000);                // underflows to zero
  EXPECT_EQ(FloatToF16(-0x1p-30f), 0x8000);               // keeps its sign
  EXPECT_EQ(FloatToF16(BitsFloat(0x00000001u)), 0x0000);  // float subnormal
  EXPECT_EQ(FloatToF16(-0.0f), 0x8000);
}

TEST(DTypeTest, Bf16Subnormals) {
  EXPECT_EQ(Bf16ToFloat(0x0001), BitsFloat(0x00010000u));  // float subnormals are exact
  EXPECT_EQ(FloatToBf16(BitsFloat(0x00010000u)), 0x0001);
  EXPECT_EQ(FloatToBf16(BitsFloat(0x00008000u)), 0x0000);  // tie with 0, to even
  EXPECT_EQ(FloatToBf16(BitsFloat(0x00018000u)), 0x0002);  // tie between 1 and 2, to even
  EXPECT_EQ(FloatToBf16(BitsFloat(0x00000001u)), 0x0000);
  EXPECT_EQ(FloatToBf16(BitsFloat(0x007fffffu)), 0x0080);  // rounds up to the smallest normal
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
}

// ---- Buffer accessors -----------------------------------------------------------------------

TEST(DTypeTest, LoadStoreAndRoundThroughAgree) {
  uint16_t half[3] = {};
  float single[3] = {};
  const float values[3] = {0.1f, -3.14159f, 1e5f};
  for (int i = 0; i < 3; ++i) {
    StoreFromFloat(half, i, DType::kF16, values[i]);
    EXPECT_EQ(LoadAsFloat(half, i, DType::kF16), RoundThrough(values[i], DType::kF16));
    StoreFromFloat(half, i, DType::kBF16, values[i]);
    EXPECT_EQ(LoadAsFloat(half, i, DType::kBF16), RoundThrough(values[i], DType::kBF16));
    StoreFromFloat(single, i, DType::kF32, values[i]);
    EXPECT_EQ(LoadAsFloat(single, i, DType::kF32), values[i]);
  }
  EXPECT_EQ(RoundThrough(1e5f, DType::kF16), kInf);  // beyond fp16's range
  EXPECT_EQ(DTypeSize(DType::kF32), 4);
  EXPECT_EQ(DTypeSize(DType::kF16), 2);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2);
  EXPECT_EQ(DTypeName(DType::kBF16), "bf16");
}

}  // namespace
}  // namespace ringattn
