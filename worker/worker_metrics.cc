#include "worker/worker_metrics.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <utility>

#include "proto/compute_rpcs.h"

namespace ringattn {
namespace {

// One ring step: 10 us (a small CPU block) to 10 s.
const prometheus::Histogram::BucketBoundaries& StepBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
      1e-2, 2.5e-2, 5e-2, 0.1,  0.25,   0.5,  1.0,  2.5,    10.0};
  return *buckets;
}

constexpr const char* kPhases[] = {"handler",        "receive",        "turn_wait",
                                   "ring",           "compute",        "comm_wait",
                                   "host_to_device", "device_to_host", "shared_memory_read",
                                   "shared_memory_write", "send"};

// The phases' seconds in kPhases' order.
std::array<double, std::size(kPhases)> PhaseSeconds(const v1::WorkerTiming& t) {
  return {t.handler_seconds(),        t.receive_seconds(),
          t.turn_wait_seconds(),      t.ring_seconds(),
          t.compute_seconds(),        t.comm_wait_seconds(),
          t.host_to_device_seconds(), t.device_to_host_seconds(),
          t.shared_memory_read_seconds(), t.shared_memory_write_seconds(),
          t.send_seconds()};
}

}  // namespace

int64_t RingBytesSent(const ShardPlan& plan, int rank, RingDirection direction,
                      const AttentionShape& shape) {
  const RingSchedule s = PlanRingSchedule(plan, rank, direction, shape, RingBackendTraits{});
  int64_t bytes = 0;
  for (const RingStepPlan& step : s.steps) {
    if (step.kv_send) bytes += 2 * static_cast<int64_t>(step.kv_send->bytes);  // K and V
    if (step.dkv_send) bytes += static_cast<int64_t>(step.dkv_send->bytes);
  }
  if (s.return_send) bytes += static_cast<int64_t>(s.return_send->bytes);
  return bytes;
}

WorkerMetrics::WorkerMetrics(const Info& info,
                             std::function<std::optional<RingEngine::DeviceMemory>()> gpu_memory)
    : MetricsEndpoint("worker") {
  static_assert(std::size(kPhases) == kNumPhases);
  prometheus::Registry& registry = this->registry();
  prometheus::BuildGauge()
      .Name("ringattn_worker_info")
      .Help("This worker's kernel backend, device and ring transport; always 1.")
      .Register(registry)
      .Add({{"backend", info.backend}, {"device", info.device}, {"transport", info.transport}})
      .Set(1);
  auto& calls = prometheus::BuildCounter()
                    .Name("ringattn_worker_calls_total")
                    .Help("Compute calls (one rank's shard of a request) by RPC and status code.")
                    .Register(registry);
  auto& seconds = prometheus::BuildCounter()
                      .Name("ringattn_worker_seconds_total")
                      .Help("Seconds of the OK compute calls by RPC and phase (ring: the ring "
                            "pass; its rate is the share of time the ring is busy).")
                      .Register(registry);
  auto& steps = prometheus::BuildHistogram()
                    .Name("ringattn_worker_step_seconds")
                    .Help("One ring step's compute and communication wait, in seconds.")
                    .Register(registry);
  for (const ComputeRpc* rpc : ComputeRpcs()) {
    PerRpc& r = rpcs_.emplace_back();
    r.name = std::string(rpc->name);
    for (int c = 0; c < kNumCodes; ++c) {
      r.calls[c] = &calls.Add(
          {{"rpc", r.name}, {"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(c))}});
    }
    for (int p = 0; p < kNumPhases; ++p) {
      r.seconds[p] = &seconds.Add({{"rpc", r.name}, {"phase", kPhases[p]}});
    }
    r.step_compute = &steps.Add({{"rpc", r.name}, {"part", "compute"}}, StepBuckets());
    r.step_comm_wait = &steps.Add({{"rpc", r.name}, {"part", "comm_wait"}}, StepBuckets());
  }
  bytes_sent_ = &prometheus::BuildCounter()
                     .Name("ringattn_worker_ring_bytes_sent_total")
                     .Help("Bytes this rank sent over the ring (K/V blocks, the backward's "
                           "dK/dV accumulators), as the ring's schedule plans them.")
                     .Register(registry)
                     .Add({{"transport", info.transport}});
  if (!gpu_memory) return;
  prometheus::Gauge* used = &prometheus::BuildGauge()
                                 .Name("ringattn_worker_gpu_memory_used_bytes")
                                 .Help("The GPU's memory in use, by every process on it.")
                                 .Register(registry)
                                 .Add({});
  prometheus::Gauge* total = &prometheus::BuildGauge()
                                  .Name("ringattn_worker_gpu_memory_total_bytes")
                                  .Help("The GPU's memory in all.")
                                  .Register(registry)
                                  .Add({});
  AddSampler([used, total, gpu_memory = std::move(gpu_memory)] {
    const std::optional<RingEngine::DeviceMemory> m = gpu_memory();
    if (!m.has_value()) return;  // the last reading stays
    used->Set(static_cast<double>(m->used_bytes));
    total->Set(static_cast<double>(m->total_bytes));
  });
}

void WorkerMetrics::RecordCall(std::string_view rpc, absl::StatusCode code,
                               const v1::WorkerTiming& timing, int64_t bytes_sent) {
  for (PerRpc& r : rpcs_) {
    if (r.name != rpc) continue;
    const int c = static_cast<int>(code);
    r.calls[c >= 0 && c < kNumCodes ? c : static_cast<int>(absl::StatusCode::kUnknown)]
        ->Increment();
    if (code != absl::StatusCode::kOk) return;
    const auto phases = PhaseSeconds(timing);
    for (int p = 0; p < kNumPhases; ++p) {
      if (phases[p] > 0) r.seconds[p]->Increment(phases[p]);
    }
    for (const v1::StepTiming& step : timing.steps()) {
      r.step_compute->Observe(step.compute_seconds());
      r.step_comm_wait->Observe(step.comm_wait_seconds());
    }
    if (bytes_sent > 0) bytes_sent_->Increment(static_cast<double>(bytes_sent));
    return;
  }
}

}  // namespace ringattn
