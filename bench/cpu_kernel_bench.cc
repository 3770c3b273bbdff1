// FlashCpuForward against ReferenceForward at one shape: batch 1, seqlen 1024 (queries and
// keys), 8 heads (MHA), head_dim 64, fp32 in and out, causal off and on. The kernel runs with
// 1 thread and with all hardware threads; BM_FlashCpuForwardScaling runs seqlen 8192 causal
// with 1, 2, 4, ... threads up to the hardware's (issue #20's thread scaling).
//
// GFLOP/s counts the conventional 4 * batch * heads * seqlen_q * seqlen_k * head_dim flops,
// halved when causal (ForwardFlops), so the causal rate is comparable with the dense one.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <random>
#include <thread>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/attention_params.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

constexpr int kBatch = 1;
constexpr int64_t kSeqLen = 1024;
constexpr int kHeads = 8;
constexpr int kHeadDim = 64;

// Inputs and outputs of the benchmarked call, fp32 and contiguous.
struct Problem {
  AttentionParams p;
  std::vector<float> q, k, v, o;  // [batch, seq, heads, head_dim]
  std::vector<float> lse;         // [batch, heads, seq]
};

Problem MakeProblem(bool causal, int64_t seqlen = kSeqLen) {
  Problem pr;
  AttentionParams& p = pr.p;
  p.batch = kBatch;
  p.seqlen_q = p.seqlen_k = seqlen;
  p.heads = p.heads_k = kHeads;
  p.head_dim = kHeadDim;
  p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  p.causal = causal;
  const size_t n = static_cast<size_t>(kBatch) * seqlen * kHeads * kHeadDim;
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
  p.lse = pr.lse.data();
  SetContiguousStrides(&p);
  return pr;
}

void SetFlopCounters(benchmark::State& state, const AttentionParams& p) {
  state.counters["GFLOP"] =
      benchmark::Counter(ForwardFlops(p) * 1e-9 * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
}

// Args: {causal, num_threads (0: hardware concurrency)}.
void BM_FlashCpuForward(benchmark::State& state) {
  Problem pr = MakeProblem(state.range(0) != 0);
  const FlashCpuOptions options{.num_threads = static_cast<int>(state.range(1))};
  for (auto _ : state) {
    if (!FlashCpuForward(pr.p, options).ok()) state.SkipWithError("FlashCpuForward failed");
    benchmark::DoNotOptimize(pr.o.data());
    benchmark::ClobberMemory();
  }
  SetFlopCounters(state, pr.p);
}
BENCHMARK(BM_FlashCpuForward)
    ->ArgNames({"causal", "threads"})
    ->Args({0, 1})
    ->Args({1, 1})
    ->Args({0, 0})
    ->Args({1, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: {threads}: seqlen 8192, causal.
void BM_FlashCpuForwardScaling(benchmark::State& state) {
  Problem pr = MakeProblem(/*causal=*/true, 8192);
  const FlashCpuOptions options{.num_threads = static_cast<int>(state.range(0))};
  for (auto _ : state) {
    if (!FlashCpuForward(pr.p, options).ok()) state.SkipWithError("FlashCpuForward failed");
    benchmark::DoNotOptimize(pr.o.data());
    benchmark::ClobberMemory();
  }
  SetFlopCounters(state, pr.p);
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

}  // namespace
}  // namespace ringattn

BENCHMARK_MAIN();
