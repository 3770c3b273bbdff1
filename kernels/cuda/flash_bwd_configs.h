// The tilings the backward kernel (flash_bwd.cuh) is compiled with: a closed set per head dim,
// the first entry the default FlashBackward runs. Plain C++ (host and device).
//
// A CTA owns block_n keys of one (batch, K/V head) and walks the query blocks (block_m rows) of
// every query head of its GQA group that may see them. Its warps form key groups of 16 keys;
// the d_split warps of a group each hold d / d_split columns of the group's dK and dV
// accumulators (and each computes the group's S and dP: d_split > 1 repeats those two of the
// five products to keep dK + dV within the register file at large head dims).
//
// Registers per thread (fp32): dK + dV = 2 * (d / d_split) / 2, S^T and dP^T block_m / 2 each;
// at d 128, d_split 1, block_m 64: 64 + 64 + 32 + 32 = 192 before addresses.
// Shared memory: K and V [block_n, d], Q and dO [2][block_m, d] (double buffered), dS^T
// [block_n, block_m], lse and D [2][block_m] fp32.
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
  // major"), or key block slowest across all pairs. dQ is added by atomics into an fp32 buffer
  // of s * d * 4 bytes per query head; head major keeps the CTAs resident at one time on one
  // or two heads' dQ, which stays in L2 (50 MB), where key-block-slowest spreads them over
  // every head's: at b1 s32768 h32 d128 that is 512 MB and the atomics go to DRAM (129 TFLOP/s
  // non-causal against 207 causal, H100, first version).
  bool head_major;
};

// Names: n<block_n>_w<warps>[_s<d_split>][_c<ctas per SM>][_km: key-block-slowest grid].
template <int kHeadDim>
struct Tilings;

template <>
struct Tilings<64> {
  static constexpr Tiling kList[] = {
      // dK + dV 64, S + dP 64 registers; smem 8 + 8 + 16 + 16 + 8 = 57 KB: 3 CTAs per SM
      // (168 registers, 24 bytes of spills).
      {"n64_w4_c3", 64, 64, 4, 1, 3, true},
      {"n64_w4_c3_km", 64, 64, 4, 1, 3, false},
      {"n64_w4_c2", 64, 64, 4, 1, 2, true},
      {"n128_w8", 128, 64, 8, 1, 1, true},
  };
};

template <>
struct Tilings<128> {
  static constexpr Tiling kList[] = {
      // dK + dV 128, S + dP 64 registers; smem 16 + 16 + 32 + 32 + 8 = 105 KB: 2 CTAs per SM.
      {"n64_w4_c2", 64, 64, 4, 1, 2, true},
      {"n64_w4_c2_km", 64, 64, 4, 1, 2, false},
      {"n64_w4", 64, 64, 4, 1, 1, true},
      // 128 keys per CTA: half the dQ atomics of 64 (each CTA adds its dQ for every query
      // row it sees). Smem 32 + 32 + 64 + 16 = 144 KB, 1 CTA per SM.
      {"n128_w8", 128, 64, 8, 1, 1, true},
      // Two warps per key group: 64 + 64 registers, S and dP computed twice.
      {"n64_w8_s2", 64, 64, 8, 2, 1, true},
  };
};

template <>
struct Tilings<256> {
  static constexpr Tiling kList[] = {
      // dK + dV 128 (half the columns each), S + dP 64; smem 32 + 32 + 128 + 8 = 201 KB.
      {"n64_w8_s2", 64, 64, 8, 2, 1, true},
      {"n64_w8_s2_km", 64, 64, 8, 2, 1, false},
  };
};

template <int kHeadDim>
inline constexpr int kNumTilings = static_cast<int>(sizeof(Tilings<kHeadDim>::kList) /
                                                    sizeof(Tiling));

}  // namespace flash_bwd
}  // namespace ringattn
