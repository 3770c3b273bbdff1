// The coordinator's Prometheus metrics: its families, created once, on its MetricsEndpoint
// (base/metrics_endpoint.h: ringattn_build_info, the optional HTTP exposer at /metrics).
//
//   ringattn_requests_total{rpc,code}          counter, finished requests by RPC and gRPC
//                                              status code name ("OK", "INVALID_ARGUMENT", ...)
//   ringattn_request_phase_seconds{rpc,phase}  histogram; phase is one of queue, receive,
//                                              validate, ring_wait, scatter, workers, compute,
//                                              comm_wait, ring, gather, respond, send, total
//                                              (the fields of v1::Timings; docs/running.md)
//   ringattn_request_bytes_total{direction}    counter, tensor bytes "in" (q, k, v) and "out"
//   ringattn_tokens_total{rpc}                 counter, query rows (batch x seqlen) of OK requests
//   ringattn_flops_total{rpc}                  counter, FLOPs of OK requests (RequestWork)
//   ringattn_queue_depth                       gauge, requests admitted and waiting in the queue
//   ringattn_running_requests                  gauge, requests out of the queue and not finished
//                                              (up to pipeline_depth: waiting for the ring, on it)
//   ringattn_held_bytes                        gauge, request bytes held (being received, queued
//                                              or running), against ringattn_max_queued_bytes
//   ringattn_ring_ready                        gauge, 1 while a ring is formed
//   ringattn_workers_up                        gauge, workers registered and healthy
//   ringattn_world_size                        gauge, workers a ring needs (--workers)
//   ringattn_max_queue                         gauge, --max_queue
//   ringattn_max_queued_bytes                  gauge, --max_queued_bytes (0: no bound)
//   ringattn_pipeline_depth                    gauge, --pipeline_depth
//   ringattn_ring_steps_total                  counter, ring steps run
//   ringattn_ring_formations_total             counter, rings formed, the first included
//   ringattn_ring_reforms_total                counter, rings formed after the first (re-forms
//                                              after a failure or a lost worker): 0 after a
//                                              clean start
//
// Thread-safe: every method may be called from any thread.
#pragma once

#include <grpcpp/support/status_code_enum.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "base/metrics_endpoint.h"
#include "kernels/attention_shape.h"
#include "ringattn/v1/attention.pb.h"

namespace prometheus {
class Counter;
class Gauge;
class Histogram;
}  // namespace prometheus

namespace ringattn {

// The work of one request as FlashAttention (and `ringattn bench`) counts it: its query rows,
// and 4 * batch * heads * seqlen_q * seqlen_k * head_dim FLOPs per forward, halved when causal
// with equal lengths (windows and packing not discounted), times `forward_multiple` (the
// backward: 2.5).
struct RequestWork {
  int64_t tokens = 0;
  double flops = 0;
};
RequestWork WorkOf(const AttentionShape& shape, bool causal, double forward_multiple);

// The endpoint's methods (StartExposer, exposer_port, StopExposer, Serialize) serve these.
class ServiceMetrics : public MetricsEndpoint {
 public:
  // The phases of ringattn_request_phase_seconds, in label order.
  enum class Phase {
    kQueue,
    kReceive,
    kScatter,
    kCompute,
    kCommWait,
    kGather,
    kSend,
    kTotal,
    kValidate,
    kRingWait,
    kWorkers,
    kRespond,
    kRing,
  };
  static constexpr int kNumPhases = 13;
  static const char* PhaseName(Phase phase);

  // The coordinator's configuration, exported as gauges.
  struct Limits {
    int world_size = 0;
    int64_t max_queue = 0;
    int64_t max_queued_bytes = 0;
    int pipeline_depth = 0;
  };
  // What the coordinator holds now, read at every collection.
  struct Load {
    int64_t queued = 0;
    int64_t running = 0;
    int64_t held_bytes = 0;
    bool ring_ready = false;
  };

  // `rpcs` are the values of the `rpc` label of the per-RPC families (the coordinator's:
  // every compute RPC, unary and streaming); each (rpc, code) and (rpc, phase) series exists
  // from the start.
  ServiceMetrics(std::vector<std::string> rpcs, const Limits& limits);
  explicit ServiceMetrics(std::vector<std::string> rpcs);  // limits all 0
  ServiceMetrics(const ServiceMetrics&) = delete;
  ServiceMetrics& operator=(const ServiceMetrics&) = delete;

  // Records one finished request: counts it under its RPC (one of `rpcs`; another is not
  // counted, nor its phases observed or work added) and status code, adds its tensor bytes,
  // and counts its ring steps (the most steps any worker reports, else one per worker listed).
  // Phase durations come from `timings`: compute, comm_wait and ring are the maxima over the
  // workers (the slowest rank bounds the request). "total" is observed for every request, the
  // other phases and `work` only for OK ones, so that the breakdown is not diluted by requests
  // refused before they reached a phase.
  void RecordRequest(std::string_view rpc, absl::StatusCode code, const v1::Timings& timings,
                     int64_t bytes_in, int64_t bytes_out, const RequestWork& work = {});
  void RecordRequest(std::string_view rpc, grpc::StatusCode code, const v1::Timings& timings,
                     int64_t bytes_in, int64_t bytes_out, const RequestWork& work = {});

  // `load` is called at every collection to set the load gauges.
  void SampleLoad(std::function<Load()> load);
  void SetWorkersUp(int64_t workers);
  // A ring was formed (generation after generation; the first is not a re-form).
  void RecordRingFormed();

 private:
  static constexpr int kNumCodes = 17;  // OK .. UNAUTHENTICATED

  // Owned by the registry's families.
  const std::vector<std::string> rpcs_;
  // [rpc][code], parallel to rpcs_.
  std::vector<std::array<prometheus::Counter*, kNumCodes>> requests_;
  // [rpc][phase], parallel to rpcs_.
  std::vector<std::array<prometheus::Histogram*, kNumPhases>> phase_seconds_;
  std::vector<prometheus::Counter*> tokens_;  // [rpc]
  std::vector<prometheus::Counter*> flops_;   // [rpc]
  prometheus::Counter* bytes_in_ = nullptr;
  prometheus::Counter* bytes_out_ = nullptr;
  prometheus::Gauge* queue_depth_ = nullptr;
  prometheus::Gauge* running_ = nullptr;
  prometheus::Gauge* held_bytes_ = nullptr;
  prometheus::Gauge* ring_ready_ = nullptr;
  prometheus::Gauge* workers_up_ = nullptr;
  prometheus::Counter* ring_steps_ = nullptr;
  prometheus::Counter* ring_formations_ = nullptr;
  prometheus::Counter* ring_reforms_ = nullptr;
  std::atomic<int64_t> formations_{0};
};

}  // namespace ringattn
