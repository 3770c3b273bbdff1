// Benchmark of the backward kernel (not a test) at the reference shapes (docs/performance.md), bf16: our forward
// ("cuda", default tiling), then every compiled backward tiling (flash_bwd_configs.h: the
// default, or every row with -DRINGATTN_CUDA_ALL_TILINGS=ON), each timed as the call a
// single-device user makes: D = rowsum(dO * O), dq zeroed, the kernel.
//
// Timing: per shape, warm-up calls, then timed calls round-robin over the forward and the
// tilings, each alone between two cudaEvents; medians reported. FLOPs as FlashAttention counts
// them: forward 4 b h s^2 d (halved when causal), backward 2.5 times that, fwd+bwd 3.5 times,
// so that TFLOP/s compare with bench/sdpa_bench.py --backward (PyTorch SDPA) on the same card.
//
// Checks, so that no garbage gets a time: each tiling's dq, dk, dv are checked for non-finite
// values and compared with the default tiling's (relative L2; two correct kernels differ by
// fp32 summation order, ~1e-6; the bench fails above 1e-3).
//
// Usage: gpu_backward_bench [--json PATH] [--iters N]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "bench/gpu_bench_util.cuh"
#include "bench/gpu_timing.h"
#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"
#include "kernels/cuda/flash_bwd.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

using bench::CheckStatus;
using bench::CurrentDevice;
using bench::DeviceMemory;
using bench::FillBf16;
using bench::Median;
using bench::SelfAttentionParams;
using bench::TimeOnce;

struct Shape {
  int batch;
  int64_t seqlen;
  int heads;
  int head_dim;
  bool causal;
};

constexpr Shape kShapes[] = {
    {1, 8192, 32, 128, false}, {1, 8192, 32, 128, true},  {1, 32768, 32, 128, false},
    {1, 32768, 32, 128, true}, {1, 16384, 16, 64, false}, {1, 16384, 16, 64, true},
    {4, 4096, 32, 128, false}, {4, 4096, 32, 128, true},
};

std::string ShapeName(const Shape& s) {
  return absl::StrFormat("b%d s%d h%d d%d %s", s.batch, s.seqlen, s.heads, s.head_dim,
                         s.causal ? "causal" : "full");
}

// Host copies of the three gradients, and their comparison with another run's.
struct Grads {
  std::vector<float> dq, dk, dv;
};
Grads Download(const DeviceMemory& dq, const DeviceMemory& dk, const DeviceMemory& dv) {
  Grads g;
  for (auto [dst, src] : {std::pair{&g.dq, &dq}, std::pair{&g.dk, &dk}, std::pair{&g.dv, &dv}}) {
    dst->resize(src->bytes / sizeof(float));
    BENCH_CUDA_CHECK(cudaMemcpy(dst->data(), src->ptr, src->bytes, cudaMemcpyDeviceToHost));
  }
  return g;
}
// max over the three tensors of ||got - want|| / ||want||; +inf on a non-finite value.
double MaxRelDiff(const Grads& got, const Grads& want) {
  double worst = 0.0;
  for (auto [a, b] :
       {std::pair{&got.dq, &want.dq}, std::pair{&got.dk, &want.dk}, std::pair{&got.dv, &want.dv}}) {
    double err = 0.0, ref = 0.0;
    for (size_t i = 0; i < a->size(); ++i) {
      if (!std::isfinite((*a)[i])) return INFINITY;
      const double d = static_cast<double>((*a)[i]) - (*b)[i];
      err += d * d;
      ref += static_cast<double>((*b)[i]) * (*b)[i];
    }
    worst = std::max(worst, ref > 0 ? std::sqrt(err / ref) : std::sqrt(err));
  }
  return worst;
}

int Main(int argc, char** argv) {
  const char* json_path = nullptr;
  int iters = 10;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
      json_path = argv[++i];
    } else if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: gpu_backward_bench [--json PATH] [--iters N]\n");
      return 2;
    }
  }
  cudaDeviceProp prop;
  if (!CurrentDevice(&prop)) return 1;
  FILE* json = json_path != nullptr ? std::fopen(json_path, "w") : nullptr;
  cudaStream_t stream;
  BENCH_CUDA_CHECK(cudaStreamCreate(&stream));
  cudaEvent_t start, stop;
  BENCH_CUDA_CHECK(cudaEventCreate(&start));
  BENCH_CUDA_CHECK(cudaEventCreate(&stop));
  bool failed = false;

  std::printf("%-28s %-12s %9s %9s %10s %10s %9s\n", "shape", "tiling", "fwd ms", "bwd ms",
              "bwd TF/s", "f+b TF/s", "rel diff");
  for (const Shape& shape : kShapes) {
    AttentionParams f =
        SelfAttentionParams(shape.batch, shape.seqlen, shape.heads, shape.head_dim, shape.causal);
    const int64_t elements =
        static_cast<int64_t>(shape.batch) * shape.seqlen * shape.heads * shape.head_dim;
    const int64_t rows = static_cast<int64_t>(shape.batch) * shape.heads * shape.seqlen;
    DeviceMemory q(elements * 2), k(elements * 2), v(elements * 2), o(elements * 2),
        dout(elements * 2), lse(rows * 4), delta(rows * 4), dq(elements * 4), dk(elements * 4),
        dv(elements * 4);
    FillBf16(q.ptr, elements, 1, stream);
    FillBf16(k.ptr, elements, 2, stream);
    FillBf16(v.ptr, elements, 3, stream);
    FillBf16(dout.ptr, elements, 4, stream);
    f.q = q.ptr;
    f.k = k.ptr;
    f.v = v.ptr;
    f.o = o.ptr;
    f.lse = static_cast<float*>(lse.ptr);
    CheckStatus(FlashForward(f, stream), "forward");

    AttentionBackwardParams bp;
    bp.fwd = f;
    bp.out = o.ptr;
    bp.dout = dout.ptr;
    bp.out_dtype = DType::kBF16;
    bp.lse = static_cast<const float*>(lse.ptr);
    bp.dq = static_cast<float*>(dq.ptr);
    bp.dk = static_cast<float*>(dk.ptr);
    bp.dv = static_cast<float*>(dv.ptr);
    SetContiguousBackwardStrides(&bp);
    const double fwd_flops = ForwardFlops(f);

    const std::vector<FlashBackwardConfig> configs = FlashBackwardConfigs(shape.head_dim);
    auto run_bwd = [&](const std::string& name) {
      CheckStatus(FlashBackwardWithConfig(bp, static_cast<float*>(delta.ptr), name, stream),
                  "backward");
    };
    auto run_fwd = [&] { CheckStatus(FlashForward(f, stream), "forward"); };
    for (int w = 0; w < 2; ++w) {
      run_fwd();
      for (const FlashBackwardConfig& c : configs) run_bwd(c.name);
    }
    std::vector<double> fwd_ms;
    std::vector<std::vector<double>> bwd_ms(configs.size());
    for (int it = 0; it < iters; ++it) {
      fwd_ms.push_back(TimeOnce(run_fwd, stream, start, stop));
      for (size_t ci = 0; ci < configs.size(); ++ci) {
        bwd_ms[ci].push_back(TimeOnce([&] { run_bwd(configs[ci].name); }, stream, start, stop));
      }
    }
    Grads reference;
    for (size_t ci = 0; ci < configs.size(); ++ci) {
      run_bwd(configs[ci].name);
      BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
      Grads got = Download(dq, dk, dv);
      double rel = 0.0;
      if (ci == 0) {
        reference = std::move(got);
        rel = MaxRelDiff(reference, reference);
      } else {
        rel = MaxRelDiff(got, reference);
      }
      const bool bad = !(rel <= 1e-3);
      failed |= bad;
      const double f_ms = Median(fwd_ms), b_ms = Median(bwd_ms[ci]);
      const double bwd_tflops = 2.5 * fwd_flops / (b_ms * 1e9);
      const double total_tflops = 3.5 * fwd_flops / ((f_ms + b_ms) * 1e9);
      std::printf("%-28s %-12s %9.3f %9.3f %10.1f %10.1f %9.1e%s\n", ShapeName(shape).c_str(),
                  configs[ci].name.c_str(), f_ms, b_ms, bwd_tflops, total_tflops, rel,
                  bad ? "  BAD" : (configs[ci].is_default ? "  (default)" : ""));
      if (json != nullptr) {
        std::fprintf(json,
                     "{\"device\": \"%s\", \"impl\": \"ringattn_cuda\", \"tiling\": \"%s\", "
                     "\"default\": %s, \"b\": %d, \"s\": %lld, \"h\": %d, \"d\": %d, "
                     "\"causal\": %s, \"fwd_ms\": %.4f, \"bwd_ms\": %.4f, \"bwd_tflops\": %.2f, "
                     "\"fwdbwd_tflops\": %.2f, \"rel_diff\": %.3g}\n",
                     prop.name, configs[ci].name.c_str(), configs[ci].is_default ? "true" : "false",
                     shape.batch, static_cast<long long>(shape.seqlen), shape.heads, shape.head_dim,
                     shape.causal ? "true" : "false", f_ms, b_ms, bwd_tflops, total_tflops, rel);
      }
    }
  }
  if (json != nullptr) std::fclose(json);
  BENCH_CUDA_CHECK(cudaStreamDestroy(stream));
  return failed ? 1 : 0;
}

}  // namespace
}  // namespace ringattn

int main(int argc, char** argv) { return ringattn::Main(argc, argv); }
