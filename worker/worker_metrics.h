// A worker's Prometheus metrics, on a MetricsEndpoint (base/metrics_endpoint.h:
// ringattn_build_info, the optional HTTP exposer at /metrics). `rpc` is the compute RPC the
// call serves ("Attend", "AttendBackward": the coordinator's label without "Stream").
//
//   ringattn_worker_info{backend,device,transport}    gauge, 1
//   ringattn_worker_calls_total{rpc,code}             counter, compute calls by status code
//   ringattn_worker_seconds_total{rpc,phase}          counter, seconds of the OK calls by phase:
//       handler (the whole call), receive, turn_wait, ring (the ring pass; its rate is the
//       share of time this worker's ring is busy), compute, comm_wait (their sums over the
//       steps), host_to_device, device_to_host, shared_memory_read, shared_memory_write, send
//       (the fields of v1::WorkerTiming)
//   ringattn_worker_step_seconds{rpc,part}            histogram, one ring step's compute and
//                                                     comm_wait
//   ringattn_worker_ring_bytes_sent_total{transport}  counter, bytes this rank sent over the
//       ring (K/V blocks; the backward's dK/dV accumulators), as the ring's schedule plans them
//   ringattn_worker_gpu_memory_used_bytes             gauges, GPU workers only: the device's
//   ringattn_worker_gpu_memory_total_bytes            memory in use (by every process) and in
//                                                     all, read at each collection
//
// Thread-safe: every method may be called from any thread.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "base/metrics_endpoint.h"
#include "kernels/attention_shape.h"
#include "ring/layout.h"
#include "ring/schedule.h"
#include "ringattn/v1/attention.pb.h"
#include "worker/ring_engine.h"

namespace prometheus {
class Counter;
class Histogram;
}  // namespace prometheus

namespace ringattn {

// Bytes rank `rank` sends over one ring pass of `plan` in `direction` (shape: the whole
// problem's).
int64_t RingBytesSent(const ShardPlan& plan, int rank, RingDirection direction,
                      const AttentionShape& shape);

// The endpoint's methods (StartExposer, exposer_port, StopExposer, Serialize) serve these.
class WorkerMetrics : public MetricsEndpoint {
 public:
  struct Info {
    std::string backend;
    std::string device;
    std::string transport;
  };
  // `gpu_memory` (GPU workers; empty for CPU ones) is read at each collection.
  WorkerMetrics(const Info& info,
                std::function<std::optional<RingEngine::DeviceMemory>()> gpu_memory);
  WorkerMetrics(const WorkerMetrics&) = delete;
  WorkerMetrics& operator=(const WorkerMetrics&) = delete;

  // One finished compute call of `rpc` (another name is not counted); its timing and bytes
  // only when OK.
  void RecordCall(std::string_view rpc, absl::StatusCode code, const v1::WorkerTiming& timing,
                  int64_t bytes_sent);

 private:
  static constexpr int kNumCodes = 17;  // OK .. UNAUTHENTICATED
  static constexpr int kNumPhases = 11;

  struct PerRpc {
    std::string name;
    std::array<prometheus::Counter*, kNumCodes> calls{};
    std::array<prometheus::Counter*, kNumPhases> seconds{};
    prometheus::Histogram* step_compute = nullptr;
    prometheus::Histogram* step_comm_wait = nullptr;
  };

  std::vector<PerRpc> rpcs_;
  prometheus::Counter* bytes_sent_ = nullptr;
};

}  // namespace ringattn
