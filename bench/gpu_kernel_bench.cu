// Benchmark of the CUDA attention kernels (not a test) at the ANCHORS.md shapes, bf16:
// the fast kernel ("cuda") at every shape, the simple kernel ("cuda_reference") at the
// smallest (it is slow). Each row: warm-up calls, then the median of the timed calls, each
// timed alone between two cudaEvents on one stream. FLOPs as ForwardFlops counts them
// (4 b h s^2 d, halved for causal), the convention of the ANCHORS.md table.
//
// Usage: gpu_kernel_bench [--json PATH] [--iters N] [--simple-iters N] [--only-fast]
//   --json PATH       also write one JSON object per row (JSON lines) to PATH
//   --iters N         timed calls of the fast kernel per shape (default 20; warm-up 3)
//   --simple-iters N  timed calls of the simple kernel (default 3; warm-up 1)
//   --only-fast       skip the simple kernel
// Exits non-zero on any CUDA or kernel error, on NaN or infinity in a kernel's output, and when
// there is no CUDA device.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_params.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

#define BENCH_CUDA_CHECK(expr)                                                        \
  do {                                                                                \
    const cudaError_t bench_error_ = (expr);                                          \
    if (bench_error_ != cudaSuccess) {                                                \
      std::fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", __FILE__, __LINE__, #expr,  \
                   cudaGetErrorName(bench_error_), cudaGetErrorString(bench_error_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

void CheckStatus(const absl::Status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "%s failed: %s\n", what, s.ToString().c_str());
  std::exit(1);
}

struct Shape {
  int batch;
  int64_t seqlen;
  int heads;
  int head_dim;
  bool causal;
  bool run_simple;  // the simple kernel only at the smallest shape
};

// The ANCHORS.md single-GPU table.
constexpr Shape kShapes[] = {
    {1, 8192, 32, 128, false, true},   {1, 8192, 32, 128, true, true},
    {1, 32768, 32, 128, false, false}, {1, 32768, 32, 128, true, false},
    {1, 16384, 16, 64, false, false},  {1, 16384, 16, 64, true, false},
    {4, 4096, 32, 128, false, false},  {4, 4096, 32, 128, true, false},
};

// Uniform values in [-sqrt(3), sqrt(3)] (unit variance) from a hash of the index: inputs need
// no host round trip at these sizes.
__global__ void FillUniformBf16(__nv_bfloat16* x, int64_t n, uint32_t seed) {  // x: [n]
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9e3779b9u ^ static_cast<uint32_t>(i >> 32) ^ seed;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    const float u = static_cast<float>(h >> 8) * (1.0f / 16777216.0f);  // [0, 1)
    x[i] = __float2bfloat16((2.0f * u - 1.0f) * 1.7320508f);
  }
}

// One device allocation, freed on scope exit.
struct DeviceMemory {
  void* ptr = nullptr;
  explicit DeviceMemory(size_t bytes) { BENCH_CUDA_CHECK(cudaMalloc(&ptr, bytes)); }
  ~DeviceMemory() { cudaFree(ptr); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
};

// Median time in ms of `iters` calls of `backend` on `p`, after `warmup` untimed calls.
double TimeMs(AttentionBackend* backend, const AttentionParams& p, cudaStream_t stream, int warmup,
              int iters) {
  for (int i = 0; i < warmup; ++i) CheckStatus(backend->Forward(p), "warm-up call");
  BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaEvent_t start, stop;
  BENCH_CUDA_CHECK(cudaEventCreate(&start));
  BENCH_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    BENCH_CUDA_CHECK(cudaEventRecord(start, stream));
    CheckStatus(backend->Forward(p), "timed call");
    BENCH_CUDA_CHECK(cudaEventRecord(stop, stream));
    BENCH_CUDA_CHECK(cudaEventSynchronize(stop));
    float elapsed = 0.0f;
    BENCH_CUDA_CHECK(cudaEventElapsedTime(&elapsed, start, stop));
    ms.push_back(elapsed);
  }
  BENCH_CUDA_CHECK(cudaEventDestroy(start));
  BENCH_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  const size_t n = ms.size();
  return n % 2 == 1 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
}

// Number of NaN or infinite values among the first `n` of `o` (bf16) and NaN among `lse` (fp32;
// -inf is a fully masked row, none here). Times garbage would be worse than no time at all.
int64_t CountBadOutputs(const void* o, int64_t n, const float* lse, int64_t lse_n) {
  std::vector<uint16_t> host_o(n);
  std::vector<float> host_lse(lse_n);
  BENCH_CUDA_CHECK(cudaMemcpy(host_o.data(), o, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  BENCH_CUDA_CHECK(cudaMemcpy(host_lse.data(), lse, lse_n * sizeof(float), cudaMemcpyDeviceToHost));
  int64_t bad = 0;
  for (uint16_t bits : host_o) bad += (bits & 0x7f80u) == 0x7f80u;  // exponent all ones
  for (float x : host_lse) bad += std::isnan(x);
  return bad;
}

int Main(int argc, char** argv) {
  std::string json_path;
  int iters = 20;
  int simple_iters = 3;
  bool only_fast = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (arg == "--iters" && i + 1 < argc) {
      iters = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--simple-iters" && i + 1 < argc) {
      simple_iters = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--only-fast") {
      only_fast = true;
    } else {
      std::fprintf(stderr, "usage: %s [--json PATH] [--iters N] [--simple-iters N] [--only-fast]\n",
                   argv[0]);
      return 2;
    }
  }

  int device_count = 0;
  BENCH_CUDA_CHECK(cudaGetDeviceCount(&device_count));
  if (device_count == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  int device = 0;
  BENCH_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop;
  BENCH_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf("device: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount);

  FILE* json = nullptr;
  if (!json_path.empty()) {
    json = std::fopen(json_path.c_str(), "w");
    if (json == nullptr) {
      std::fprintf(stderr, "cannot open %s for writing\n", json_path.c_str());
      return 1;
    }
  }

  cudaStream_t stream;
  BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::printf("%-15s %5s %6s %5s %5s %6s %10s %10s\n", "kernel", "b", "s", "h", "d", "causal", "ms",
              "TFLOP/s");
  for (const Shape& shape : kShapes) {
    AttentionParams p;
    p.batch = shape.batch;
    p.seqlen_q = p.seqlen_k = shape.seqlen;
    p.heads = p.heads_k = shape.heads;
    p.head_dim = shape.head_dim;
    p.dtype = p.o_dtype = DType::kBF16;
    p.causal = shape.causal;
    p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    SetContiguousStrides(&p);
    const int64_t elements = p.batch * p.seqlen_q * p.heads * p.head_dim;  // q, k, v and o alike
    DeviceMemory q(elements * 2), k(elements * 2), v(elements * 2), o(elements * 2);
    DeviceMemory lse(p.batch * p.heads * p.seqlen_q * sizeof(float));
    const int fill_blocks = 4 * prop.multiProcessorCount;
    FillUniformBf16<<<fill_blocks, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(q.ptr), elements,
                                                     1);
    BENCH_CUDA_CHECK(cudaGetLastError());
    FillUniformBf16<<<fill_blocks, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(k.ptr), elements,
                                                     2);
    BENCH_CUDA_CHECK(cudaGetLastError());
    FillUniformBf16<<<fill_blocks, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(v.ptr), elements,
                                                     3);
    BENCH_CUDA_CHECK(cudaGetLastError());
    p.q = q.ptr;
    p.k = k.ptr;
    p.v = v.ptr;
    p.o = o.ptr;
    p.lse = static_cast<float*>(lse.ptr);

    for (const char* name : {"cuda", "cuda_reference"}) {
      const bool simple = std::string(name) == "cuda_reference";
      if (simple && (only_fast || !shape.run_simple)) continue;
      absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeCudaBackend(name);
      CheckStatus(backend.status(), "MakeCudaBackend");
      AsCudaBackend(backend->get())->SetStream(stream);
      const double ms =
          TimeMs(backend->get(), p, stream, simple ? 1 : 3, simple ? simple_iters : iters);
      const int64_t bad = CountBadOutputs(p.o, elements, p.lse, p.batch * p.heads * p.seqlen_q);
      if (bad != 0) {
        std::fprintf(stderr, "%s: %lld NaN/inf outputs at b=%d s=%lld h=%d d=%d causal=%d\n", name,
                     static_cast<long long>(bad), p.batch, static_cast<long long>(p.seqlen_q),
                     p.heads, p.head_dim, p.causal ? 1 : 0);
        return 1;
      }
      const double tflops = ForwardFlops(p) / (ms * 1e-3) / 1e12;
      std::printf("%-15s %5d %6lld %5d %5d %6d %10.3f %10.1f\n", name, p.batch,
                  static_cast<long long>(p.seqlen_q), p.heads, p.head_dim, p.causal ? 1 : 0, ms,
                  tflops);
      std::fflush(stdout);
      if (json != nullptr) {
        std::fprintf(json,
                     "{\"kernel\": \"%s\", \"device\": \"%s\", \"dtype\": \"bf16\", "
                     "\"batch\": %d, \"seqlen\": %lld, \"heads\": %d, \"head_dim\": %d, "
                     "\"causal\": %s, \"iters\": %d, \"median_ms\": %.6f, \"tflops\": %.3f}\n",
                     name, prop.name, p.batch, static_cast<long long>(p.seqlen_q), p.heads,
                     p.head_dim, p.causal ? "true" : "false", simple ? simple_iters : iters, ms,
                     tflops);
      }
    }
  }
  BENCH_CUDA_CHECK(cudaStreamDestroy(stream));
  if (json != nullptr && std::fclose(json) != 0) {
    std::fprintf(stderr, "error writing %s\n", json_path.c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace ringattn

int main(int argc, char** argv) { return ringattn::Main(argc, argv); }
