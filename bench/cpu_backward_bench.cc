// FlashCpuBackward against the fp64 ReferenceBackward at one shape: batch 1, seqlen 1024
// (queries and keys), 8 heads (MHA), head_dim 64, fp32, causal off and on; the fast kernel with
// 1 and 2 threads, and the fast forward at the same shape for the backward/forward ratio.
//
// GFLOP/s counts FlashAttention's conventional flops: backward 10 * batch * heads * seqlen_q *
// seqlen_k * head_dim (five products of the forward's size, BackwardFlops), forward 4 * ...,
// both halved when causal, so causal and dense rates compare.
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/attention_backward_params.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/flash_cpu_backward.h"
#include "kernels/cpu/reference_backward.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

constexpr int kBatch = 1;
constexpr int64_t kSeqLen = 1024;
constexpr int kHeads = 8;
constexpr int kHeadDim = 64;

// Inputs, the forward's results and the gradients of the benchmarked call, fp32, contiguous.
struct Problem {
  AttentionBackwardParams bp;
  std::vector<float> q, k, v, out, dout, dq, dk, dv;  // [batch, seq, heads, head_dim]
  std::vector<float> lse;                             // [batch, heads, seq]
};

std::unique_ptr<Problem> MakeProblem(bool causal) {
  auto pr = std::make_unique<Problem>();
  AttentionParams& p = pr->bp.fwd;
  p.batch = kBatch;
  p.seqlen_q = p.seqlen_k = kSeqLen;
  p.heads = p.heads_k = kHeads;
  p.head_dim = kHeadDim;
  p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  p.causal = causal;
  const size_t n = static_cast<size_t>(kBatch) * kSeqLen * kHeads * kHeadDim;
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  for (std::vector<float>* t : {&pr->q, &pr->k, &pr->v, &pr->dout}) {
    t->resize(n);
    for (float& x : *t) x = dist(rng);
  }
  for (std::vector<float>* t : {&pr->out, &pr->dq, &pr->dk, &pr->dv}) t->resize(n);
  pr->lse.resize(static_cast<size_t>(kBatch) * kHeads * kSeqLen);
  p.q = pr->q.data();
  p.k = pr->k.data();
  p.v = pr->v.data();
  p.o = pr->out.data();
  p.lse = pr->lse.data();
  AttentionBackwardParams& bp = pr->bp;
  bp.out = pr->out.data();
  bp.dout = pr->dout.data();
  bp.lse = pr->lse.data();
  bp.dq = pr->dq.data();
  bp.dk = pr->dk.data();
  bp.dv = pr->dv.data();
  SetContiguousBackwardStrides(&bp);
  if (!FlashCpuForward(p).ok()) return nullptr;  // out and lse for the backward
  return pr;
}

void SetFlopCounter(benchmark::State& state, double flops) {
  state.counters["GFLOP"] = benchmark::Counter(
      flops * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

// Args: {causal, num_threads}.
void BM_FlashCpuBackward(benchmark::State& state) {
  std::unique_ptr<Problem> pr = MakeProblem(state.range(0) != 0);
  if (pr == nullptr) return state.SkipWithError("forward failed");
  const FlashCpuOptions options{.num_threads = static_cast<int>(state.range(1))};
  for (auto _ : state) {
    if (!FlashCpuBackward(pr->bp, options).ok()) state.SkipWithError("FlashCpuBackward failed");
    benchmark::DoNotOptimize(pr->dq.data());
    benchmark::ClobberMemory();
  }
  SetFlopCounter(state, BackwardFlops(pr->bp));
}
BENCHMARK(BM_FlashCpuBackward)
    ->ArgNames({"causal", "threads"})
    ->Args({0, 1})
    ->Args({1, 1})
    ->Args({0, 2})
    ->Args({1, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: {causal, num_threads}.
void BM_FlashCpuForward(benchmark::State& state) {
  std::unique_ptr<Problem> pr = MakeProblem(state.range(0) != 0);
  if (pr == nullptr) return state.SkipWithError("forward failed");
  const FlashCpuOptions options{.num_threads = static_cast<int>(state.range(1))};
  for (auto _ : state) {
    if (!FlashCpuForward(pr->bp.fwd, options).ok()) state.SkipWithError("FlashCpuForward failed");
    benchmark::DoNotOptimize(pr->out.data());
    benchmark::ClobberMemory();
  }
  SetFlopCounter(state, ForwardFlops(pr->bp.fwd));
}
BENCHMARK(BM_FlashCpuForward)
    ->ArgNames({"causal", "threads"})
    ->Args({0, 2})
    ->Args({1, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: {causal}. Single-threaded by construction; one iteration takes seconds.
void BM_ReferenceBackward(benchmark::State& state) {
  std::unique_ptr<Problem> pr = MakeProblem(state.range(0) != 0);
  if (pr == nullptr) return state.SkipWithError("forward failed");
  for (auto _ : state) {
    auto result = ReferenceBackward(pr->bp);
    if (!result.ok()) state.SkipWithError("ReferenceBackward failed");
    benchmark::DoNotOptimize(result);
  }
  SetFlopCounter(state, BackwardFlops(pr->bp));
}
BENCHMARK(BM_ReferenceBackward)
    ->ArgNames({"causal"})
    ->Arg(0)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);

}  // namespace
}  // namespace ringattn

BENCHMARK_MAIN();
