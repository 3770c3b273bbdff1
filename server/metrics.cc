#include "server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <exception>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace ringattn {
namespace {

// Seconds, 100 us to 2 min: a small CPU request takes a millisecond, a long GPU one minutes.
const prometheus::Histogram::BucketBoundaries& PhaseBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
      0.25, 0.5,    1.0,  2.5,  5.0,    10.0, 25.0, 60.0,   120.0};
  return *buckets;
}

}  // namespace

const char* ServiceMetrics::PhaseName(Phase phase) {
  static constexpr const char* kNames[kNumPhases] = {
      "queue", "receive", "scatter",  "compute",   "comm_wait", "gather",
      "send",  "total",   "validate", "ring_wait", "workers",   "respond"};
  const int p = static_cast<int>(phase);
  return p >= 0 && p < kNumPhases ? kNames[p] : "unknown";
}

ServiceMetrics::ServiceMetrics(std::vector<std::string> rpcs)
    : registry_(std::make_shared<prometheus::Registry>()),
      rpcs_(std::move(rpcs)),
      requests_(rpcs_.size()),
      phase_seconds_(rpcs_.size()) {
  auto& requests = prometheus::BuildCounter()
                       .Name("ringattn_requests_total")
                       .Help("Finished requests by RPC and gRPC status code.")
                       .Register(*registry_);
  // Every (rpc, code) exists from the start, so that rate() and increase() see the first error.
  for (size_t r = 0; r < rpcs_.size(); ++r) {
    for (int c = 0; c < kNumCodes; ++c) {
      requests_[r][c] =
          &requests.Add({{"rpc", rpcs_[r]},
                         {"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(c))}});
    }
  }

  auto& phases = prometheus::BuildHistogram()
                     .Name("ringattn_request_phase_seconds")
                     .Help("Time of each phase of a compute request by RPC, in seconds.")
                     .Register(*registry_);
  for (size_t r = 0; r < rpcs_.size(); ++r) {
    for (int p = 0; p < kNumPhases; ++p) {
      phase_seconds_[r][p] = &phases.Add(
          {{"rpc", rpcs_[r]}, {"phase", PhaseName(static_cast<Phase>(p))}}, PhaseBuckets());
    }
  }

  auto& bytes = prometheus::BuildCounter()
                    .Name("ringattn_request_bytes_total")
                    .Help("Tensor bytes received (q, k, v) and sent (out, lse).")
                    .Register(*registry_);
  bytes_in_ = &bytes.Add({{"direction", "in"}});
  bytes_out_ = &bytes.Add({{"direction", "out"}});

  queue_depth_ = &prometheus::BuildGauge()
                      .Name("ringattn_queue_depth")
                      .Help("Requests admitted and not yet finished.")
                      .Register(*registry_)
                      .Add({});
  workers_up_ = &prometheus::BuildGauge()
                     .Name("ringattn_workers_up")
                     .Help("Workers registered and healthy.")
                     .Register(*registry_)
                     .Add({});
  ring_steps_ = &prometheus::BuildCounter()
                     .Name("ringattn_ring_steps_total")
                     .Help("Ring steps run (one K/V block computed on every rank).")
                     .Register(*registry_)
                     .Add({});
  ring_reforms_ = &prometheus::BuildCounter()
                       .Name("ringattn_ring_reforms_total")
                       .Help("Times the ring was re-formed after a failure.")
                       .Register(*registry_)
                       .Add({});
}

ServiceMetrics::~ServiceMetrics() {
  absl::MutexLock lock(&exposer_mu_);
  exposer_.reset();
}

void ServiceMetrics::RecordRequest(std::string_view rpc, absl::StatusCode code,
                                   const v1::Timings& timings, int64_t bytes_in,
                                   int64_t bytes_out) {
  const int c = static_cast<int>(code);
  const auto r = std::find(rpcs_.begin(), rpcs_.end(), rpc);
  const bool known = r != rpcs_.end();
  if (known) {
    requests_[r - rpcs_.begin()]
             [c >= 0 && c < kNumCodes ? c : static_cast<int>(absl::StatusCode::kUnknown)]
                 ->Increment();
  }
  if (bytes_in > 0) bytes_in_->Increment(static_cast<double>(bytes_in));
  if (bytes_out > 0) bytes_out_->Increment(static_cast<double>(bytes_out));

  double compute = 0, comm_wait = 0;
  int steps = 0;
  for (const v1::WorkerTiming& w : timings.workers()) {
    compute = std::max(compute, w.compute_seconds());
    comm_wait = std::max(comm_wait, w.comm_wait_seconds());
    steps = std::max(steps, w.steps_size());
  }
  if (steps == 0) steps = timings.workers_size();
  if (steps > 0) ring_steps_->Increment(steps);

  if (!known) return;
  const std::array<prometheus::Histogram*, kNumPhases>& observe = phase_seconds_[r - rpcs_.begin()];
  observe[static_cast<int>(Phase::kTotal)]->Observe(timings.total_seconds());
  if (code != absl::StatusCode::kOk) return;
  const std::pair<Phase, double> phases[] = {{Phase::kQueue, timings.queue_seconds()},
                                             {Phase::kReceive, timings.receive_seconds()},
                                             {Phase::kValidate, timings.validate_seconds()},
                                             {Phase::kRingWait, timings.ring_wait_seconds()},
                                             {Phase::kScatter, timings.scatter_seconds()},
                                             {Phase::kWorkers, timings.workers_seconds()},
                                             {Phase::kCompute, compute},
                                             {Phase::kCommWait, comm_wait},
                                             {Phase::kGather, timings.gather_seconds()},
                                             {Phase::kRespond, timings.respond_seconds()},
                                             {Phase::kSend, timings.send_seconds()}};
  for (const auto& [phase, seconds] : phases) {
    observe[static_cast<int>(phase)]->Observe(seconds);
  }
}

void ServiceMetrics::RecordRequest(std::string_view rpc, grpc::StatusCode code,
                                   const v1::Timings& timings, int64_t bytes_in,
                                   int64_t bytes_out) {
  // The canonical codes have the same numbers in gRPC and absl.
  RecordRequest(rpc, static_cast<absl::StatusCode>(code), timings, bytes_in, bytes_out);
}

void ServiceMetrics::SetQueueDepth(int64_t depth) { queue_depth_->Set(static_cast<double>(depth)); }

void ServiceMetrics::SetWorkersUp(int64_t workers) {
  workers_up_->Set(static_cast<double>(workers));
}

void ServiceMetrics::RecordRingReform() { ring_reforms_->Increment(); }

absl::Status ServiceMetrics::StartExposer(std::string address) {
  absl::MutexLock lock(&exposer_mu_);
  if (exposer_ != nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("the metrics exposer is already listening on port ",
                     exposer_->GetListeningPorts().front()));
  }
  // prometheus-cpp reports a failed bind by throwing (from civetweb); it stops here.
  std::unique_ptr<prometheus::Exposer> exposer;
  try {
    exposer = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on '", address, "': ", e.what()));
  }
  if (exposer->GetListeningPorts().empty()) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on '", address, "': no listening port"));
  }
  exposer->RegisterCollectable(registry_);
  exposer_ = std::move(exposer);
  return absl::OkStatus();
}

int ServiceMetrics::exposer_port() const {
  absl::MutexLock lock(&exposer_mu_);
  if (exposer_ == nullptr) return 0;
  const std::vector<int> ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

std::string ServiceMetrics::Serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace ringattn
