// Benchmark (not a test): packed variable-length sequences against dense calls of the same
// total tokens, on the "cuda" backend, bf16, causal, forward (and backward with --backward).
// Per token budget T (default 32768) and head dim, three ways to attend the same sequences:
//   dense   one causal sequence of T tokens (what a kernel without seq_bounds computes when a
//           packed batch is sent as one sequence: every cross-sequence pair, masked by nothing);
//   packed  one call with seq_bounds over N sequences (cu_seqlens), equal or mixed lengths;
//   batched the equal-length case as batch N of T / N tokens (the kernel's ideal for the same
//           useful work; mixed lengths have no batched form).
// Useful FLOPs are the packed sequences' own causal FLOPs (sum over sequences of
// 2 h L^2 d, FlashAttention's count), so "useful TFLOP/s" compares the three on the work the
// model needs; dense also reports its own FLOPs. Median of --iters calls timed between
// cudaEvents on one stream, after 2 warm-up calls.
//
// Usage: gpu_packed_bench [--tokens T] [--heads H] [--heads_k HK] [--iters N] [--backward]
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/gpu_bench_util.cuh"
#include "bench/gpu_timing.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"
#include "kernels/backend_registry.h"

namespace ringattn::bench {
namespace {

struct Options {
  int64_t tokens = 32768;
  int heads = 32, heads_k = 8;
  int iters = 10;
  bool backward = false;
};

// Causal FLOPs of one sequence of `len` tokens (forward; the backward counts 2.5 of it).
double CausalFlops(int64_t len, int heads, int head_dim) {
  return 2.0 * heads * static_cast<double>(len) * len * head_dim;
}

struct Layout {
  std::string name;
  int batch;
  int64_t seqlen;
  std::vector<int64_t> bounds;  // empty: not packed
};

// Median ms of `backend` on `p` (device tensors already attached), forward or backward.
double TimeCall(AttentionBackend& backend, const AttentionParams& p, bool backward, int iters,
                cudaStream_t stream) {
  std::unique_ptr<DeviceMemory> dout, lse, dq, dk, dv;
  AttentionBackwardParams bp;
  if (backward) {
    const size_t q_elems = static_cast<size_t>(p.batch) * p.seqlen_q * p.heads * p.head_dim;
    const size_t k_elems = static_cast<size_t>(p.batch) * p.seqlen_k * p.heads_k * p.head_dim;
    dout = std::make_unique<DeviceMemory>(q_elems * 2);
    FillBf16(dout->ptr, static_cast<int64_t>(q_elems), 9, stream);
    dq = std::make_unique<DeviceMemory>(q_elems * 4);
    dk = std::make_unique<DeviceMemory>(k_elems * 4);
    dv = std::make_unique<DeviceMemory>(k_elems * 4);
    bp.fwd = p;
    bp.out = p.o;
    bp.dout = dout->ptr;
    bp.out_dtype = p.dtype;
    bp.lse = p.lse;
    bp.dq = static_cast<float*>(dq->ptr);
    bp.dk = static_cast<float*>(dk->ptr);
    bp.dv = static_cast<float*>(dv->ptr);
    SetContiguousBackwardStrides(&bp);
    CheckStatus(backend.Forward(p, ExecutionContext{stream}), "forward");
  }
  auto run = [&] {
    const ExecutionContext ctx{stream};
    CheckStatus(backward ? backend.Backward(bp, ctx) : backend.Forward(p, ctx),
                backward ? "backward" : "forward");
  };
  cudaEvent_t start, stop;
  BENCH_CUDA_CHECK(cudaEventCreate(&start));
  BENCH_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 2; ++i) TimeOnce(run, stream, start, stop);
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) ms.push_back(TimeOnce(run, stream, start, stop));
  BENCH_CUDA_CHECK(cudaEventDestroy(start));
  BENCH_CUDA_CHECK(cudaEventDestroy(stop));
  return Median(ms);
}

int Main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokens" && i + 1 < argc) {
      o.tokens = std::atoll(argv[++i]);
    } else if (a == "--heads" && i + 1 < argc) {
      o.heads = std::atoi(argv[++i]);
    } else if (a == "--heads_k" && i + 1 < argc) {
      o.heads_k = std::atoi(argv[++i]);
    } else if (a == "--iters" && i + 1 < argc) {
      o.iters = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--backward") {
      o.backward = true;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--tokens T] [--heads H] [--heads_k HK] [--iters N] [--backward]\n",
                   argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop;
  if (!CurrentDevice(&prop)) return 1;
  absl::StatusOr<std::unique_ptr<AttentionBackend>> made = MakeBackend("cuda");
  CheckStatus(made.status(), "cuda backend");
  AttentionBackend& backend = **made;
  cudaStream_t stream;
  BENCH_CUDA_CHECK(cudaStreamCreate(&stream));
  const int64_t t = o.tokens;
  std::printf("packed sequences vs dense, %s, T=%lld tokens, h%d hk%d bf16 causal, %s, median of "
              "%d\n",
              prop.name, static_cast<long long>(t), o.heads, o.heads_k,
              o.backward ? "backward (2.5x forward FLOPs)" : "forward", o.iters);
  std::printf("%-5s %-30s %9s %9s\n", "d", "layout", "ms", "TFLOP/s");
  const double kind = o.backward ? 2.5 : 1.0;
  for (const int d : {64, 128}) {
    // Sequences: 8 equal; 16 equal; mixed (1/2, 1/4, 1/8, 1/16, 1/32, 1/64, 1/64 of T).
    std::vector<Layout> layouts;
    layouts.push_back({"dense 1 x T", 1, t, {}});
    for (const int n : {8, 16}) {
      Layout packed{"packed " + std::to_string(n) + " x T/" + std::to_string(n), 1, t, {}};
      for (int i = 0; i <= n; ++i) packed.bounds.push_back(t / n * i);
      layouts.push_back(packed);
      layouts.push_back({"batched " + std::to_string(n) + " x T/" + std::to_string(n), n, t / n,
                         {}});
    }
    Layout mixed{"packed mixed 1/2..1/64", 1, t, {0}};
    for (const int64_t part : {t / 2, t / 4, t / 8, t / 16, t / 32, t / 64, t / 64}) {
      mixed.bounds.push_back(mixed.bounds.back() + part);
    }
    mixed.bounds.back() = t;  // the parts sum to T; this absorbs T's rounding
    layouts.push_back(mixed);

    for (const Layout& l : layouts) {
      AttentionParams p = SelfAttentionParams(l.batch, l.seqlen, o.heads, d, /*causal=*/true);
      p.heads_k = o.heads_k;
      SetContiguousStrides(&p);
      const size_t q_elems = static_cast<size_t>(l.batch) * l.seqlen * o.heads * d;
      const size_t k_elems = static_cast<size_t>(l.batch) * l.seqlen * o.heads_k * d;
      DeviceMemory q(q_elems * 2), k(k_elems * 2), v(k_elems * 2), out(q_elems * 2),
          lse(static_cast<size_t>(l.batch) * o.heads * l.seqlen * 4);
      FillBf16(q.ptr, static_cast<int64_t>(q_elems), 1, stream);
      FillBf16(k.ptr, static_cast<int64_t>(k_elems), 2, stream);
      FillBf16(v.ptr, static_cast<int64_t>(k_elems), 3, stream);
      p.q = q.ptr;
      p.k = k.ptr;
      p.v = v.ptr;
      p.o = out.ptr;
      p.lse = static_cast<float*>(lse.ptr);
      double flops = 0;  // the call's own causal FLOPs
      if (!l.bounds.empty()) {
        p.seq_bounds = l.bounds.data();
        p.num_seqs = static_cast<int>(l.bounds.size()) - 1;
        for (size_t i = 0; i + 1 < l.bounds.size(); ++i) {
          flops += CausalFlops(l.bounds[i + 1] - l.bounds[i], o.heads, d);
        }
      } else {
        flops = l.batch * CausalFlops(l.seqlen, o.heads, d);
      }
      const double ms = TimeCall(backend, p, o.backward, o.iters, stream);
      std::printf("%-5d %-30s %9.3f %9.1f\n", d, l.name.c_str(), ms,
                  kind * flops / (ms * 1e-3) * 1e-12);
    }
  }
  BENCH_CUDA_CHECK(cudaStreamDestroy(stream));
  return 0;
}

}  // namespace
}  // namespace ringattn::bench

int main(int argc, char** argv) { return ringattn::bench::Main(argc, argv); }
