// Benchmark of the device ring on one GPU (not a test). At b = 1, h = 32, h_k = 8, d = 128,
// bf16, causal, zigzag, for each sequence length it times
//   single   the "cuda" kernel once on the whole sequence;
//   ring W=1 the device ring driver with one rank (one kernel call into the caller's output:
//            the target is within 3% of single), called on this thread;
//   ring W=2, W=4  the in-process ring, every rank a thread on this GPU (they share its SMs, so
//            this measures the ring's overhead and overlap, not W GPUs of throughput).
// Inputs are device-resident (filled by a hash kernel; shards of the ring get their own values:
// a benchmark, not a check). Each row: warm-up calls, then the median of the timed calls. Wall
// time is host time around the call and its completion (the single call: Forward plus
// cudaStreamSynchronize; the ring: the call, which waits for its streams); GPU time is from
// cudaEvents (single: around the kernel; ring: the per-step events, summed per rank). Per ring
// row: the slowest rank's device time (first to last operation of the call on its compute
// stream) and enqueue time (host, call start to last launch), every rank's compute (sum of its
// steps), and the hidden share of communication,
// 1 - sum(comm wait) / sum(compute + comm wait) over all ranks and steps. TFLOP/s from wall
// time and ForwardFlops of the whole problem (4 b h s^2 d, halved for causal).
//
// Usage: gpu_ring_bench [--json PATH] [--iters N] [--warmup N] [--seqlen S]...
//   --json PATH  also write one JSON object per row (JSON lines) to PATH
//   --iters N    timed calls per row (default 10)
//   --warmup N   untimed calls before them (default 2)
//   --seqlen S   run this sequence length (repeatable; default 8192 16384 32768)
// Exits non-zero on any CUDA or ring error, on NaN in an output, and without a CUDA device.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/gpu_bench_util.cuh"
#include "bench/gpu_timing.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_params.h"
#include "kernels/backend_registry.h"
#include "kernels/params_check.h"
#include "ring/device_ring.h"
#include "ring/layout.h"
#include "ring/testing/inprocess_ranks.h"
#include "ring/transport/device_communicator.h"
#include "ring/transport/inprocess.h"

namespace ringattn {
namespace {

using bench::CheckStatus;
using bench::CurrentDevice;
using bench::DeviceMemory;
using bench::FillBf16;
using bench::TimeOnce;
using bench::Median;

using Clock = std::chrono::steady_clock;

constexpr int kBatch = 1;
constexpr int kHeads = 32;
constexpr int kHeadsK = 8;
constexpr int kHeadDim = 128;
constexpr bool kCausal = true;

// NaN or infinity among the first n of `o` (bf16), NaN among `lse` (fp32).
int64_t CountBad(const void* o, int64_t n, const float* lse, int64_t lse_n) {
  std::vector<uint16_t> host_o(n);
  std::vector<float> host_lse(lse_n);
  if (n > 0) {
    BENCH_CUDA_CHECK(cudaMemcpy(host_o.data(), o, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  }
  if (lse_n > 0) {
    BENCH_CUDA_CHECK(
        cudaMemcpy(host_lse.data(), lse, lse_n * sizeof(float), cudaMemcpyDeviceToHost));
  }
  int64_t bad = 0;
  for (uint16_t bits : host_o) bad += (bits & 0x7f80u) == 0x7f80u;
  for (float x : host_lse) bad += std::isnan(x);
  return bad;
}

// One rank's shard (or the whole problem): [batch, rows, heads(_k), head_dim] bf16, lse fp32.
struct Tensors {
  DeviceMemory q, k, v, o, lse;
  int64_t rows;
  explicit Tensors(int64_t r)
      : q(kBatch * r * kHeads * kHeadDim * 2),
        k(kBatch * r * kHeadsK * kHeadDim * 2),
        v(kBatch * r * kHeadsK * kHeadDim * 2),
        o(kBatch * r * kHeads * kHeadDim * 2),
        lse(kBatch * kHeads * r * sizeof(float)),
        rows(r) {}
  void Fill(uint32_t seed, cudaStream_t stream) {
    FillBf16(q.ptr, q.bytes / 2, seed * 3 + 1, stream);
    FillBf16(k.ptr, k.bytes / 2, seed * 3 + 2, stream);
    FillBf16(v.ptr, v.bytes / 2, seed * 3 + 3, stream);
  }
  RingShardTensors View() const {
    RingShardTensors t;
    t.dtype = DType::kBF16;
    t.batch = kBatch;
    t.heads = kHeads;
    t.heads_k = kHeadsK;
    t.head_dim = kHeadDim;
    t.q = q.ptr;
    t.k = k.ptr;
    t.v = v.ptr;
    t.out = o.ptr;
    t.lse = static_cast<float*>(lse.ptr);
    return t;
  }
  int64_t Bad() const {
    return CountBad(o.ptr, kBatch * rows * kHeads * kHeadDim, static_cast<const float*>(lse.ptr),
                    kBatch * kHeads * rows);
  }
};

struct Row {
  std::string impl;
  int world = 1;
  int64_t seqlen = 0;
  double wall_ms = 0;              // median
  double gpu_ms = 0;               // median; ring: the slowest rank's compute + wait
  std::vector<double> compute_ms;  // per rank, the median iteration's step sums
  double device_ms = 0;            // ring: median of the slowest rank's device time
  double launch_ms = 0;            // ring: median of the slowest rank's enqueue time
  double hidden_share = -1;        // ring rows with W > 1; -1: nothing to hide
  double tflops = 0;
};

// Results of the ring's timed calls -> a Row.
Row RingRow(const std::string& impl, int world, int64_t seqlen, double flops,
            const std::vector<double>& wall_s, const std::vector<std::vector<RingTimings>>& runs) {
  Row row;
  row.impl = impl;
  row.world = world;
  row.seqlen = seqlen;
  row.wall_ms = Median(wall_s) * 1e3;
  std::vector<double> gpu, device, launch;  // per run, the slowest rank's
  double waits = 0, busy = 0;
  for (const std::vector<RingTimings>& run : runs) {
    double slowest = 0, d = 0, l = 0;
    for (const RingTimings& rt : run) {
      slowest = std::max(slowest, rt.compute_seconds() + rt.comm_wait_seconds());
      d = std::max(d, rt.device_seconds);
      l = std::max(l, rt.launch_seconds);
      waits += rt.comm_wait_seconds();
      busy += rt.compute_seconds() + rt.comm_wait_seconds();
    }
    gpu.push_back(slowest);
    device.push_back(d);
    launch.push_back(l);
  }
  row.gpu_ms = Median(gpu) * 1e3;
  row.device_ms = Median(device) * 1e3;
  row.launch_ms = Median(launch) * 1e3;
  // Per-rank compute of the run whose wall time is nearest the median.
  const double median_wall = Median(wall_s);
  size_t pick = 0;
  for (size_t i = 1; i < wall_s.size(); ++i) {
    if (std::abs(wall_s[i] - median_wall) < std::abs(wall_s[pick] - median_wall)) pick = i;
  }
  for (const RingTimings& rt : runs[pick]) row.compute_ms.push_back(rt.compute_seconds() * 1e3);
  if (world > 1) row.hidden_share = busy > 0 ? 1.0 - waits / busy : 1.0;
  row.tflops = flops / (row.wall_ms * 1e-3) / 1e12;
  return row;
}

int Main(int argc, char** argv) {
  std::string json_path;
  int iters = 10;
  int warmup = 2;
  std::vector<int64_t> seqlens;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (arg == "--iters" && i + 1 < argc) {
      iters = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--warmup" && i + 1 < argc) {
      warmup = std::max(0, std::atoi(argv[++i]));
    } else if (arg == "--seqlen" && i + 1 < argc) {
      seqlens.push_back(std::max<int64_t>(1, std::atoll(argv[++i])));
    } else {
      std::fprintf(stderr, "usage: %s [--json PATH] [--iters N] [--warmup N] [--seqlen S]...\n",
                   argv[0]);
      return 2;
    }
  }
  if (seqlens.empty()) seqlens = {8192, 16384, 32768};

  cudaDeviceProp prop;
  if (!CurrentDevice(&prop)) return 1;
  std::printf("b=%d h=%d h_k=%d d=%d bf16 causal=%d zigzag; median of %d after %d warm-up\n",
              kBatch, kHeads, kHeadsK, kHeadDim, kCausal ? 1 : 0, iters, warmup);

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
  const std::chrono::milliseconds timeout = std::chrono::minutes(10);
  RingAttentionOptions options;
  options.causal = kCausal;

  std::printf("%-9s %2s %6s %10s %10s %9s %8s %7s %9s %9s  %s\n", "impl", "W", "s", "wall ms",
              "gpu ms", "TFLOP/s", "vs single", "hidden", "device ms", "launch ms",
              "compute ms per rank");
  for (const int64_t seqlen : seqlens) {
    AttentionParams whole_p;
    whole_p.batch = kBatch;
    whole_p.seqlen_q = whole_p.seqlen_k = seqlen;
    whole_p.heads = kHeads;
    whole_p.heads_k = kHeadsK;
    whole_p.head_dim = kHeadDim;
    whole_p.dtype = whole_p.o_dtype = DType::kBF16;
    whole_p.causal = kCausal;
    whole_p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
    SetContiguousStrides(&whole_p);
    const double flops = ForwardFlops(whole_p);
    std::vector<Row> rows;

    Tensors whole(seqlen);
    whole.Fill(1, stream);
    BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
    whole_p.q = whole.q.ptr;
    whole_p.k = whole.k.ptr;
    whole_p.v = whole.v.ptr;
    whole_p.o = whole.o.ptr;
    whole_p.lse = static_cast<float*>(whole.lse.ptr);

    // (a) The kernel once on the whole sequence.
    {
      absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend("cuda");
      CheckStatus(backend.status(), "MakeBackend");
      const ExecutionContext on_stream{stream};
      for (int i = 0; i < warmup; ++i) {
        CheckStatus((*backend)->Forward(whole_p, on_stream), "warm-up");
      }
      BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
      std::vector<double> wall, gpu;
      for (int i = 0; i < iters; ++i) {
        const auto t0 = Clock::now();
        BENCH_CUDA_CHECK(cudaEventRecord(start, stream));
        CheckStatus((*backend)->Forward(whole_p, on_stream), "single call");
        BENCH_CUDA_CHECK(cudaEventRecord(stop, stream));
        BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
        wall.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        float ms = 0;
        BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
        gpu.push_back(ms * 1e-3);
      }
      if (whole.Bad() != 0) {
        std::fprintf(stderr, "single call: NaN/inf outputs at s=%lld\n",
                     static_cast<long long>(seqlen));
        return 1;
      }
      Row row;
      row.impl = "single";
      row.seqlen = seqlen;
      row.wall_ms = Median(wall) * 1e3;
      row.gpu_ms = Median(gpu) * 1e3;
      row.compute_ms = {row.gpu_ms};
      row.tflops = flops / (row.wall_ms * 1e-3) / 1e12;
      rows.push_back(row);
    }

    // (b) The ring driver with one rank, on this thread: what a one-GPU worker runs.
    {
      absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, 1, Layout::kZigzag);
      CheckStatus(plan.status(), "PlanShards");
      absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> comms =
          InProcessDeviceGroup::CreateCommunicators(1, timeout);
      CheckStatus(comms.status(), "CreateCommunicators");
      absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend("cuda");
      CheckStatus(backend.status(), "MakeBackend");
      DeviceRingWorkspace ws;
      // With one rank the shard is the whole sequence in order (zigzag's two chunks follow).
      const RingShardTensors t = whole.View();
      for (int i = 0; i < warmup; ++i) {
        CheckStatus(
            RingFlashAttnForwardDevice(*(*comms)[0], **backend, *plan, t, options, &ws).status(),
            "ring(1) warm-up");
      }
      std::vector<double> wall;
      std::vector<std::vector<RingTimings>> runs;
      for (int i = 0; i < iters; ++i) {
        const auto t0 = Clock::now();
        absl::StatusOr<RingTimings> r =
            RingFlashAttnForwardDevice(*(*comms)[0], **backend, *plan, t, options, &ws);
        wall.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        CheckStatus(r.status(), "ring(1)");
        runs.push_back({*std::move(r)});
      }
      if (whole.Bad() != 0) {
        std::fprintf(stderr, "ring(1): NaN/inf outputs at s=%lld\n",
                     static_cast<long long>(seqlen));
        return 1;
      }
      rows.push_back(RingRow("ring", 1, seqlen, flops, wall, runs));
    }

    // (c) The in-process ring, W ranks as threads on this GPU, device-resident shards.
    for (const int world : {2, 4}) {
      absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, world, Layout::kZigzag);
      CheckStatus(plan.status(), "PlanShards");
      std::vector<std::unique_ptr<Tensors>> shards;
      std::vector<RingShardTensors> views;
      for (int r = 0; r < world; ++r) {
        shards.push_back(std::make_unique<Tensors>(plan->shards[r].rows));
        shards.back()->Fill(100 + r, stream);
        views.push_back(shards.back()->View());
      }
      BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
      absl::StatusOr<std::unique_ptr<DeviceInProcessRing>> ring = DeviceInProcessRing::Create(
          world, [] { return MakeBackend("cuda"); }, timeout);
      CheckStatus(ring.status(), "DeviceInProcessRing::Create");
      for (int i = 0; i < warmup; ++i) {
        CheckStatus((*ring)->Run(*plan, views, options).status(), "ring warm-up");
      }
      std::vector<double> wall;
      std::vector<std::vector<RingTimings>> runs;
      for (int i = 0; i < iters; ++i) {
        const auto t0 = Clock::now();
        absl::StatusOr<std::vector<RingTimings>> r = (*ring)->Run(*plan, views, options);
        wall.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        CheckStatus(r.status(), "ring");
        runs.push_back(*std::move(r));
      }
      for (int r = 0; r < world; ++r) {
        if (shards[r]->Bad() != 0) {
          std::fprintf(stderr, "ring(%d): NaN/inf outputs on rank %d at s=%lld\n", world, r,
                       static_cast<long long>(seqlen));
          return 1;
        }
      }
      rows.push_back(RingRow("ring", world, seqlen, flops, wall, runs));
    }

    const Row& single = rows[0];
    for (const Row& row : rows) {
      const double ratio = row.wall_ms / single.wall_ms;
      std::vector<std::string> per_rank;
      for (double ms : row.compute_ms) per_rank.push_back(absl::StrFormat("%.3f", ms));
      const std::string hidden =
          row.hidden_share < 0 ? "-" : absl::StrFormat("%.1f%%", 100.0 * row.hidden_share);
      std::printf("%-9s %2d %6lld %10.3f %10.3f %9.1f %8.3fx %7s %9.3f %9.3f  %s\n",
                  row.impl.c_str(), row.world, static_cast<long long>(row.seqlen), row.wall_ms,
                  row.gpu_ms, row.tflops, ratio, hidden.c_str(), row.device_ms, row.launch_ms,
                  absl::StrJoin(per_rank, " ").c_str());
      if (row.impl == "ring" && row.world == 1) {
        std::printf("          ring(W=1)/single: wall %.4f, gpu %.4f (target <= 1.03)\n", ratio,
                    row.gpu_ms / single.gpu_ms);
      }
      if (json != nullptr) {
        std::fprintf(
            json,
            "{\"impl\": \"%s\", \"world\": %d, \"device\": \"%s\", \"dtype\": \"bf16\", "
            "\"batch\": %d, \"seqlen\": %lld, \"heads\": %d, \"heads_k\": %d, "
            "\"head_dim\": %d, \"causal\": %s, \"layout\": \"zigzag\", \"iters\": %d, "
            "\"wall_ms\": %.6f, \"gpu_ms\": %.6f, \"tflops\": %.3f, "
            "\"ratio_vs_single\": %.6f, \"hidden_share\": %s, \"device_ms\": %.6f, "
            "\"launch_ms\": %.6f, \"compute_ms_per_rank\": [%s]}\n",
            row.impl.c_str(), row.world, prop.name, kBatch, static_cast<long long>(row.seqlen),
            kHeads, kHeadsK, kHeadDim, kCausal ? "true" : "false", iters, row.wall_ms, row.gpu_ms,
            row.tflops, ratio,
            row.hidden_share < 0 ? "null" : absl::StrFormat("%.6f", row.hidden_share).c_str(),
            row.device_ms, row.launch_ms, absl::StrJoin(per_rank, ", ").c_str());
        std::fflush(json);
      }
    }
    std::fflush(stdout);
  }
  BENCH_CUDA_CHECK(cudaEventDestroy(start));
  BENCH_CUDA_CHECK(cudaEventDestroy(stop));
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
