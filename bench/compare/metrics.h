// What the comparison measures and how it is summarised: latency percentiles, throughput, peak
// memory, the ring's per-step compute / communication-wait split, error tolerances, and the
// JSON lines the report is made from.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/error_metrics.h"
#include "kernels/dtype.h"
#include "ring/ring_step.h"  // RingTimings

namespace ringattn::compare {

// ---- Latency and throughput -------------------------------------------------------------------

// Percentiles by the nearest-rank method over the timed repeats: p50 is the median, p99 the
// value 99% of the repeats are at or below (the maximum for fewer than 100 repeats).
struct LatencyStats {
  int count = 0;
  double p50 = 0, p99 = 0, mean = 0, min = 0, max = 0;  // seconds
};
LatencyStats SummarizeLatency(std::vector<double> seconds);

// FLOPs of the forward as conventionally counted (kernels/params_check.h ForwardFlops) over a
// latency; tokens are batch * seqlen.
struct Throughput {
  double tflops = 0;  // FLOP/s * 1e-12
  double tokens_per_second = 0;
};
Throughput ThroughputOf(double flops, int64_t tokens, double seconds);

// ---- Memory -----------------------------------------------------------------------------------

// Host heap accounting: ringattn_compare replaces the global operator new / delete (in
// metrics.cc) with versions that count live bytes (malloc_usable_size) and their high-water
// mark. Covers every C++ allocation of the process (std::vector buffers of the kernels and the
// ring included); memory from malloc called directly or from mmap is not seen.
class HostHeap {
 public:
  static int64_t LiveBytes();
  static int64_t PeakBytes();
  // Restarts the high-water mark at the live bytes now.
  static void ResetPeak();
};

// Peak memory of one measured run and how it was obtained.
struct MemoryUse {
  std::string space;        // "host" or "device"
  std::string method;       // one line, shown in the report
  int64_t peak_bytes = -1;  // -1: not measured; a ring over several GPUs: the sum over them
  // A ring over several GPUs: each GPU's figure, [world] (rank r on GPU r); empty otherwise.
  std::vector<int64_t> per_gpu_bytes;
};

// The method strings, so that the report names them once.
inline constexpr std::string_view kHostMemoryMethod =
    "host: bytes of the whole-sequence inputs (q, k, v) plus the peak growth of the C++ heap "
    "during the warm-up and timed calls (operator new tracked: outputs, shard copies, ring "
    "buffers and accumulators, kernel workspace); in-process ranks share one process, so a "
    "ring's figure is the sum over its ranks";
inline constexpr std::string_view kDeviceMemoryMethod =
    "device: growth of used device memory (cudaMemGetInfo) from before the implementation "
    "allocates to after its last timed call, buffers still held (inputs, outputs, ring buffers, "
    "workspaces and cudaMallocAsync pool reservations); transient allocations freed inside a "
    "call are not seen; in-process ranks share one GPU, so a ring's figure is the sum over its "
    "ranks";
inline constexpr std::string_view kMultiGpuMemoryMethod =
    "devices, rings over several GPUs (ring_nccl_*): the same growth of used memory measured on "
    "every GPU of the ring (cudaMemGetInfo with that GPU current); peak is the sum over the "
    "GPUs, per rank the largest GPU's. The NCCL communicators are made once per world size "
    "before the first run and kept: their init-time memory is not counted, the buffers NCCL "
    "connects at a communicator's first transfer count in that first run only";

// ---- Ring steps -------------------------------------------------------------------------------

struct RingStepSummary {
  int step = 0;
  double compute_mean = 0, compute_max = 0;      // seconds, over ranks and timed repeats
  double comm_wait_mean = 0, comm_wait_max = 0;  // seconds
};

struct RingSummary {
  int ranks = 0;
  int samples = 0;                     // timed repeats summarised
  std::vector<RingStepSummary> steps;  // [world]
  double compute_seconds = 0;          // sum over ranks and steps, mean per repeat
  double comm_wait_seconds = 0;        // sum over ranks and steps, mean per repeat
  // 1 - sum(comm wait) / sum(step time), step time = compute + comm wait, over every rank,
  // step and repeat: the share of the ring's step time not spent waiting for transfers.
  double hidden_share = 1.0;
};

// `per_repeat[r][rank]`: the timings of every rank in each timed repeat.
RingSummary SummarizeRing(const std::vector<std::vector<RingTimings>>& per_repeat);

// ---- Tolerances -------------------------------------------------------------------------------

// Bounds on errors against the fp64 reference. An error passes when it has no NaN, no infinity
// mismatch and stays within both bounds.
struct ErrorBound {
  double max_abs = 0;
  double rel_l2 = 0;
  bool Admits(const ErrorStats& e) const;
};

struct Tolerances {
  ErrorBound out;   // the output
  ErrorBound lse;   // the fp32 log-sum-exp
  ErrorBound grad;  // each of dq, dk, dv
};

// The seed's bounds (SEED.md, for bf16): output error < 1e-2, gradient error < 5e-2, read as
// bounds on the maximum absolute error (the strictest reading); applied to every dtype.
Tolerances SeedTolerances();
// This tool's own, stricter bounds per dtype against fp64: both sides read the same rounded
// inputs and accumulate in fp32 or better, so what remains is about one rounding of the output
// to the dtype plus the kernel's fp32 arithmetic.
Tolerances ToolTolerances(DType dtype);
// Against the baseline implementation instead of fp64 (when the reference is skipped): two
// outputs each within one rounding of the truth differ by two at most, which the tool's bounds
// already hold (measured: bf16 max_abs 2e-3 between cuDNN and our kernel), so the same bounds.
Tolerances BaselineTolerances(DType dtype);

// A gradient's max_abs bound taken relative to the reference tensor's scale: multiplied by
// max(1, max |ref|). Gradients are not of unit scale (dV sums P^T dO over every query: at
// s 16k, |dV| reaches ~5), and one bf16 rounding of a value of 5 is 0.02 (cuDNN stores its
// gradients in bf16), so a fixed 1e-2 bound fails correct results at scale (H100, multigpu
// preset: dv max_abs 0.012-0.023, rel L2 0.0024-0.0034). rel_l2 is scale-free and unchanged.
ErrorBound ScaledToReference(ErrorBound bound, double ref_max_abs);

// ---- JSON lines -------------------------------------------------------------------------------

// Builds one JSON object. Non-finite numbers become null.
class JsonObject {
 public:
  JsonObject& Add(std::string_view key, std::string_view value);
  JsonObject& Add(std::string_view key, const char* value) {
    return Add(key, std::string_view(value));
  }
  JsonObject& Add(std::string_view key, double value);
  JsonObject& Add(std::string_view key, int64_t value);
  JsonObject& Add(std::string_view key, int value) { return Add(key, int64_t{value}); }
  JsonObject& Add(std::string_view key, bool value);
  JsonObject& AddNull(std::string_view key);
  JsonObject& Add(std::string_view key, const JsonObject& value);
  JsonObject& Add(std::string_view key, const std::vector<JsonObject>& values);
  JsonObject& Add(std::string_view key, const std::vector<std::string>& values);
  JsonObject& Add(std::string_view key, const std::vector<int>& values);
  JsonObject& Add(std::string_view key, const std::vector<int64_t>& values);
  std::string ToString() const { return "{" + body_ + "}"; }

 private:
  void Key(std::string_view key);
  std::string body_;
};

std::string JsonQuote(std::string_view s);

JsonObject ToJson(const ErrorStats& e);
JsonObject ToJson(const LatencyStats& l);
JsonObject ToJson(const ErrorBound& b);
JsonObject ToJson(const RingSummary& r);

}  // namespace ringattn::compare
