// The non-finite guard (see non_finite_guard.h): the input scan and the guarded forward.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/cuda/non_finite_guard.h"

#include <cstdlib>
#include <cstring>
#include "kernels/cuda/reference_attention.h"
#include "kernels/dtype.h"
#include "kernels/score_mod.h"

namespace ringattn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;             // 16-byte loads in flight per thread
constexpr int64_t kMaxBlocksX = 1024;  // per tensor; the grid strides beyond
constexpr int kTensors = 3;            // q, k, v: blockIdx.y

// scratch words (non_finite_guard.h): [0..2] the largest magnitude bits of q, k, v (16-bit
// patterns with the sign cleared: integers in the order of the values, NaN above infinity);
// [3] blocks finished; kGuardCarefulWord the decision.
constexpr int kDoneWord = 3;
static_assert(kGuardCarefulWord > kDoneWord && kGuardCarefulWord < kGuardWords);

// One of q, k, v: n[0] x n[1] x n[2] rows (strides in elements) of `len` contiguous 16-bit
// elements; len % 8 == 0, base and strides 16-byte aligned. Collapsed on the host where rows
// are contiguous (a dense tensor is one row).
struct ScanTensor {
  const uint16_t* base = nullptr;
  int64_t n[3] = {0, 0, 0};
  int64_t stride[3] = {0, 0, 0};
  int64_t len = 0;
  __host__ __device__ int64_t Rows() const { return n[0] * n[1] * n[2]; }
  __host__ __device__ int64_t Vectors() const { return Rows() * (len / 8); }
};

struct ScanParams {
  ScanTensor t[kTensors];
  bool bf16 = true;                     // else fp16
  float dot_factor = 0.0f;              // head_dim * max(1, softmax_scale)
  const float* alibi_slopes = nullptr;  // [heads] or null
  int heads = 0;
  float max_distance = 0.0f;  // largest |q_pos - k_pos| of the call
  uint32_t* scratch = nullptr;
};

__device__ __forceinline__ uint32_t MaxBitsOfWord(uint32_t m, uint32_t w) {
  return __vmaxu2(m, w & 0x7fff7fffu);  // both 16-bit halves, sign cleared
}

// The largest magnitude bits of this thread's share of tensor t (vectors g, g + stride, ...).
template <typename Index>
__device__ uint32_t ThreadMaxBits(const ScanTensor& t) {
  const Index vpr = static_cast<Index>(t.len / 8);  // vectors per row
  const Index total = static_cast<Index>(t.Vectors());
  const bool one_row = t.Rows() == 1;
  const Index n1 = static_cast<Index>(t.n[1]), n2 = static_cast<Index>(t.n[2]);
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  uint32_t m = 0;  // two 16-bit maxima
  for (Index g = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; g < total;
       g += kUnroll * stride) {
    uint4 x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const Index v = g + u * stride;
      x[u] = make_uint4(0, 0, 0, 0);
      if (v >= total) continue;
      int64_t at = static_cast<int64_t>(v) * 8;  // element offset of the vector
      if (!one_row) {
        const Index row = v / vpr;
        const Index c = v - row * vpr;
        const Index i2 = row % n2, r = row / n2;
        const Index i1 = r % n1, i0 = r / n1;
        at = static_cast<int64_t>(i0) * t.stride[0] + static_cast<int64_t>(i1) * t.stride[1] +
             static_cast<int64_t>(i2) * t.stride[2] + static_cast<int64_t>(c) * 8;
      }
      x[u] = __ldg(reinterpret_cast<const uint4*>(t.base + at));
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      m = MaxBitsOfWord(m, x[u].x);
      m = MaxBitsOfWord(m, x[u].y);
      m = MaxBitsOfWord(m, x[u].z);
      m = MaxBitsOfWord(m, x[u].w);
    }
  }
  return max(m & 0xffffu, m >> 16);
}

// The magnitude of 16-bit pattern `bits` (sign cleared), as fp32.
__device__ __forceinline__ float MagnitudeOf(uint32_t bits, bool bf16) {
  return bf16 ? __uint_as_float(bits << 16)
              : __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// Grid: (x, kTensors); block: kThreads. Each block folds its largest magnitude into
// scratch[blockIdx.y]; the last block to finish decides (and scans the ALiBi slopes).
template <typename Index>
__global__ void __launch_bounds__(kThreads) NonFiniteScanKernel(const ScanParams s) {
  __shared__ uint32_t warp_max[kWarps];
  __shared__ bool last;
  uint32_t m = ThreadMaxBits<Index>(s.t[blockIdx.y]);
  for (int offset = 16; offset > 0; offset /= 2) {
    m = max(m, __shfl_xor_sync(0xffffffffu, m, offset));
  }
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) m = max(m, warp_max[w]);
    if (m != 0) atomicMax(&s.scratch[blockIdx.y], m);
    __threadfence();  // the maximum is visible before this block counts as finished
    const uint32_t done = atomicAdd(&s.scratch[kDoneWord], 1u);
    last = done == gridDim.x * gridDim.y - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();  // every other block's maximum is visible to this one

  // ALiBi slopes: the largest |slope|; NaN or infinite ones give infinity.
  float my_slope = 0.0f;
  if (s.alibi_slopes != nullptr) {
    for (int h = threadIdx.x; h < s.heads; h += kThreads) {
      const float x = fabsf(s.alibi_slopes[h]);
      my_slope = fmaxf(my_slope, isfinite(x) ? x : INFINITY);
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    my_slope = fmaxf(my_slope, __shfl_xor_sync(0xffffffffu, my_slope, offset));
  }
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = __float_as_uint(my_slope);
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 0; w < kWarps; ++w) my_slope = fmaxf(my_slope, __uint_as_float(warp_max[w]));

  const uint32_t inf_bits = s.bf16 ? 0x7f80u : 0x7c00u;
  const uint32_t q = atomicAdd(&s.scratch[0], 0u), k = atomicAdd(&s.scratch[1], 0u),
                 v = atomicAdd(&s.scratch[2], 0u);
  bool careful = q >= inf_bits || k >= inf_bits || v >= inf_bits;
  // An overflow to infinity fails the comparisons, as a NaN would.
  const float dots = MagnitudeOf(q, s.bf16) * MagnitudeOf(k, s.bf16) * s.dot_factor;
  careful = careful || !(dots <= kCarefulScoreBound);
  careful = careful || !(my_slope * s.max_distance <= kCarefulScoreBound);
  s.scratch[kGuardCarefulWord] = careful ? 1u : 0u;
}

// Rows `rows` of a [batch, seq, heads, head_dim] tensor, collapsed where contiguous.
absl::StatusOr<ScanTensor> MakeScanTensor(const char* name, const void* ptr, int batch,
                                          RowSpan rows, int heads, int head_dim,
                                          int64_t batch_stride, int64_t row_stride,
                                          int64_t head_stride) {
  ScanTensor t;
  if (ptr == nullptr || rows.count == 0 || batch == 0) return t;  // nothing to read
  t.base = static_cast<const uint16_t*>(ptr) + rows.begin * row_stride;
  t.n[0] = batch;
  t.n[1] = rows.count;
  t.n[2] = heads;
  t.stride[0] = batch_stride;
  t.stride[1] = row_stride;
  t.stride[2] = head_stride;
  t.len = head_dim;
  bool misaligned = reinterpret_cast<uintptr_t>(t.base) % 16 != 0 || head_dim % 8 != 0;
  for (int i = 0; i < 3; ++i) misaligned = misaligned || (t.n[i] > 1 && t.stride[i] % 8 != 0);
  if (misaligned) {
    return absl::InvalidArgumentError(absl::StrCat(
        "non-finite scan: ", name, " needs 16-byte aligned rows (pointer, strides, head_dim)"));
  }
  // Innermost first: a level folds into the contiguous run when it starts where the run ends.
  for (int i = 2; i >= 0; --i) {
    const bool inner_folded = i == 2 || t.n[i + 1] == 1;
    if (!inner_folded || (t.n[i] > 1 && t.stride[i] != t.len)) break;
    t.len *= t.n[i];
    t.n[i] = 1;
  }
  return t;
}

// The largest |q_pos - k_pos| over the call's rows (positions are monotone in the row).
float MaxDistance(const AttentionParams& p, RowSpan q_rows, RowSpan kv_rows) {
  if (q_rows.count == 0 || kv_rows.count == 0) return 0.0f;
  const double q_lo = static_cast<double>(QueryPos(p, q_rows.begin));
  const double q_hi = static_cast<double>(QueryPos(p, q_rows.begin + q_rows.count - 1));
  const double k_lo = static_cast<double>(KeyPos(p, kv_rows.begin));
  const double k_hi = static_cast<double>(KeyPos(p, kv_rows.begin + kv_rows.count - 1));
  return static_cast<float>(std::max({0.0, q_hi - k_lo, k_hi - q_lo}));
}

}  // namespace

absl::Status LaunchNonFiniteScan(const AttentionParams& p, RowSpan q_rows, RowSpan kv_rows,
                                 uint32_t* scratch, cudaStream_t stream) {
  if (p.dtype != DType::kBF16 && p.dtype != DType::kF16) {
    return absl::InvalidArgumentError("non-finite scan: q, k and v must be bf16 or fp16");
  }
  ScanParams s;
  RA_ASSIGN_OR_RETURN(s.t[0], MakeScanTensor("q", p.q, p.batch, q_rows, p.heads, p.head_dim,
                                             p.q_batch_stride, p.q_row_stride, p.q_head_stride));
  RA_ASSIGN_OR_RETURN(s.t[1], MakeScanTensor("k", p.k, p.batch, kv_rows, p.heads_k, p.head_dim,
                                             p.k_batch_stride, p.k_row_stride, p.k_head_stride));
  RA_ASSIGN_OR_RETURN(s.t[2], MakeScanTensor("v", p.v, p.batch, kv_rows, p.heads_k, p.head_dim,
                                             p.v_batch_stride, p.v_row_stride, p.v_head_stride));
  s.bf16 = p.dtype == DType::kBF16;
  s.dot_factor = static_cast<float>(p.head_dim) * std::max(1.0f, p.softmax_scale);
  s.alibi_slopes = p.alibi_slopes;
  s.heads = p.heads;
  s.max_distance = p.alibi_slopes == nullptr ? 0.0f : MaxDistance(p, q_rows, kv_rows);
  s.scratch = scratch;
  int64_t most = 0;
  for (const ScanTensor& t : s.t) most = std::max(most, t.Vectors());
  const int64_t blocks =
      std::clamp<int64_t>((most + kThreads * kUnroll - 1) / (kThreads * kUnroll), 1, kMaxBlocksX);
  const dim3 grid(static_cast<unsigned>(blocks), kTensors);
  if (most < (int64_t{1} << 31)) {  // 32-bit index arithmetic, with room for g + stride
    NonFiniteScanKernel<uint32_t><<<grid, kThreads, 0, stream>>>(s);
  } else {
    NonFiniteScanKernel<uint64_t><<<grid, kThreads, 0, stream>>>(s);
  }
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

bool NonFiniteGuardEnabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("RINGATTN_NONFINITE_GUARD");
    return v == nullptr || !(std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0);
  }();
  return enabled;
}

absl::Status GuardedForward(const AttentionParams& p, RowSpan q_rows, RowSpan kv_rows,
                            cudaStream_t stream,
                            absl::FunctionRef<absl::Status(const uint32_t* careful)> fast,
                            const AttentionParams* scanned) {
  if (!NonFiniteGuardEnabled()) return fast(nullptr);
  void* scratch = nullptr;
  RA_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&scratch, kGuardWords * sizeof(uint32_t), stream));
  uint32_t* const words = static_cast<uint32_t*>(scratch);
  const uint32_t* const careful = words + kGuardCarefulWord;
  absl::Status run = [&]() -> absl::Status {
    RA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(words, 0, kGuardWords * sizeof(uint32_t), stream));
    RA_RETURN_IF_ERROR(LaunchNonFiniteScan(scanned != nullptr ? *scanned : p, q_rows, kv_rows,
                                           words, stream));
    RA_RETURN_IF_ERROR(fast(careful));
    return CudaReferenceForward(p, stream, careful);
  }();
  const cudaError_t freed = cudaFreeAsync(scratch, stream);
  RA_RETURN_IF_ERROR(run);
  RA_CUDA_RETURN_IF_ERROR(freed);
  return absl::OkStatus();
}

}  // namespace ringattn
