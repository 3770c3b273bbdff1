// One process's Prometheus metrics (the coordinator's or a worker's): a registry, gauges sampled
// when collected, and an optional HTTP exposer serving them at /metrics. Every endpoint carries
//
//   ringattn_build_info{component,version,cuda,cudnn,nccl}  gauge, 1: what runs ("coordinator"
//                                                   or "worker"), the release, the build's
//                                                   features ("true"/"false")
//
// Thread-safe: every method may be called from any thread.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace prometheus {
class Exposer;
class Registry;
}  // namespace prometheus

namespace ringattn {

class MetricsEndpoint {
 public:
  explicit MetricsEndpoint(std::string_view component);
  virtual ~MetricsEndpoint();
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  // Where the owner builds its families (they live as long as this endpoint).
  prometheus::Registry& registry() { return *registry_; }

  // `sample` runs before every collection (a scrape, Serialize), in the order added, to set
  // gauges from state read then; it must not block for long (a scrape waits for it).
  void AddSampler(std::function<void()> sample);

  // Serves the registry at http://<address>/metrics. "127.0.0.1:0" picks a free port (see
  // exposer_port). FAILED_PRECONDITION when already started, UNAVAILABLE when the address
  // cannot be bound.
  absl::Status StartExposer(const std::string& address);
  // The port the exposer listens on, 0 when not started.
  int exposer_port() const;
  // Stops serving (before what the samplers read goes away). Idempotent.
  void StopExposer();

  // Every family in the Prometheus text format, as a scrape would see it.
  std::string Serialize() const;

 private:
  class Collector;

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<Collector> collector_;  // the samplers, then the registry
  mutable absl::Mutex exposer_mu_;
  // Declared last: destroyed first, while what it serves still exists.
  std::unique_ptr<prometheus::Exposer> exposer_ ABSL_GUARDED_BY(exposer_mu_);
};

}  // namespace ringattn
