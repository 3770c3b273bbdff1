// Unit tests of the comparison framework's pieces: case parsing, latency percentiles, the ring
// step summary, tolerances, heap accounting and the JSON writer; the multigpu preset, and the
// multi-GPU implementations reporting "not available" on a machine with too few GPUs (every
// machine, for a ring one rank larger than the GPUs present), which is what CI without GPUs sees.
#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "bench/compare/cases.h"
#include "bench/compare/implementations.h"
#include "bench/compare/metrics.h"
#include "bench/compare/runner.h"
#include "gtest/gtest.h"

namespace ringattn::compare {
namespace {

TEST(Cases, ParsesKeyValueAndJsonLines) {
  absl::StatusOr<std::vector<ComparisonCase>> cases = ParseCases(
      "# a comment\n"
      "\n"
      "name=kv seqlen=300 heads=4 heads_k=2 dtype=fp16 causal=true worlds=1,3 window=16,0\n"
      "{\"name\": \"js\", \"seqlen\": 1024, \"head_dim\": 128, \"worlds\": [1, 2, 4], "
      "\"alibi\": true, \"softcap\": 30, \"layout\": \"stripe\"}\n");
  ASSERT_TRUE(cases.ok()) << cases.status();
  ASSERT_EQ(cases->size(), 2u);
  const ComparisonCase& a = (*cases)[0];
  EXPECT_EQ(a.name, "kv");
  EXPECT_EQ(a.seqlen, 300);
  EXPECT_EQ(a.kv_heads(), 2);
  EXPECT_EQ(a.dtype, DType::kF16);
  EXPECT_TRUE(a.causal);
  EXPECT_EQ(a.worlds, (std::vector<int>{1, 3}));
  EXPECT_EQ(a.window_left, 16);
  EXPECT_EQ(a.window_right, 0);
  const ComparisonCase& b = (*cases)[1];
  EXPECT_EQ(b.name, "js");
  EXPECT_EQ(b.head_dim, 128);
  EXPECT_EQ(b.kv_heads(), b.heads);
  EXPECT_EQ(b.worlds, (std::vector<int>{1, 2, 4}));
  EXPECT_TRUE(b.alibi);
  EXPECT_FLOAT_EQ(b.softcap, 30.0f);
  EXPECT_EQ(b.layout, "stripe");
}

TEST(Cases, ErrorsNameTheLineAndTheKey) {
  absl::StatusOr<std::vector<ComparisonCase>> r = ParseCases("seqlen=64\nseqlen=64 head_dim=96\n");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("line 2"), std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find("96"), std::string::npos) << r.status();
  r = ParseCases("seqlen=64 colour=red\n");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("colour"), std::string::npos) << r.status();
  EXPECT_FALSE(ParseCases("{\"seqlen\": 64,\n").ok());
  EXPECT_FALSE(ParseCases("seqlen=64 worlds=0\n").ok());
  EXPECT_FALSE(ParseCases("seqlen=64 heads=6 heads_k=4\n").ok());
  EXPECT_FALSE(ParseCases("# nothing\n").ok());
  EXPECT_FALSE(ParseCases("seqlen=64 gpus=-1\n").ok());
}

TEST(Cases, ParsesPackedSequenceBounds) {
  absl::StatusOr<std::vector<ComparisonCase>> cases =
      ParseCases("seqlen=300 cu_seqlens=0,1,100,300\n{\"seqlen\": 64, \"cu_seqlens\": [0, 64]}\n");
  ASSERT_TRUE(cases.ok()) << cases.status();
  EXPECT_EQ((*cases)[0].cu_seqlens, (std::vector<int64_t>{0, 1, 100, 300}));
  EXPECT_EQ((*cases)[1].cu_seqlens, (std::vector<int64_t>{0, 64}));
  EXPECT_NE(CaseShape((*cases)[0]).find("packed3"), std::string::npos);
  for (const char* bad : {"seqlen=300 cu_seqlens=0,100\n", "seqlen=300 cu_seqlens=1,300\n",
                          "seqlen=300 cu_seqlens=0,200,100,300\n"}) {
    absl::StatusOr<std::vector<ComparisonCase>> r = ParseCases(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.status().message().find("cu_seqlens"), std::string::npos) << r.status();
  }
}

TEST(Cases, ParsesTheGpusACaseNeeds) {
  absl::StatusOr<std::vector<ComparisonCase>> cases =
      ParseCases("seqlen=64 gpus=4\n{\"seqlen\": 64}\n");
  ASSERT_TRUE(cases.ok()) << cases.status();
  EXPECT_EQ((*cases)[0].gpus, 4);
  EXPECT_EQ((*cases)[1].gpus, 0);
}

TEST(Cases, PresetsAreValid) {
  for (const std::string& name : PresetNames()) {
    absl::StatusOr<CaseSet> set = PresetCases(name);
    ASSERT_TRUE(set.ok()) << name << ": " << set.status();
    EXPECT_FALSE(set->cases.empty()) << name;
    EXPECT_FALSE(set->default_implementations.empty()) << name;
  }
  EXPECT_FALSE(PresetCases("nightly").ok());
}

TEST(Cases, MultiGpuPresetRunsNcclRingsAtTwoFourAndEightGpus) {
  absl::StatusOr<CaseSet> set = PresetCases("multigpu");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->default_implementations,
            (std::vector<std::string>{"single_cudnn", "single_cuda", "ring_nccl_cudnn",
                                      "ring_nccl_cuda"}));
  const ImplementationRegistry registry = BuiltinImplementations();
  for (const std::string& name : set->default_implementations) {
    EXPECT_TRUE(registry.Make(name).ok()) << name;
  }
  ASSERT_EQ(set->cases.size(), 7u);
  // The correctness case: small enough for the fp64 references (forward and backward), needs
  // no GPU count of its own; its worlds above the machine's GPUs report "not available".
  const ComparisonCase& check = set->cases[0];
  EXPECT_EQ(check.seqlen, 3816);
  EXPECT_EQ(check.heads, 8);
  EXPECT_EQ(check.kv_heads(), 2);
  EXPECT_EQ(check.head_dim, 64);
  EXPECT_TRUE(check.backward);
  EXPECT_EQ(check.gpus, 0);
  EXPECT_EQ(check.worlds, (std::vector<int>{2, 4, 8}));
  absl::StatusOr<Problem> shape = DescribeProblem(check);
  ASSERT_TRUE(shape.ok()) << shape.status();
  EXPECT_LE(2.5 * shape->forward_flops(), set->reference_flop_limit);
  // The sized cases: 8k and 16k tokens per GPU at W = 2, 4, 8, each needing its W GPUs.
  std::vector<std::vector<int64_t>> sized;  // {world, seqlen}
  for (size_t i = 1; i < set->cases.size(); ++i) {
    const ComparisonCase& c = set->cases[i];
    ASSERT_EQ(c.worlds.size(), 1u) << c.name;
    const int world = c.worlds[0];
    EXPECT_EQ(c.gpus, world) << c.name;
    EXPECT_EQ(c.heads, 32) << c.name;
    EXPECT_EQ(c.kv_heads(), 8) << c.name;
    EXPECT_EQ(c.head_dim, 128) << c.name;
    EXPECT_EQ(c.dtype, DType::kBF16) << c.name;
    EXPECT_TRUE(c.causal) << c.name;
    EXPECT_EQ(c.layout, "zigzag") << c.name;
    absl::StatusOr<Problem> p = DescribeProblem(c);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_GT(p->forward_flops(), set->reference_flop_limit) << c.name;
    sized.push_back({world, c.seqlen});
  }
  EXPECT_EQ(sized, (std::vector<std::vector<int64_t>>{
                       {2, 16384}, {2, 32768}, {4, 32768}, {4, 65536}, {8, 65536}, {8, 131072}}));
}

TEST(Metrics, NearestRankPercentiles) {
  std::vector<double> s;
  for (int i = 100; i >= 1; --i) s.push_back(i);
  const LatencyStats l = SummarizeLatency(s);
  EXPECT_EQ(l.count, 100);
  EXPECT_EQ(l.p50, 50);
  EXPECT_EQ(l.p99, 99);
  EXPECT_EQ(l.min, 1);
  EXPECT_EQ(l.max, 100);
  EXPECT_DOUBLE_EQ(l.mean, 50.5);
  const LatencyStats few = SummarizeLatency({3, 1, 2});
  EXPECT_EQ(few.p50, 2);
  EXPECT_EQ(few.p99, 3);  // the maximum below 100 samples
}

TEST(Metrics, RingHiddenShare) {
  // Two ranks, two steps; compute 3 s in total per rank, waits 1 s in total over both ranks.
  RingTimings r0, r1;
  r0.steps = {{0, 1.0, 0.0, 1}, {1, 2.0, 1.0, 1}};
  r1.steps = {{1, 1.5, 0.0, 1}, {0, 1.5, 0.0, 1}};
  const RingSummary s = SummarizeRing({{r0, r1}});
  EXPECT_EQ(s.ranks, 2);
  EXPECT_EQ(s.samples, 1);
  ASSERT_EQ(s.steps.size(), 2u);
  EXPECT_DOUBLE_EQ(s.steps[0].compute_mean, 1.25);
  EXPECT_DOUBLE_EQ(s.steps[1].comm_wait_mean, 0.5);
  EXPECT_DOUBLE_EQ(s.steps[1].comm_wait_max, 1.0);
  EXPECT_DOUBLE_EQ(s.compute_seconds, 6.0);
  EXPECT_DOUBLE_EQ(s.comm_wait_seconds, 1.0);
  EXPECT_DOUBLE_EQ(s.hidden_share, 1.0 - 1.0 / 7.0);
}

TEST(Metrics, TolerancesAreStricterThanTheSeeds) {
  const Tolerances seed = SeedTolerances();
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    const Tolerances tool = ToolTolerances(t);
    EXPECT_LT(tool.out.max_abs, seed.out.max_abs);
    EXPECT_LT(tool.grad.max_abs, seed.grad.max_abs);
    EXPECT_LT(BaselineTolerances(t).out.max_abs, seed.out.max_abs);
  }
  ErrorStats e;
  e.max_abs = 1e-3;
  e.rel_l2 = 1e-3;
  EXPECT_TRUE(ToolTolerances(DType::kBF16).out.Admits(e));
  EXPECT_FALSE(ToolTolerances(DType::kF32).out.Admits(e));
  e.nan_count = 1;
  EXPECT_FALSE(ToolTolerances(DType::kBF16).out.Admits(e));
}

TEST(Metrics, HeapPeakSeesAnAllocation) {
  HostHeap::ResetPeak();
  const int64_t before = HostHeap::LiveBytes();
  {
    auto block = std::make_unique<std::vector<char>>(1 << 20);
    EXPECT_GE(HostHeap::LiveBytes() - before, 1 << 20);
  }
  EXPECT_GE(HostHeap::PeakBytes() - before, 1 << 20);
  EXPECT_LT(HostHeap::LiveBytes() - before, 1 << 20);
}

TEST(Metrics, JsonEscapesAndNulls) {
  JsonObject o;
  o.Add("s", "a\"b\\c\n").Add("x", std::numeric_limits<double>::quiet_NaN()).Add("n", 3);
  o.Add("v", std::vector<int>{1, 2});
  EXPECT_EQ(o.ToString(), R"({"s":"a\"b\\c\n","x":null,"n":3,"v":[1,2]})");
}

TEST(Implementations, RegistryKnowsEveryNameAndRefusesOthers) {
  const ImplementationRegistry registry = BuiltinImplementations();
  for (const std::string& name : registry.Names()) {
    absl::StatusOr<std::unique_ptr<Implementation>> impl = registry.Make(name);
    ASSERT_TRUE(impl.ok()) << name;
    EXPECT_EQ((*impl)->name(), name);
  }
  EXPECT_EQ(registry.Names().size(), 8u);
  absl::StatusOr<std::unique_ptr<Implementation>> bad = registry.Make("triton");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("single_cpu"), std::string::npos);
}

TEST(Implementations, CpuRingMatchesSingleOnATinyCase) {
  ComparisonCase c;
  c.seqlen = 77;
  c.heads = 2;
  c.head_dim = 64;
  c.dtype = DType::kF32;
  c.causal = true;
  absl::StatusOr<Problem> problem = MakeProblem(c, 1, /*with_grad_output=*/false);
  ASSERT_TRUE(problem.ok()) << problem.status();
  const ImplementationRegistry registry = BuiltinImplementations();
  auto single = registry.Make("single_cpu");
  auto ring = registry.Make("ring_cpu");
  ASSERT_TRUE(single.ok() && ring.ok());
  absl::StatusOr<ForwardRun> a = (*single)->Forward(*problem, 1, Repeats{0, 1});
  absl::StatusOr<ForwardRun> b = (*ring)->Forward(*problem, 3, Repeats{0, 2});
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->seconds.size(), 1u);
  EXPECT_EQ(b->seconds.size(), 2u);
  ASSERT_EQ(b->ring.size(), 2u);
  EXPECT_EQ(b->ring[0].size(), 3u);
  EXPECT_GT(a->memory.peak_bytes, problem->input_bytes());
  ASSERT_EQ(a->out.size(), b->out.size());
  const auto* x = reinterpret_cast<const float*>(a->out.data());
  const auto* y = reinterpret_cast<const float*>(b->out.data());
  for (size_t i = 0; i < a->out.size() / sizeof(float); ++i) {
    ASSERT_NEAR(x[i], y[i], 1e-5) << i;
  }
}

// A small problem every implementation could compute (bf16, causal, GQA), with dout.
Problem TinyProblem() {
  ComparisonCase c;
  c.seqlen = 96;
  c.heads = 4;
  c.heads_k = 2;
  c.head_dim = 64;
  c.causal = true;
  absl::StatusOr<Problem> problem = MakeProblem(c, 1, /*with_grad_output=*/true);
  EXPECT_TRUE(problem.ok()) << problem.status();
  return *std::move(problem);
}

// "not available" in a row: Unavailable (this machine) or Unimplemented (this build).
bool IsNotAvailable(const absl::Status& s) {
  return absl::IsUnavailable(s) || absl::IsUnimplemented(s);
}

TEST(Implementations, NcclRingsAreNotAvailableWithTooFewGpus) {
  const int gpus = VisibleGpuCount();
  const int world = gpus + 1;  // more ranks than GPUs, on every machine
  const Problem problem = TinyProblem();
  const ImplementationRegistry registry = BuiltinImplementations();
  for (const char* name : {"ring_nccl_cuda", "ring_nccl_cudnn"}) {
    absl::StatusOr<std::unique_ptr<Implementation>> impl = registry.Make(name);
    ASSERT_TRUE(impl.ok()) << name;
    EXPECT_TRUE((*impl)->is_ring()) << name;
    EXPECT_EQ((*impl)->placement(), Placement::kDevice) << name;
    if (gpus == 0) {
      const absl::Status available = (*impl)->Available();
      EXPECT_TRUE(IsNotAvailable(available)) << name << ": " << available;
    }
    // Each call returns at once, naming the shortfall (or what the build lacks); nothing hangs
    // waiting for ranks that cannot exist.
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<ForwardRun> fwd = (*impl)->Forward(problem, world, Repeats{0, 1});
    ASSERT_FALSE(fwd.ok()) << name;
    EXPECT_TRUE(IsNotAvailable(fwd.status())) << name << ": " << fwd.status();
    absl::StatusOr<BackwardRun> bwd = (*impl)->Backward(problem, world, Repeats{0, 1});
    ASSERT_FALSE(bwd.ok()) << name;
    EXPECT_TRUE(IsNotAvailable(bwd.status())) << name << ": " << bwd.status();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10)) << name;
    if (absl::IsUnavailable(fwd.status()) && gpus > 0) {
      EXPECT_NE(fwd.status().message().find(absl::StrCat("needs ", world, " GPUs")),
                std::string::npos)
          << fwd.status();
    }
  }
}

TEST(Implementations, GpuSingleDeviceNotAvailableWithoutAGpu) {
  if (VisibleGpuCount() > 0) GTEST_SKIP() << "this machine has a GPU";
  const ImplementationRegistry registry = BuiltinImplementations();
  for (const char* name : {"single_cuda", "single_cudnn", "ring_cuda", "ring_cudnn"}) {
    absl::StatusOr<std::unique_ptr<Implementation>> impl = registry.Make(name);
    ASSERT_TRUE(impl.ok()) << name;
    const absl::Status available = (*impl)->Available();
    EXPECT_TRUE(IsNotAvailable(available)) << name << ": " << available;
  }
}

// The runner end to end on the host: a case needing more GPUs than the machine has is skipped
// (no inputs made, a not_available row per implementation and pass), and a ring over NCCL at a
// world above the GPU count reports not_available for that world while single_cpu runs.
TEST(Runner, MissingGpusAreNotAvailableNotFailures) {
  const int gpus = VisibleGpuCount();
  ComparisonCase needs_gpus;
  needs_gpus.name = "needs_more_gpus";
  needs_gpus.seqlen = 64;
  needs_gpus.heads = 2;
  needs_gpus.dtype = DType::kF32;
  needs_gpus.gpus = gpus + 1;
  needs_gpus.worlds = {gpus + 1};
  ComparisonCase runs = needs_gpus;
  runs.name = "too_many_ranks";
  runs.gpus = 0;
  runs.repeats = 1;
  ComparisonOptions options;
  options.cases.name = "test";
  options.cases.cases = {needs_gpus, runs};
  options.implementations = {"single_cpu", "ring_nccl_cuda"};
  options.out_dir = testing::TempDir() + "/compare_test_missing_gpus";
  std::ostringstream log;
  absl::StatusOr<ComparisonSummary> summary = RunComparison(options, log);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->errors, 0) << log.str();
  EXPECT_EQ(summary->failed, 0) << log.str();
  EXPECT_GE(summary->runs, 2) << log.str();  // single_cpu's forward and backward
  EXPECT_TRUE(summary->ok()) << log.str();
  // needs_more_gpus: 2 implementations x fwd (+ single_cpu's bwd where it has one, + the NCCL
  // ring's bwd where it has one); too_many_ranks: the ring's fwd (and bwd).
  EXPECT_GE(summary->not_available, 3) << log.str();
  EXPECT_NE(log.str().find("needs " + std::to_string(gpus + 1) + " GPUs"), std::string::npos)
      << log.str();
  std::ifstream results(summary->results_path);
  std::stringstream text;
  text << results.rdbuf();
  EXPECT_NE(text.str().find("\"case\":\"needs_more_gpus\""), std::string::npos);
  EXPECT_NE(text.str().find("\"status\":\"not_available\""), std::string::npos);
}

}  // namespace
}  // namespace ringattn::compare
