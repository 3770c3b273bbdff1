// The tilings of the backward kernel: a closed table per head dim, row 0 the default that
// FlashBackward runs. A build compiles the default rows only, or every row with the CMake
// option RINGATTN_CUDA_ALL_TILINGS (kCompiledTilings, tiling_lookup.h). Plain C++ (host and
// device). Register and shared-memory budgets, measurements: docs/performance_notes.md.
//
// A CTA owns block_n keys of one (batch, K/V head) and walks the query blocks (block_m rows) of
// every query head of its GQA group that may see them. Its warps form key groups of 16 keys;
// the d_split warps of a group each hold d / d_split columns of the group's dK and dV (and each
// computes the group's S and dP).
#pragma once

namespace ringattn {
namespace flash_bwd {

struct Tiling {
  const char* name;     // unique within a head dim
  int block_n;          // keys per CTA (16 per key group)
  int block_m;          // query rows per inner step (64: dS^T rows are 8 swizzled chunks)
  int warps;            // per CTA: (block_n / 16) key groups x d_split
  int d_split;          // warps per key group, splitting dK/dV's columns
  int min_ctas_per_sm;  // __launch_bounds__ minimum (the register cap 64 K / (threads * this))
  // Grid order: every key block of one (batch, K/V head) before the next pair's ("head
  // major", which keeps the resident CTAs' fp32 dQ in L2), or key block slowest across all
  // pairs (KeyBlockOf).
  bool head_major;
};

// Names: n<block_n>_w<warps>[_s<d_split>][_c<ctas per SM>][_km: key-block-slowest grid].
template <int kHeadDim>
struct Tilings;

template <>
struct Tilings<64> {
  // clang-format off
  static constexpr Tiling kList[] = {
      // Smem 8 + 8 + 16 + 16 + 8 = 57 KB: 3 CTAs per SM.
      {.name = "n64_w4_c3", .block_n = 64, .block_m = 64, .warps = 4, .d_split = 1,
       .min_ctas_per_sm = 3, .head_major = true},
      {.name = "n64_w4_c3_km", .block_n = 64, .block_m = 64, .warps = 4, .d_split = 1,
       .min_ctas_per_sm = 3, .head_major = false},
      {.name = "n64_w4_c2", .block_n = 64, .block_m = 64, .warps = 4, .d_split = 1,
       .min_ctas_per_sm = 2, .head_major = true},
      {.name = "n128_w8", .block_n = 128, .block_m = 64, .warps = 8, .d_split = 1,
       .min_ctas_per_sm = 1, .head_major = true},
  };
  // clang-format on
};

template <>
struct Tilings<128> {
  // clang-format off
  static constexpr Tiling kList[] = {
      // Smem 16 + 16 + 32 + 32 + 8 = 105 KB: 2 CTAs per SM.
      {.name = "n64_w4_c2", .block_n = 64, .block_m = 64, .warps = 4, .d_split = 1,
       .min_ctas_per_sm = 2, .head_major = true},
      {.name = "n64_w4_c2_km", .block_n = 64, .block_m = 64, .warps = 4, .d_split = 1,
       .min_ctas_per_sm = 2, .head_major = false},
      {.name = "n64_w4", .block_n = 64, .block_m = 64, .warps = 4, .d_split = 1,
       .min_ctas_per_sm = 1, .head_major = true},
      // Half the dQ atomics of 64 keys per CTA. Smem 32 + 32 + 64 + 16 = 144 KB.
      {.name = "n128_w8", .block_n = 128, .block_m = 64, .warps = 8, .d_split = 1,
       .min_ctas_per_sm = 1, .head_major = true},
      // Two warps per key group: S and dP computed twice.
      {.name = "n64_w8_s2", .block_n = 64, .block_m = 64, .warps = 8, .d_split = 2,
       .min_ctas_per_sm = 1, .head_major = true},
  };
  // clang-format on
};

template <>
struct Tilings<256> {
  // clang-format off
  static constexpr Tiling kList[] = {
      // dK + dV in half the columns each. Smem 32 + 32 + 128 + 8 = 201 KB.
      {.name = "n64_w8_s2", .block_n = 64, .block_m = 64, .warps = 8, .d_split = 2,
       .min_ctas_per_sm = 1, .head_major = true},
      {.name = "n64_w8_s2_km", .block_n = 64, .block_m = 64, .warps = 8, .d_split = 2,
       .min_ctas_per_sm = 1, .head_major = false},
  };
  // clang-format on
};

}  // namespace flash_bwd
}  // namespace ringattn
