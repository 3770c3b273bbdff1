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
#include <utility>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/attention_params.h"
#include "kernels/dtype.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/reference_attention.h"
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
  std::vector<float> q, k, v, o;  // [batch, seq, heads, head_dim], fp32
  std::vector<uint16_t> q16, k16, v16, o16;  // the same, bf16
  std::vector<float> lse;         // [batch, heads, seq]
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

}  // namespace
}  // namespace ringattn

BENCHMARK_MAIN();
