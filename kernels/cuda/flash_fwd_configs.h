// The tilings of the fast forward kernel: a closed table per head dim, row 0 the default that
// FlashForward runs. A build compiles the default rows only, or every row with the CMake option
// RINGATTN_CUDA_ALL_TILINGS (kCompiledTilings, tiling_lookup.h). Plain C++ (host and device):
// the host dispatch lists and names the rows, the kernel reads its constants from them
// (FlashFwdTraits). The prediction behind each row and its measurements:
// docs/performance_notes.md.
#pragma once

namespace ringattn {
namespace flash_fwd {

struct Tiling {
  const char* name;     // unique within a head dim; "v1" is the first version's tiling everywhere
  int block_m;          // query rows per CTA
  int block_n;          // keys per pipeline step
  int warps;            // warps per CTA; each owns block_m / warps rows (16 or 32: m16 tiles)
  bool q_in_regs;       // Q's mma fragments held in registers, or re-read from shared memory
  int stages;           // K/V shared-memory buffers (cp.async pipeline depth)
  int min_ctas_per_sm;  // __launch_bounds__ minimum: the register cap 64 K / (threads * this)
  bool one_barrier;     // one __syncthreads per key block (else v1's two)
  bool ex2_combine;     // Combine's code with ex2.approx (CombineWith) instead of std::exp
  bool global_heavy_first;  // grid order across all (batch, head) pairs (QueryBlockOf)
};

// Names: <warps>x<rows per warp>_n<block_n>, then what differs from that layout's default:
// qr (Q in registers), s3 (3 stages), c2 (2 CTAs per SM asked of ptxas), 2bar (two barriers),
// expf (Combine with std::exp), v1grid (v1's grid order). "v1": 8 warps of 16 rows, Q in
// registers up to d 128, two barriers, std::exp Combine, 1 CTA per SM, v1's grid order.
template <int kHeadDim>
struct Tilings;

template <>
struct Tilings<64> {
  // clang-format off
  static constexpr Tiling kList[] = {
      // FlashAttention-2's d 64 forward tile. Smem 16 + 64 = 80 KB.
      {.name = "4x32_n128", .block_m = 128, .block_n = 128, .warps = 4, .q_in_regs = false,
       .stages = 2, .min_ctas_per_sm = 2, .one_barrier = true, .ex2_combine = true,
       .global_heavy_first = true},
      {.name = "4x32_n128_v1grid", .block_m = 128, .block_n = 128, .warps = 4, .q_in_regs = false,
       .stages = 2, .min_ctas_per_sm = 2, .one_barrier = true, .ex2_combine = true,
       .global_heavy_first = false},
      {.name = "v1", .block_m = 128, .block_n = 128, .warps = 8, .q_in_regs = true, .stages = 2,
       .min_ctas_per_sm = 1, .one_barrier = false, .ex2_combine = false,
       .global_heavy_first = false},
      // Smem 16 + 32 = 48 KB.
      {.name = "4x32_n64_qr", .block_m = 128, .block_n = 64, .warps = 4, .q_in_regs = true,
       .stages = 2, .min_ctas_per_sm = 2, .one_barrier = true, .ex2_combine = true,
       .global_heavy_first = true},
      // Smem 16 + 96 = 112 KB: still 2 CTAs per SM (226 of 228 KB with the reserve).
      {.name = "4x32_n128_s3", .block_m = 128, .block_n = 128, .warps = 4, .q_in_regs = false,
       .stages = 3, .min_ctas_per_sm = 2, .one_barrier = true, .ex2_combine = true,
       .global_heavy_first = true},
      // v1's layout under a 128-register cap.
      {.name = "v1_n64_c2", .block_m = 128, .block_n = 64, .warps = 8, .q_in_regs = true,
       .stages = 2, .min_ctas_per_sm = 2, .one_barrier = false, .ex2_combine = false,
       .global_heavy_first = false},
      // The default's warps at 256 rows per CTA. Smem 32 + 64 = 96 KB.
      {.name = "8x32_n128", .block_m = 256, .block_n = 128, .warps = 8, .q_in_regs = false,
       .stages = 2, .min_ctas_per_sm = 1, .one_barrier = true, .ex2_combine = true,
       .global_heavy_first = true},
  };
  // clang-format on
};

template <>
struct Tilings<128> {
  // clang-format off
  static constexpr Tiling kList[] = {
      // FlashAttention-2's d 128 forward tile. Smem 32 + 64 = 96 KB: 2 CTAs per SM.
      {.name = "4x32_n64", .block_m = 128, .block_n = 64, .warps = 4, .q_in_regs = false,
       .stages = 2, .min_ctas_per_sm = 2, .one_barrier = true, .ex2_combine = true,
       .global_heavy_first = true},
      {.name = "v1", .block_m = 128, .block_n = 64, .warps = 8, .q_in_regs = true, .stages = 2,
       .min_ctas_per_sm = 1, .one_barrier = false, .ex2_combine = false,
       .global_heavy_first = false},
      // The default with one lever reverted each.
      {.name = "4x32_n64_expf", .block_m = 128, .block_n = 64, .warps = 4, .q_in_regs = false,
       .stages = 2, .min_ctas_per_sm = 2, .one_barrier = true, .ex2_combine = false,
       .global_heavy_first = true},
      {.name = "4x32_n64_2bar", .block_m = 128, .block_n = 64, .warps = 4, .q_in_regs = false,
       .stages = 2, .min_ctas_per_sm = 2, .one_barrier = false, .ex2_combine = true,
       .global_heavy_first = true},
      {.name = "4x32_n64_v1grid", .block_m = 128, .block_n = 64, .warps = 4, .q_in_regs = false,
       .stages = 2, .min_ctas_per_sm = 2, .one_barrier = true, .ex2_combine = true,
       .global_heavy_first = false},
      // Smem 32 + 96 = 128 KB: 1 CTA per SM.
      {.name = "4x32_n64_s3", .block_m = 128, .block_n = 64, .warps = 4, .q_in_regs = false,
       .stages = 3, .min_ctas_per_sm = 1, .one_barrier = true, .ex2_combine = true,
       .global_heavy_first = true},
      // v1's layout with twice the keys per step. Smem 32 + 128 = 160 KB.
      {.name = "v1_n128", .block_m = 128, .block_n = 128, .warps = 8, .q_in_regs = true,
       .stages = 2, .min_ctas_per_sm = 1, .one_barrier = false, .ex2_combine = false,
       .global_heavy_first = false},
      // The default's warps at 256 rows per CTA. Smem 64 + 64 = 128 KB.
      {.name = "8x32_n64", .block_m = 256, .block_n = 64, .warps = 8, .q_in_regs = false,
       .stages = 2, .min_ctas_per_sm = 1, .one_barrier = true, .ex2_combine = true,
       .global_heavy_first = true},
  };
  // clang-format on
};

template <>
struct Tilings<256> {
  // clang-format off
  static constexpr Tiling kList[] = {
      // O alone takes 128 registers: 16 rows per warp, Q from smem. Smem 64 + 64 = 128 KB.
      {.name = "v1", .block_m = 128, .block_n = 32, .warps = 8, .q_in_regs = false, .stages = 2,
       .min_ctas_per_sm = 1, .one_barrier = false, .ex2_combine = false,
       .global_heavy_first = false},
  };
  // clang-format on
};

}  // namespace flash_fwd
}  // namespace ringattn
