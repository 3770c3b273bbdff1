// The fast CPU forward: blocked online softmax (FlashAttention's schedule on a CPU), fp32
// accumulation, work split over a thread pool by (batch, head, query block).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/attention_params.h"
#include "kernels/dtype.h"  // BitsFloat

namespace ringattn {

struct FlashCpuOptions {
  int num_threads = 0;  // 0: std::thread::hardware_concurrency()
  // Polled between blocks (the forward: every block of 64 keys of a block of 64 queries; the
  // backward: every query block of a key block); once true the call stops and returns
  // CANCELLED, its outputs partly written. Null: never.
  const std::atomic<bool>* cancel = nullptr;
};

// Whether `cancel` (FlashCpuOptions::cancel) is set.
inline bool Cancelled(const std::atomic<bool>* cancel) {
  return cancel != nullptr && cancel->load(std::memory_order_relaxed);
}

// Computes `p` (validated first). Writes o in p.o_dtype and the fp32 lse when p.lse is set, or
// merges into fp32 o and lse with p.merge_into_output. CANCELLED when options.cancel is set.
absl::Status FlashCpuForward(const AttentionParams& p, const FlashCpuOptions& options = {});

// Writes one finished query row (batch b, head h, row `row`) of a call into p.o / p.lse: its
// normalised output and LSE (-inf for a fully masked row, whose o_row must be zeros). Without
// merge_into_output it stores o in p.o_dtype and the LSE when p.lse is set; with it, it merges
// into the fp32 partial already there by MergeLse (a fully masked row leaves that partial
// untouched); with p.partial_o it merges with that read-only partial and stores the result as
// without merge_into_output. Shared by the fast kernel and the reference backend so both write and merge alike.
void WriteOutputRow(const AttentionParams& p, int b, int h, int64_t row,
                    const float* o_row,  // [head_dim]
                    float lse);

// ---- Kernel internals, declared here so that their tests can call them ----------------------

// F16ToFloat (dtype.h) without branches, so that the kernel's fp16 staging loops vectorise
// (with the branches, fp16 inputs ran ~30% slower than fp32 or bf16). Bit-identical to
// F16ToFloat for all 65536 inputs (tested exhaustively). Every case is computed and the
// result picked by integer masks.
inline float F16ToFloatBranchless(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t magnitude = h & 0x7fffu;  // exponent and mantissa
  // Normal: rebias the exponent from 15 to 127 (add 112 << 23) and widen the mantissa.
  const uint32_t normal = (magnitude << 13) + (112u << 23);
  // Infinity / NaN (exponent 31): exponent 255, mantissa (NaN payload) kept.
  const uint32_t inf_nan = (magnitude << 13) | 0x7f800000u;
  // Zero / subnormal (exponent 0): mantissa * 2^-24, computed exactly as
  // (0.5 + mantissa * 2^-24) - 0.5, since the float 0.5 has a last-place value of 2^-24.
  const uint32_t subnormal = FloatBits(BitsFloat(0x3f000000u + magnitude) - 0.5f);
  // Blended with all-ones / all-zeros masks rather than ?:, which GCC turns into branches
  // around the float subtraction above and then will not if-convert (it may trap).
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(magnitude < 0x0400u);
  const uint32_t is_inf_nan = 0u - static_cast<uint32_t>(magnitude >= 0x7c00u);
  const uint32_t finite = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  return BitsFloat(sign | (inf_nan & is_inf_nan) | (finite & ~is_inf_nan));
}

// exp(x) as the kernel computes the softmax's exp(score - row max), x <= 0 or -inf. Written so
// that a loop over it vectorises: no calls and no branches (glibc's expf is one call per
// score, about a third of the kernel's time at head_dim 64). Range reduction x = n ln2 + r with
// |r| <= ln2 / 2 (Cody-Waite, two-part ln2), e^r by its degree-7 Taylor polynomial (truncation
// below 6e-9 relative), 2^n by writing the float's exponent field. Within a few ulp of exp on
// [-87, 87] (tested); 0 below -87, where exp(x) < 2^-125 is negligible next to the row
// maximum's exp(0) = 1, and for -inf (masked keys contribute exactly nothing); NaN stays NaN;
// above 87 (outside the softmax's use) it returns exp(87). Declared here for its test.
inline float ExpForSoftmax(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693115234375f;        // 12 significant bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = 3.19461849452862e-05f;  // ln 2 - kLn2Hi
  constexpr float kRoundMagic = 12582912.0f;       // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLimit = 87.0f;                  // |argument| range kept
  // No branches and no float compare-and-select on the argument: GCC turns those into jumps
  // (then refuses to if-convert arithmetic that may trap) and the loop stays scalar. |x| is
  // clamped to kLimit as an integer min on its bits, so 2^n below stays a normal float and
  // the conversion to int is defined for every input, NaN and infinities included.
  const uint32_t bits = FloatBits(x);
  const uint32_t magnitude = std::min(bits & 0x7fffffffu, FloatBits(kLimit));
  const float xc = BitsFloat((bits & 0x80000000u) | magnitude);
  const float n = (xc * kLog2e + kRoundMagic) - kRoundMagic;  // round(xc / ln2), in [-126, 126]
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float two_to_n = BitsFloat(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  // The special cases, by selecting constants and by arithmetic: 0 below -kLimit (and for
  // -inf); NaN added back so that it propagates.
  const float keep = x < -kLimit ? 0.0f : 1.0f;
  const float nan_or_zero = x != x ? x : 0.0f;
  return p * two_to_n * keep + nan_or_zero;
}

}  // namespace ringattn
