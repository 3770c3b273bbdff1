// Benchmark of the CUDA attention kernels (not a test) at the reference shapes (docs/performance.md), bf16: every
// compiled tiling of the fast kernel ("cuda", flash_fwd_configs.h; the defaults, or every row
// with -DRINGATTN_CUDA_ALL_TILINGS=ON) at every shape of its head dim, so that one device run
// of an all-tilings build picks the best tiling per head dim; two softcap shapes for the
// score-mod kernels; the simple kernel ("cuda_reference") at the smallest shape (it is slow).
//
// Timing: per shape, every tiling gets its warm-up calls, then the timed calls go round-robin
// over the tilings (call i of each before call i + 1 of any), each timed alone between two
// cudaEvents on one stream; the median per tiling is reported. Round-robin keeps clock and
// thermal drift from favouring whichever tiling ran first. FLOPs as ForwardFlops counts them
// (4 b h s^2 d, halved for causal), the convention of the published FlashAttention figures.
//
// Checks, so that no garbage gets a time: after the timed calls, one more call of each tiling,
// its o and lse checked on the device for NaN/inf and o compared with the reference tiling's
// (v1, the first version's tiling, when compiled; else the default) as ||o - o_ref|| / ||o_ref||
// (bf16 outputs of two correct kernels differ by rounding, ~1e-3; the bench fails above 1e-2).
//
// Output: the kernels' resources (registers, local memory, shared memory, CTAs per SM), one row
// per (tiling, shape) with ms, TFLOP/s and the ratio to the reference, then a summary: the best
// tiling per shape and per head dim (geometric mean over that head dim's shapes), and the
// default.
//
// Usage: gpu_kernel_bench [--json PATH] [--iters N] [--simple-iters N] [--only-fast]
//                         [--configs NAME,NAME...]
//   --json PATH       also write one JSON object per row (JSON lines) to PATH
//   --iters N         timed calls per tiling and shape (default 20; warm-up 3)
//   --simple-iters N  timed calls of the simple kernel (default 3; warm-up 1)
//   --only-fast       skip the simple kernel
//   --configs LIST    only these compiled tilings (names as printed)
// Exits non-zero on any CUDA or kernel error, on NaN or infinity in an output, on a tiling that
// disagrees with the reference, on a --configs name not compiled, and when there is no CUDA
// device.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "bench/gpu_bench_util.cuh"
#include "bench/gpu_timing.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_params.h"
#include "kernels/backend_registry.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

using bench::CheckStatus;
using bench::CurrentDevice;
using bench::DeviceMemory;
using bench::FillUniformBf16;
using bench::Median;
using bench::SelfAttentionParams;
using bench::TimeOnce;

struct Shape {
  int batch;
  int64_t seqlen;
  int heads;
  int head_dim;
  bool causal;
  bool run_simple;       // the simple kernel only at the smallest shape
  bool softcap = false;  // softcap 30: the score-mod kernel of each tiling (not a reference shape)
};

// The reference shapes (docs/performance.md), then two softcap shapes: each tiling compiles a second
// kernel for softcap/ALiBi (more registers, some spills), timed here so that its cost is known.
constexpr Shape kShapes[] = {
    {1, 8192, 32, 128, false, true},       {1, 8192, 32, 128, true, true},
    {1, 32768, 32, 128, false, false},     {1, 32768, 32, 128, true, false},
    {1, 16384, 16, 64, false, false},      {1, 16384, 16, 64, true, false},
    {4, 4096, 32, 128, false, false},      {4, 4096, 32, 128, true, false},
    {1, 8192, 32, 128, true, false, true}, {1, 16384, 16, 64, true, false, true},
};

std::string ShapeName(const Shape& s) {
  return absl::StrFormat("b%d s%d h%d d%d %s%s", s.batch, s.seqlen, s.heads, s.head_dim,
                         s.causal ? "causal" : "full", s.softcap ? " softcap" : "");
}

// Sums for the output checks: non-finite o elements, NaN lse values, sum (o - ref)^2 and
// sum ref^2 (o, ref: [n] bf16; lse: [lse_n] fp32; -inf lse is a fully masked row, none here).
struct CheckSums {
  unsigned long long bad_o;
  unsigned long long nan_lse;
  double err_sq;
  double ref_sq;
};

__global__ void CheckOutputs(const __nv_bfloat16* o, const __nv_bfloat16* ref, int64_t n,
                             const float* lse, int64_t lse_n, CheckSums* sums) {
  unsigned long long bad_o = 0, nan_lse = 0;
  double err_sq = 0.0, ref_sq = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += stride) {
    const float x = __bfloat162float(o[i]);
    const float r = __bfloat162float(ref[i]);
    if (!isfinite(x)) {
      ++bad_o;
      continue;
    }
    err_sq += static_cast<double>(x - r) * (x - r);
    ref_sq += static_cast<double>(r) * r;
  }
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < lse_n;
       i += stride) {
    nan_lse += isnan(lse[i]) ? 1 : 0;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    bad_o += __shfl_down_sync(0xffffffffu, bad_o, offset);
    nan_lse += __shfl_down_sync(0xffffffffu, nan_lse, offset);
    err_sq += __shfl_down_sync(0xffffffffu, err_sq, offset);
    ref_sq += __shfl_down_sync(0xffffffffu, ref_sq, offset);
  }
  if (threadIdx.x % 32 == 0) {
    atomicAdd(&sums->bad_o, bad_o);
    atomicAdd(&sums->nan_lse, nan_lse);
    atomicAdd(&sums->err_sq, err_sq);
    atomicAdd(&sums->ref_sq, ref_sq);
  }
}

struct Row {
  std::string config;  // tiling name, or "simple"
  bool is_default = false;
  Shape shape;
  double ms = 0.0;
  double tflops = 0.0;
  double rel_diff = 0.0;  // ||o - o_ref|| / ||o_ref|| (the reference tiling)
  bool bad = false;       // non-finite output or rel_diff > 1e-2
};

std::vector<std::string> SplitComma(const std::string& s) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin <= s.size()) {
    const size_t end = std::min(s.find(',', begin), s.size());
    if (end > begin) out.push_back(s.substr(begin, end - begin));
    begin = end + 1;
  }
  return out;
}

int Main(int argc, char** argv) {
  std::string json_path;
  int iters = 20;
  int simple_iters = 3;
  bool only_fast = false;
  std::set<std::string> only_configs;
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
    } else if (arg == "--configs" && i + 1 < argc) {
      for (const std::string& name : SplitComma(argv[++i])) only_configs.insert(name);
    } else {
      std::fprintf(stderr,
                   "usage: %s [--json PATH] [--iters N] [--simple-iters N] [--only-fast] "
                   "[--configs NAME,NAME...]\n",
                   argv[0]);
      return 2;
    }
  }

  cudaDeviceProp prop;
  if (!CurrentDevice(&prop)) return 1;

  // The compiled tilings per head dim, in table order (the default first), filtered by
  // --configs, every name of which must be compiled for some head dim.
  std::map<int, std::vector<FlashForwardConfig>> configs;
  std::set<std::string> compiled;
  for (const Shape& shape : kShapes) {
    if (configs.count(shape.head_dim)) continue;
    for (FlashForwardConfig& c : FlashForwardConfigs(shape.head_dim)) {
      compiled.insert(c.name);
      if (only_configs.empty() || only_configs.count(c.name)) {
        configs[shape.head_dim].push_back(std::move(c));
      }
    }
  }
  for (const std::string& name : only_configs) {
    if (compiled.count(name) == 0) {
      std::fprintf(stderr,
                   "--configs: no compiled tiling '%s' (this build compiles every tiling only "
                   "with -DRINGATTN_CUDA_ALL_TILINGS=ON)\n",
                   name.c_str());
      return 2;
    }
  }

  std::printf(
      "\nkernels (bf16): registers and local memory (spills) of the plain kernel and of the"
      " one with score mods, shared memory, resident CTAs per SM\n");
  std::printf("%-4s %-14s %5s %6s %9s %10s %8s %6s  %s\n", "d", "config", "regs", "local",
              "mods regs", "mods local", "smem KB", "CTA/SM", "tiling");
  for (const auto& [d, list] : configs) {
    for (const FlashForwardConfig& c : list) {
      absl::StatusOr<FlashKernelResources> r = FlashForwardResources(d, DType::kBF16, c.name);
      CheckStatus(r.status(), "FlashForwardResources");
      std::printf("%-4d %-14s %5d %6d %9d %10d %8.1f %6d  %s%s\n", d, c.name.c_str(), r->registers,
                  r->local_bytes, r->mods_registers, r->mods_local_bytes, r->smem_bytes / 1024.0,
                  r->ctas_per_sm, c.Describe().c_str(), c.is_default ? " [default]" : "");
    }
  }

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
  cudaEvent_t start, stop;
  BENCH_CUDA_CHECK(cudaEventCreate(&start));
  BENCH_CUDA_CHECK(cudaEventCreate(&stop));
  CheckSums* sums = nullptr;
  BENCH_CUDA_CHECK(cudaMalloc(&sums, sizeof(CheckSums)));
  const int fill_blocks = 4 * prop.multiProcessorCount;
  bool failed = false;
  std::vector<Row> rows;

  std::printf(
      "\n%-15s %-26s %9s %9s %8s %10s   (* the default; vs ref: time ratio to v1, or to the "
      "default without v1; diff: ||o - o_ref|| / ||o_ref||)\n",
      "config", "shape", "ms", "TFLOP/s", "vs ref", "diff");
  for (const Shape& shape : kShapes) {
    const std::vector<FlashForwardConfig>& list = configs[shape.head_dim];
    if (list.empty()) continue;  // --configs left no tiling of this head dim
    AttentionParams p =
        SelfAttentionParams(shape.batch, shape.seqlen, shape.heads, shape.head_dim, shape.causal);
    if (shape.softcap) p.softcap = 30.0f;
    const int64_t elements = p.batch * p.seqlen_q * p.heads * p.head_dim;  // q, k, v and o alike
    const int64_t lse_n = p.batch * p.heads * p.seqlen_q;
    DeviceMemory q(elements * 2), k(elements * 2), v(elements * 2), o(elements * 2);
    DeviceMemory o_ref(elements * 2), lse(lse_n * sizeof(float));
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

    // Warm-up, then round-robin timed calls.
    std::vector<std::vector<double>> ms(list.size());
    for (const FlashForwardConfig& c : list) {
      for (int i = 0; i < 3; ++i) {
        CheckStatus(FlashForwardWithConfig(p, c.name, stream), "warm-up call");
      }
    }
    BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (int it = 0; it < iters; ++it) {
      for (size_t ci = 0; ci < list.size(); ++ci) {
        ms[ci].push_back(TimeOnce(
            [&] { CheckStatus(FlashForwardWithConfig(p, list[ci].name, stream), "timed call"); },
            stream, start, stop));
      }
    }

    // Outputs of each tiling (one more call each) against the reference tiling's: v1 (checked
    // on the H100 by the whole GPU test suite) when it is in the list, else the first.
    size_t ref = 0;
    for (size_t ci = 0; ci < list.size(); ++ci) {
      if (list[ci].name == "v1") ref = ci;
    }
    std::vector<size_t> order = {ref};
    for (size_t ci = 0; ci < list.size(); ++ci) {
      if (ci != ref) order.push_back(ci);
    }
    std::vector<Row> shape_rows(list.size());
    for (size_t ci : order) {
      const FlashForwardConfig& c = list[ci];
      BENCH_CUDA_CHECK(cudaMemsetAsync(o.ptr, 0xff, elements * 2, stream));
      BENCH_CUDA_CHECK(cudaMemsetAsync(lse.ptr, 0xff, lse_n * sizeof(float), stream));
      CheckStatus(FlashForwardWithConfig(p, c.name, stream), "checked call");
      if (ci == ref) {
        BENCH_CUDA_CHECK(
            cudaMemcpyAsync(o_ref.ptr, o.ptr, elements * 2, cudaMemcpyDeviceToDevice, stream));
      }
      BENCH_CUDA_CHECK(cudaMemsetAsync(sums, 0, sizeof(CheckSums), stream));
      CheckOutputs<<<fill_blocks, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(o.ptr),
                                                    static_cast<const __nv_bfloat16*>(o_ref.ptr),
                                                    elements, p.lse, lse_n, sums);
      BENCH_CUDA_CHECK(cudaGetLastError());
      CheckSums host;
      BENCH_CUDA_CHECK(cudaMemcpyAsync(&host, sums, sizeof(host), cudaMemcpyDeviceToHost, stream));
      BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));

      Row& row = shape_rows[ci];
      row.config = c.name;
      row.is_default = c.is_default;
      row.shape = shape;
      row.ms = Median(ms[ci]);
      row.tflops = ForwardFlops(p) / (row.ms * 1e-3) / 1e12;
      row.rel_diff = host.ref_sq > 0 ? std::sqrt(host.err_sq / host.ref_sq) : 0.0;
      if (host.bad_o != 0 || host.nan_lse != 0 || row.rel_diff > 1e-2) {
        std::fprintf(stderr,
                     "%s at %s: %llu non-finite o, %llu NaN lse, relative difference to %s %.3g\n",
                     c.name.c_str(), ShapeName(shape).c_str(), host.bad_o, host.nan_lse,
                     list[ref].name.c_str(), row.rel_diff);
        row.bad = true;
        failed = true;
      }
    }
    const double ref_ms = shape_rows[ref].ms;
    for (size_t ci = 0; ci < list.size(); ++ci) {
      const Row& row = shape_rows[ci];
      const FlashForwardConfig& c = list[ci];
      std::printf("%-15s %-26s %9.3f %9.1f %7.3fx %10.2e%s\n",
                  (c.name + (c.is_default ? "*" : "")).c_str(), ShapeName(shape).c_str(), row.ms,
                  row.tflops, ref_ms / row.ms, row.rel_diff, row.bad ? "  BAD OUTPUT" : "");
      if (json != nullptr) {
        std::fprintf(json,
                     "{\"kernel\": \"cuda\", \"config\": \"%s\", \"default\": %s, \"tiling\": "
                     "\"%s\", \"device\": \"%s\", \"dtype\": \"bf16\", \"batch\": %d, "
                     "\"seqlen\": %lld, \"heads\": %d, \"head_dim\": %d, \"causal\": %s, "
                     "\"softcap\": %g, \"iters\": %d, \"median_ms\": %.6f, \"tflops\": %.3f, "
                     "\"speedup_vs_%s\": %.4f, \"rel_diff_vs_%s\": %.3e}\n",
                     c.name.c_str(), c.is_default ? "true" : "false", c.Describe().c_str(),
                     prop.name, p.batch, static_cast<long long>(p.seqlen_q), p.heads, p.head_dim,
                     p.causal ? "true" : "false", p.softcap, iters, row.ms, row.tflops,
                     list[ref].name.c_str(), ref_ms / row.ms, list[ref].name.c_str(), row.rel_diff);
      }
      rows.push_back(row);
    }
    std::fflush(stdout);

    if (!only_fast && shape.run_simple) {
      absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend("cuda_reference");
      CheckStatus(backend.status(), "MakeBackend");
      const ExecutionContext on_stream{stream};
      CheckStatus((*backend)->Forward(p, on_stream), "simple warm-up call");
      std::vector<double> simple_ms;
      for (int it = 0; it < simple_iters; ++it) {
        simple_ms.push_back(
            TimeOnce([&] { CheckStatus((*backend)->Forward(p, on_stream), "simple timed call"); },
                     stream, start, stop));
      }
      const double median = Median(simple_ms);
      const double tflops = ForwardFlops(p) / (median * 1e-3) / 1e12;
      std::printf("%-15s %-26s %9.3f %9.1f\n", "simple", ShapeName(shape).c_str(), median, tflops);
      if (json != nullptr) {
        std::fprintf(json,
                     "{\"kernel\": \"cuda_reference\", \"device\": \"%s\", \"dtype\": \"bf16\", "
                     "\"batch\": %d, \"seqlen\": %lld, \"heads\": %d, \"head_dim\": %d, "
                     "\"causal\": %s, \"iters\": %d, \"median_ms\": %.6f, \"tflops\": %.3f}\n",
                     prop.name, p.batch, static_cast<long long>(p.seqlen_q), p.heads, p.head_dim,
                     p.causal ? "true" : "false", simple_iters, median, tflops);
      }
    }
  }

  // Summary: the best tiling per shape, and per head dim by the geometric mean of TFLOP/s over
  // that head dim's shapes.
  std::printf("\nbest per shape (TFLOP/s; v1 and the default for comparison)\n");
  std::printf("%-26s %-15s %9s %9s %9s\n", "shape", "best", "best", "default", "v1");
  for (const Shape& shape : kShapes) {
    const Row* best = nullptr;
    const Row* v1 = nullptr;
    const Row* def = nullptr;
    for (const Row& r : rows) {
      if (ShapeName(r.shape) != ShapeName(shape)) continue;
      if (best == nullptr || r.tflops > best->tflops) best = &r;
      if (r.config == "v1") v1 = &r;
      if (r.is_default) def = &r;
    }
    if (best == nullptr) continue;
    std::printf("%-26s %-15s %9.1f %9.1f %9.1f\n", ShapeName(shape).c_str(), best->config.c_str(),
                best->tflops, def != nullptr ? def->tflops : 0.0, v1 != nullptr ? v1->tflops : 0.0);
  }
  std::printf("\nper head dim: geometric mean TFLOP/s over its reference shapes\n");
  for (const auto& [d, list] : configs) {
    std::string best_name;
    double best_mean = 0.0;
    for (const FlashForwardConfig& c : list) {
      double log_sum = 0.0;
      int n = 0;
      for (const Row& r : rows) {
        if (r.shape.head_dim == d && !r.shape.softcap && r.config == c.name) {
          log_sum += std::log(r.tflops);
          ++n;
        }
      }
      if (n == 0) continue;
      const double mean = std::exp(log_sum / n);
      std::printf("d%-4d %-15s %9.1f%s\n", d, c.name.c_str(), mean,
                  c.is_default ? "  [default]" : "");
      if (mean > best_mean) {
        best_mean = mean;
        best_name = c.name;
      }
    }
    if (!best_name.empty()) std::printf("d%-4d best: %s\n", d, best_name.c_str());
  }

  BENCH_CUDA_CHECK(cudaFree(sums));
  BENCH_CUDA_CHECK(cudaEventDestroy(start));
  BENCH_CUDA_CHECK(cudaEventDestroy(stop));
  BENCH_CUDA_CHECK(cudaStreamDestroy(stream));
  if (json != nullptr && std::fclose(json) != 0) {
    std::fprintf(stderr, "error writing %s\n", json_path.c_str());
    return 1;
  }
  return failed ? 1 : 0;
}

}  // namespace
}  // namespace ringattn

int main(int argc, char** argv) { return ringattn::Main(argc, argv); }
