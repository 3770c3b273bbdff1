// FlashCpuForward against ReferenceForward at one shape: batch 1, seqlen 1024 (queries and
// keys), 8 heads (MHA), head_dim 64, fp32 in and out, causal off and on. The kernel runs with
// 1 thread and with all hardware threads; BM_FlashCpuForwardScaling runs seqlen 8192 causal
// with 1, 2, 4, ... threads up to the hardware's (issue #20's thread scaling); BM_FmaPeak
// measures the core's fp32 FMA peak on one thread, the denominator of "% of peak".
//
// GFLOP/s counts the conventional 4 * batch * heads * seqlen_q * seqlen_k * head_dim flops,
// halved when causal (ForwardFlops), so the causal rate is comparable with the dense one.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/attention_params.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/dtype.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

constexpr int kBatch = 1;
constexpr int64_t kSeqLen = 1024;
constexpr int kHeads = 8;
constexpr int kHeadDim = 64;

// Inputs and outputs of the benchmarked call, contiguous: fp32, or bf16 bits (q, k, v and o
// in the 16-bit vectors).
struct Problem {
  AttentionParams p;
  std::vector<float> q, k, v, o;             // [batch, seq, heads, head_dim], fp32
  std::vector<uint16_t> q16, k16, v16, o16;  // the same, bf16
  std::vector<float> lse;                    // [batch, heads, seq]
};

Problem MakeProblem(bool causal, int64_t seqlen = kSeqLen, int head_dim = kHeadDim,
                    DType dtype = DType::kF32) {
  Problem pr;
  AttentionParams& p = pr.p;
  p.batch = kBatch;
  p.seqlen_q = p.seqlen_k = seqlen;
  p.heads = p.heads_k = kHeads;
  p.head_dim = head_dim;
  p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  p.causal = causal;
  p.dtype = p.o_dtype = dtype;
  const size_t n = static_cast<size_t>(kBatch) * seqlen * kHeads * head_dim;
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  for (std::vector<float>* t : {&pr.q, &pr.k, &pr.v}) {
    t->resize(n);
    for (float& x : *t) x = dist(rng);
  }
  pr.o.resize(n);
  pr.lse.resize(static_cast<size_t>(kBatch) * kHeads * seqlen);
  p.q = pr.q.data();
  p.k = pr.k.data();
  p.v = pr.v.data();
  p.o = pr.o.data();
  if (dtype == DType::kBF16) {
    for (auto [from, to] : {std::pair{&pr.q, &pr.q16}, {&pr.k, &pr.k16}, {&pr.v, &pr.v16}}) {
      to->resize(n);
      for (size_t i = 0; i < n; ++i) (*to)[i] = FloatToBf16((*from)[i]);
    }
    pr.o16.resize(n);
    p.q = pr.q16.data();
    p.k = pr.k16.data();
    p.v = pr.v16.data();
    p.o = pr.o16.data();
  }
  p.lse = pr.lse.data();
  SetContiguousStrides(&p);
  return pr;
}

void SetFlopCounters(benchmark::State& state, const AttentionParams& p) {
  state.counters["GFLOP"] =
      benchmark::Counter(ForwardFlops(p) * 1e-9 * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
}

// The timed loop of every forward benchmark: FlashCpuForward on `pr` with `threads`.
void TimeForward(benchmark::State& state, const Problem& pr, int threads) {
  const FlashCpuOptions options{.num_threads = threads};
  for (auto _ : state) {
    if (!FlashCpuForward(pr.p, options).ok()) state.SkipWithError("FlashCpuForward failed");
    benchmark::DoNotOptimize(pr.p.o);
    benchmark::ClobberMemory();
  }
  SetFlopCounters(state, pr.p);
}

// Args: {causal, num_threads (0: hardware concurrency)}.
void BM_FlashCpuForward(benchmark::State& state) {
  TimeForward(state, MakeProblem(state.range(0) != 0), static_cast<int>(state.range(1)));
}
BENCHMARK(BM_FlashCpuForward)
    ->ArgNames({"causal", "threads"})
    ->Args({0, 1})
    ->Args({1, 1})
    ->Args({0, 0})
    ->Args({1, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: {head_dim, bf16 (0: fp32), causal}: seqlen 1024, one thread (issue #20's d and
// dtype rows beside PyTorch's).
void BM_FlashCpuForwardShapes(benchmark::State& state) {
  TimeForward(state,
              MakeProblem(state.range(2) != 0, kSeqLen, static_cast<int>(state.range(0)),
                          state.range(1) != 0 ? DType::kBF16 : DType::kF32),
              1);
}
BENCHMARK(BM_FlashCpuForwardShapes)
    ->ArgNames({"d", "bf16", "causal"})
    ->ArgsProduct({{64, 128}, {0, 1}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: {threads}: seqlen 8192, causal.
void BM_FlashCpuForwardScaling(benchmark::State& state) {
  TimeForward(state, MakeProblem(/*causal=*/true, 8192), static_cast<int>(state.range(0)));
}
BENCHMARK(BM_FlashCpuForwardScaling)
    ->ArgNames({"threads"})
    ->Apply([](benchmark::internal::Benchmark* b) {
      const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
      for (int t = 1; t < hw; t *= 2) b->Arg(t);
      b->Arg(hw);
    })
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: {causal}. Single-threaded by construction.
void BM_ReferenceForward(benchmark::State& state) {
  Problem pr = MakeProblem(state.range(0) != 0);
  for (auto _ : state) {
    auto result = ReferenceForward(pr.p);
    if (!result.ok()) state.SkipWithError("ReferenceForward failed");
    benchmark::DoNotOptimize(result);
  }
  SetFlopCounters(state, pr.p);
}
BENCHMARK(BM_ReferenceForward)
    ->ArgNames({"causal"})
    ->Arg(0)
    ->Arg(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// The core's fp32 fused multiply-add peak on one thread (issue #20's "% of peak"): 12
// independent vector accumulators (latency 4 x 2 FMA ports, and more), AVX-512 where the
// machine has it, else AVX2; 2 flops per lane per FMA.
#if defined(__x86_64__)
// Vector arguments outside AVX functions change the ABI (-Wpsabi); every call below happens
// inside a function compiled for the vector's target, so none crosses it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename Vec, int kLanes, Vec (*kFma)(Vec, Vec, Vec), Vec (*kSet1)(float)>
double FmaLoop(int64_t iters) {
  constexpr int kAcc = 12;
  Vec acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = kSet1(static_cast<float>(i));
  const Vec a = kSet1(0.999999f), b = kSet1(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kAcc; ++i) acc[i] = kFma(acc[i], a, b);
  }
  for (int i = 0; i < kAcc; ++i) benchmark::DoNotOptimize(acc[i]);
  return 2.0 * kLanes * kAcc * static_cast<double>(iters);
}
__attribute__((target("avx512f"))) __m512 Fma512(__m512 x, __m512 a, __m512 b) {
  return _mm512_fmadd_ps(x, a, b);
}
__attribute__((target("avx512f"))) __m512 Set512(float v) { return _mm512_set1_ps(v); }
__attribute__((target("avx2,fma"))) __m256 Fma256(__m256 x, __m256 a, __m256 b) {
  return _mm256_fmadd_ps(x, a, b);
}
__attribute__((target("avx2,fma"))) __m256 Set256(float v) { return _mm256_set1_ps(v); }
__attribute__((target("avx512f"), flatten)) double FmaLoop512(int64_t iters) {
  return FmaLoop<__m512, 16, Fma512, Set512>(iters);
}
__attribute__((target("avx2,fma"), flatten)) double FmaLoop256(int64_t iters) {
  return FmaLoop<__m256, 8, Fma256, Set256>(iters);
}

void BM_FmaPeak(benchmark::State& state) {
  const bool avx512 = __builtin_cpu_supports("avx512f");
  if (!avx512 && !__builtin_cpu_supports("fma")) {
    state.SkipWithError("no FMA");
    return;
  }
  double flops = 0;
  for (auto _ : state) flops += avx512 ? FmaLoop512(1 << 20) : FmaLoop256(1 << 20);
  state.counters["GFLOP"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsRate);
  state.SetLabel(avx512 ? "avx512" : "avx2");
}
BENCHMARK(BM_FmaPeak)->Unit(benchmark::kMillisecond)->UseRealTime();
#pragma GCC diagnostic pop
#endif

}  // namespace
}  // namespace ringattn

BENCHMARK_MAIN();
