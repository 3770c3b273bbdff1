// The tilings the fast forward kernel (flash_fwd.cuh) is compiled with: a closed set per head
// dim, the first entry of each the default that FlashForward runs. Plain C++ (host and device):
// the host dispatch lists and names them, the kernel reads its constants from them.
//
// Every entry is compiled for bf16 and fp16 and tested (flash_fwd_config_test.cc runs each against
// the simple kernel; RINGATTN_FLASH_FWD_CONFIG=<name> runs the whole cuda_backend_test on one).
// gpu_kernel_bench times every entry at the ANCHORS.md shapes, so the choice of the default is
// a measurement: see docs/performance_notes.md for the prediction behind each entry.
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
  // Grid in longest-first order across all (batch, head) pairs (else v1's: per pair); see
  // QueryBlockOf in flash_fwd.cuh. Matters under causal masks.
  bool global_heavy_first;
};

// Names: <warps>x<rows per warp>_n<block_n>, then what differs from the default of that layout:
// qr (Q in registers), s3 (3 stages), c2/c3 (CTAs per SM asked of ptxas), 2bar (two barriers),
// expf (Combine with std::exp), v1grid (v1's grid order). "v1" is the first version's tiling and
// schedule (8 warps of 16 rows, Q in registers up to d 128, two barriers, std::exp Combine, 1 CTA
// per SM, heaviest query block first per (batch, head)); the code generation changes of this
// version (LoadTile, ldmatrix addressing, score mods as a compile- time switch) apply to it too:
// 225 instead of 247 registers at d 128.
//
// Register budget per thread (fp32): S = rows/16 * block_n/2, O = rows/16 * d/2, Q in registers
// rows/16 * d/4 (32-bit pairs); ptxas -v numbers per entry in docs/performance_notes.md.
template <int kHeadDim>
struct Tilings;

template <>
struct Tilings<64> {
  static constexpr Tiling kList[] = {
      // FlashAttention-2's d 64 forward tile: S 128 + O 64, Q from smem. Smem 16 + 64 = 80 KB.
      {"4x32_n128", 128, 128, 4, false, 2, 2, true, true, true},
      // The default with v1's grid order.
      {"4x32_n128_v1grid", 128, 128, 4, false, 2, 2, true, true, false},
      {"v1", 128, 128, 8, true, 2, 1, false, false, false},
      // S 64 + O 64 + Q 32 registers; smem 16 + 32 = 48 KB.
      {"4x32_n64_qr", 128, 64, 4, true, 2, 2, true, true, true},
      // 3 stages: 16 + 96 = 112 KB, still 2 CTAs per SM (226 of 228 KB with the reserve).
      {"4x32_n128_s3", 128, 128, 4, false, 3, 2, true, true, true},
      // v1's layout with 2 CTAs per SM (128-register cap): S 32 + O 32 + Q 16.
      {"v1_n64_c2", 128, 64, 8, true, 2, 2, false, false, false},
      // The default's warps at 256 rows per CTA, 1 CTA per SM: half the K/V traffic from L2
      // per FLOP, the same shared-memory traffic. Smem 32 + 64 = 96 KB.
      {"8x32_n128", 256, 128, 8, false, 2, 1, true, true, true},
  };
};

template <>
struct Tilings<128> {
  static constexpr Tiling kList[] = {
      // FlashAttention-2's d 128 forward tile: 4 warps of 32 rows, S 64 + O 128, Q from smem.
      // Smem 32 + 64 = 96 KB: 2 CTAs per SM.
      {"4x32_n64", 128, 64, 4, false, 2, 2, true, true, true},
      {"v1", 128, 64, 8, true, 2, 1, false, false, false},
      // The default with one lever reverted each: the exp in Combine, the second barrier, the
      // grid order.
      {"4x32_n64_expf", 128, 64, 4, false, 2, 2, true, false, true},
      {"4x32_n64_2bar", 128, 64, 4, false, 2, 2, false, true, true},
      {"4x32_n64_v1grid", 128, 64, 4, false, 2, 2, true, true, false},
      // 3 stages: 32 + 96 = 128 KB, so 1 CTA per SM.
      {"4x32_n64_s3", 128, 64, 4, false, 3, 1, true, true, true},
      // v1's layout with twice the keys per step: S 64 + O 64 + Q 32; smem 32 + 128 = 160 KB.
      {"v1_n128", 128, 128, 8, true, 2, 1, false, false, false},
      // The default's warps at 256 rows per CTA, 1 CTA per SM: half the K/V traffic from L2
      // per FLOP, the same shared-memory traffic. Smem 64 + 64 = 128 KB.
      {"8x32_n64", 256, 64, 8, false, 2, 1, true, true, true},
  };
};

template <>
struct Tilings<256> {
  static constexpr Tiling kList[] = {
      // O alone takes 128 registers: 16 rows per warp, Q from smem. Smem 64 + 64 = 128 KB.
      {"v1", 128, 32, 8, false, 2, 1, false, false, false},
  };
};

template <int kHeadDim>
inline constexpr int kNumTilings = static_cast<int>(sizeof(Tilings<kHeadDim>::kList) /
                                                    sizeof(Tiling));

}  // namespace flash_fwd
}  // namespace ringattn
