// fp32 inputs rounded for the fast kernels (see fp32_inputs.h).
#include "kernels/cuda/fp32_inputs.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "base/cuda_check.h"
#include "base/status_macros.h"

namespace ringattn {
namespace {

// One fp32 tensor [batch, rows, heads, head_dim] (strides in elements, head_dim contiguous) to
// round into a contiguous 16-bit copy at `dst`.
struct Rounding {
  const float* src = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
  int batch = 0;
  int64_t rows = 0;
  int heads = 0;
  int head_dim = 0;
  void* dst = nullptr;

  int64_t Elements() const { return int64_t{batch} * rows * heads * head_dim; }
};

__device__ __forceinline__ void RoundTo(float x, __half* out) { *out = __float2half_rn(x); }
__device__ __forceinline__ void RoundTo(float x, __nv_bfloat16* out) {
  *out = __float2bfloat16_rn(x);
}

// Element i of the contiguous copy from its place in the strided source; NaN stays NaN, a
// value beyond the type's range becomes an infinity of its sign.
template <typename Half>
__global__ void RoundKernel(Rounding r, int64_t n) {
  Half* const dst = static_cast<Half*>(r.dst);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    int64_t rest = i / r.head_dim;
    const int64_t e = i - rest * r.head_dim;
    const int64_t h = rest % r.heads;
    rest /= r.heads;
    const int64_t row = rest % r.rows;
    const int64_t b = rest / r.rows;
    RoundTo(r.src[b * r.batch_stride + row * r.row_stride + h * r.head_stride + e], dst + i);
  }
}

constexpr size_t kAlign = 256;  // each copy's start, as cudaMalloc's

size_t AlignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Allocates one scratch for every rounding's copy (2 bytes an element), enqueues the
// roundings into it, runs `run` and releases the scratch on `stream`, on every path.
template <typename Half>
absl::Status RoundAndRun(std::vector<Rounding*> roundings, cudaStream_t stream,
                         absl::FunctionRef<absl::Status()> run) {
  size_t bytes = 0;
  std::vector<size_t> offsets;
  for (const Rounding* r : roundings) {
    offsets.push_back(bytes);
    bytes += AlignUp(static_cast<size_t>(r->Elements()) * sizeof(Half));
  }
  void* scratch = nullptr;
  RA_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&scratch, std::max<size_t>(bytes, 1), stream));
  const absl::Status status = [&]() -> absl::Status {
    for (size_t i = 0; i < roundings.size(); ++i) {
      Rounding& r = *roundings[i];
      r.dst = static_cast<char*>(scratch) + offsets[i];
      const int64_t n = r.Elements();
      if (n == 0) continue;
      constexpr int kThreads = 256;
      const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
      RoundKernel<Half><<<blocks, kThreads, 0, stream>>>(r, n);
      RA_CUDA_RETURN_IF_LAUNCH_ERROR();
    }
    return run();
  }();
  const cudaError_t freed = cudaFreeAsync(scratch, stream);
  RA_RETURN_IF_ERROR(status);
  RA_CUDA_RETURN_IF_ERROR(freed);
  return absl::OkStatus();
}

Rounding Of(const void* src, int64_t batch_stride, int64_t row_stride, int64_t head_stride,
            int batch, int64_t rows, int heads, int head_dim) {
  Rounding r;
  r.src = static_cast<const float*>(src);
  r.batch_stride = batch_stride;
  r.row_stride = row_stride;
  r.head_stride = head_stride;
  r.batch = src == nullptr ? 0 : batch;  // an absent tensor: nothing to round
  r.rows = rows;
  r.heads = heads;
  r.head_dim = head_dim;
  return r;
}

// The contiguous strides of a rounded [batch, rows, heads, head_dim] copy.
struct Strides {
  int64_t batch, row, head;
};
Strides ContiguousOf(int64_t rows, int heads, int head_dim) {
  return {rows * heads * head_dim, int64_t{heads} * head_dim, head_dim};
}

absl::Status CheckFp32(DType dtype) {
  if (dtype != DType::kF32) {
    return absl::InternalError("WithHalfInputs: the inputs are not fp32");
  }
  return absl::OkStatus();
}

// `fwd` (a copy) pointing at the rounded q, k, v with their contiguous strides.
void UseRounded(const Rounding& q, const Rounding& k, const Rounding& v, DType dtype,
                AttentionParams* fwd) {
  const Strides sq = ContiguousOf(fwd->seqlen_q, fwd->heads, fwd->head_dim);
  const Strides sk = ContiguousOf(fwd->seqlen_k, fwd->heads_k, fwd->head_dim);
  fwd->q = q.dst;
  fwd->k = k.dst;
  fwd->v = v.dst;
  fwd->q_batch_stride = sq.batch, fwd->q_row_stride = sq.row, fwd->q_head_stride = sq.head;
  fwd->k_batch_stride = sk.batch, fwd->k_row_stride = sk.row, fwd->k_head_stride = sk.head;
  fwd->v_batch_stride = sk.batch, fwd->v_row_stride = sk.row, fwd->v_head_stride = sk.head;
  fwd->dtype = dtype;
}

alignas(kAlign) const char kPlaceholder[kAlign] = {};

// q, k and v of `p` to round.
struct QkvRoundings {
  Rounding q, k, v;
};
QkvRoundings QkvOf(const AttentionParams& p) {
  return {Of(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, p.batch, p.seqlen_q, p.heads,
             p.head_dim),
          Of(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, p.batch, p.seqlen_k,
             p.heads_k, p.head_dim),
          Of(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, p.batch, p.seqlen_k,
             p.heads_k, p.head_dim)};
}

}  // namespace

AttentionParams HalfCopyShape(const AttentionParams& p, DType half) {
  AttentionParams shape = p;
  Rounding placeholder;
  placeholder.dst = const_cast<char*>(kPlaceholder);
  UseRounded(placeholder, placeholder, placeholder, half, &shape);
  return shape;
}

AttentionBackwardParams HalfCopyShape(const AttentionBackwardParams& p) {
  AttentionBackwardParams shape = p;
  shape.fwd = HalfCopyShape(p.fwd, DType::kBF16);
  const Strides so = ContiguousOf(p.fwd.seqlen_q, p.fwd.heads, p.fwd.head_dim);
  if (p.out != nullptr) shape.out = kPlaceholder;
  if (p.dout != nullptr) shape.dout = kPlaceholder;
  shape.out_batch_stride = shape.dout_batch_stride = so.batch;
  shape.out_row_stride = shape.dout_row_stride = so.row;
  shape.out_head_stride = shape.dout_head_stride = so.head;
  shape.out_dtype = DType::kBF16;
  return shape;
}

absl::Status WithHalfInputs(const AttentionParams& p, cudaStream_t stream,
                            absl::FunctionRef<absl::Status(const AttentionParams& half)> run) {
  RA_RETURN_IF_ERROR(CheckFp32(p.dtype));
  QkvRoundings r = QkvOf(p);
  return RoundAndRun<__half>({&r.q, &r.k, &r.v}, stream, [&]() -> absl::Status {
    AttentionParams half = p;
    UseRounded(r.q, r.k, r.v, DType::kF16, &half);
    return run(half);
  });
}

absl::Status WithHalfInputs(
    const AttentionBackwardParams& p, cudaStream_t stream,
    absl::FunctionRef<absl::Status(const AttentionBackwardParams& half)> run) {
  RA_RETURN_IF_ERROR(CheckFp32(p.fwd.dtype));
  const AttentionParams& f = p.fwd;
  QkvRoundings r = QkvOf(f);
  Rounding out = Of(p.out, p.out_batch_stride, p.out_row_stride, p.out_head_stride, f.batch,
                    f.seqlen_q, f.heads, f.head_dim);
  Rounding dout = Of(p.dout, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride, f.batch,
                     f.seqlen_q, f.heads, f.head_dim);
  return RoundAndRun<__nv_bfloat16>(
      {&r.q, &r.k, &r.v, &out, &dout}, stream, [&]() -> absl::Status {
        AttentionBackwardParams half = p;
        UseRounded(r.q, r.k, r.v, DType::kBF16, &half.fwd);
        const Strides so = ContiguousOf(f.seqlen_q, f.heads, f.head_dim);
        half.out = p.out == nullptr ? nullptr : out.dst;
        half.dout = dout.dst;
        half.out_batch_stride = so.batch, half.out_row_stride = so.row;
        half.out_head_stride = so.head;
        half.dout_batch_stride = so.batch, half.dout_row_stride = so.row;
        half.dout_head_stride = so.head;
        half.out_dtype = DType::kBF16;
        return run(half);
      });
}

}  // namespace ringattn
