// The coordinator's Prometheus metrics: one registry, its metric families created once, and an
// optional HTTP exposer serving them at /metrics.
//
//   ringattn_requests_total{rpc,code}          counter, finished requests by RPC and gRPC
//                                              status code name ("OK", "INVALID_ARGUMENT", ...)
//   ringattn_request_phase_seconds{rpc,phase}  histogram; phase is one of queue, receive,
//                                              validate, ring_wait, scatter, workers, compute,
//                                              comm_wait, gather, respond, send, total (the
//                                              fields of v1::Timings; docs/running.md)
//   ringattn_request_bytes_total{direction}    counter, tensor bytes "in" (q, k, v) and "out"
//                                              (out, lse)
//   ringattn_queue_depth                       gauge, requests admitted and not yet finished
//   ringattn_workers_up                        gauge, workers registered and healthy
//   ringattn_ring_steps_total                  counter, ring steps run
//   ringattn_ring_reforms_total                counter, times the ring was re-formed
//
// Thread-safe: every method may be called from any thread.
#pragma once

#include <grpcpp/support/status_code_enum.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "ringattn/v1/attention.pb.h"

namespace prometheus {
class Counter;
class Exposer;
class Gauge;
class Histogram;
class Registry;
}  // namespace prometheus

namespace ringattn {

class ServiceMetrics {
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
  };
  static constexpr int kNumPhases = 12;
  static const char* PhaseName(Phase phase);

  // `rpcs` are the values of the `rpc` label of ringattn_requests_total and
  // ringattn_request_phase_seconds (the coordinator's: every compute RPC, unary and
  // streaming); each (rpc, code) and (rpc, phase) series exists from the start.
  explicit ServiceMetrics(std::vector<std::string> rpcs);
  ~ServiceMetrics();
  ServiceMetrics(const ServiceMetrics&) = delete;
  ServiceMetrics& operator=(const ServiceMetrics&) = delete;

  // Records one finished request: counts it under its RPC (one of `rpcs`; another is not
  // counted, nor its phases observed) and status code, adds its tensor bytes,
  // and counts its ring steps (the most steps any worker reports, else one per worker listed).
  // Phase durations come from `timings`: compute and comm_wait are the maxima over the
  // workers (the slowest rank bounds the request). "total" is observed for every request, the
  // other phases only for OK ones, so that the breakdown is not diluted by requests refused
  // before they reached a phase.
  void RecordRequest(std::string_view rpc, absl::StatusCode code, const v1::Timings& timings,
                     int64_t bytes_in, int64_t bytes_out);
  void RecordRequest(std::string_view rpc, grpc::StatusCode code, const v1::Timings& timings,
                     int64_t bytes_in, int64_t bytes_out);

  void SetQueueDepth(int64_t depth);
  void SetWorkersUp(int64_t workers);
  void RecordRingReform();

  // Serves the registry at http://<address>/metrics. "127.0.0.1:0" picks a free port (see
  // exposer_port). FAILED_PRECONDITION when already started, UNAVAILABLE when the address
  // cannot be bound.
  absl::Status StartExposer(std::string address);
  // The port the exposer listens on, 0 when not started.
  int exposer_port() const;

  // Every family in the Prometheus text format, as a scrape would see it.
  std::string Serialize() const;

 private:
  static constexpr int kNumCodes = 17;  // OK .. UNAUTHENTICATED

  std::shared_ptr<prometheus::Registry> registry_;
  // Owned by the registry's families.
  const std::vector<std::string> rpcs_;
  // [rpc][code], parallel to rpcs_.
  std::vector<std::array<prometheus::Counter*, kNumCodes>> requests_;
  // [rpc][phase], parallel to rpcs_.
  std::vector<std::array<prometheus::Histogram*, kNumPhases>> phase_seconds_;
  prometheus::Counter* bytes_in_ = nullptr;
  prometheus::Counter* bytes_out_ = nullptr;
  prometheus::Gauge* queue_depth_ = nullptr;
  prometheus::Gauge* workers_up_ = nullptr;
  prometheus::Counter* ring_steps_ = nullptr;
  prometheus::Counter* ring_reforms_ = nullptr;

  mutable absl::Mutex exposer_mu_;
  // Declared last: destroyed first, while the registry it serves still exists.
  std::unique_ptr<prometheus::Exposer> exposer_ ABSL_GUARDED_BY(exposer_mu_);
};

}  // namespace ringattn
