#include "server/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "kernels/params_check.h"

namespace ringattn {
namespace {

// Seconds, 100 us to 2 min: a small CPU request takes a millisecond, a long GPU one minutes.
const prometheus::Histogram::BucketBoundaries& PhaseBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
      0.25, 0.5,    1.0,  2.5,  5.0,    10.0, 25.0, 60.0,   120.0};
  return *buckets;
}

prometheus::Gauge* AddGauge(prometheus::Registry& registry, const char* name, const char* help) {
  return &prometheus::BuildGauge().Name(name).Help(help).Register(registry).Add({});
}

prometheus::Counter* AddCounter(prometheus::Registry& registry, const char* name,
                                const char* help) {
  return &prometheus::BuildCounter().Name(name).Help(help).Register(registry).Add({});
}

}  // namespace

RequestWork WorkOf(const AttentionShape& shape, bool causal, double forward_multiple) {
  AttentionParams p;
  SetShape(shape, &p);
  p.causal = causal;
  return {int64_t{shape.batch} * shape.seqlen_q, forward_multiple * ForwardFlops(p)};
}

const char* ServiceMetrics::PhaseName(Phase phase) {
  static constexpr const char* kNames[kNumPhases] = {
      "queue", "receive",  "scatter",   "compute", "comm_wait", "gather", "send",
      "total", "validate", "ring_wait", "workers", "respond",   "ring"};
  const int p = static_cast<int>(phase);
  return p >= 0 && p < kNumPhases ? kNames[p] : "unknown";
}

ServiceMetrics::ServiceMetrics(std::vector<std::string> rpcs)
    : ServiceMetrics(std::move(rpcs), Limits()) {}

ServiceMetrics::ServiceMetrics(std::vector<std::string> rpcs, const Limits& limits)
    : MetricsEndpoint("coordinator"),
      rpcs_(std::move(rpcs)),
      requests_(rpcs_.size()),
      phase_seconds_(rpcs_.size()) {
  prometheus::Registry& registry = this->registry();
  auto& requests = prometheus::BuildCounter()
                       .Name("ringattn_requests_total")
                       .Help("Finished requests by RPC and gRPC status code.")
                       .Register(registry);
  auto& phases = prometheus::BuildHistogram()
                     .Name("ringattn_request_phase_seconds")
                     .Help("Time of each phase of a compute request by RPC, in seconds.")
                     .Register(registry);
  auto& tokens = prometheus::BuildCounter()
                     .Name("ringattn_tokens_total")
                     .Help("Query rows (batch x sequence) of the OK requests, by RPC.")
                     .Register(registry);
  auto& flops = prometheus::BuildCounter()
                    .Name("ringattn_flops_total")
                    .Help("FLOPs of the OK requests by RPC (FlashAttention's count: 4 b h s^2 d "
                          "per forward, halved when causal; the backward 2.5 forwards).")
                    .Register(registry);
  // Every series exists from the start, so that rate() and increase() see the first event.
  for (size_t r = 0; r < rpcs_.size(); ++r) {
    for (int c = 0; c < kNumCodes; ++c) {
      requests_[r][c] =
          &requests.Add({{"rpc", rpcs_[r]},
                         {"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(c))}});
    }
    for (int p = 0; p < kNumPhases; ++p) {
      phase_seconds_[r][p] = &phases.Add(
          {{"rpc", rpcs_[r]}, {"phase", PhaseName(static_cast<Phase>(p))}}, PhaseBuckets());
    }
    tokens_.push_back(&tokens.Add({{"rpc", rpcs_[r]}}));
    flops_.push_back(&flops.Add({{"rpc", rpcs_[r]}}));
  }

  auto& bytes = prometheus::BuildCounter()
                    .Name("ringattn_request_bytes_total")
                    .Help("Tensor bytes received (the inputs) and sent (the outputs).")
                    .Register(registry);
  bytes_in_ = &bytes.Add({{"direction", "in"}});
  bytes_out_ = &bytes.Add({{"direction", "out"}});

  queue_depth_ =
      AddGauge(registry, "ringattn_queue_depth", "Requests admitted and waiting in the queue.");
  running_ = AddGauge(registry, "ringattn_running_requests",
                      "Requests out of the queue and not finished (waiting for the ring or on "
                      "it; at most the pipeline depth).");
  held_bytes_ = AddGauge(registry, "ringattn_held_bytes",
                         "Request bytes held: being received, queued or running.");
  ring_ready_ = AddGauge(registry, "ringattn_ring_ready", "1 while a ring of workers is formed.");
  workers_up_ = AddGauge(registry, "ringattn_workers_up", "Workers registered and healthy.");
  AddGauge(registry, "ringattn_world_size", "Workers a ring needs (--workers).")
      ->Set(limits.world_size);
  AddGauge(registry, "ringattn_max_queue", "Requests that may wait in the queue (--max_queue).")
      ->Set(static_cast<double>(limits.max_queue));
  AddGauge(registry, "ringattn_max_queued_bytes",
           "Request bytes the service may hold (--max_queued_bytes; 0: no bound).")
      ->Set(static_cast<double>(std::max<int64_t>(0, limits.max_queued_bytes)));
  AddGauge(registry, "ringattn_pipeline_depth",
           "Requests that may be on the ring at once (--pipeline_depth).")
      ->Set(limits.pipeline_depth);
  ring_steps_ = AddCounter(registry, "ringattn_ring_steps_total",
                           "Ring steps run (one K/V block computed on every rank).");
  ring_formations_ = AddCounter(registry, "ringattn_ring_formations_total",
                                "Rings formed, the first one included.");
  ring_reforms_ = AddCounter(registry, "ringattn_ring_reforms_total",
                             "Rings formed after the first: re-forms after a failure.");
}

void ServiceMetrics::RecordRequest(std::string_view rpc, absl::StatusCode code,
                                   const v1::Timings& timings, int64_t bytes_in,
                                   int64_t bytes_out, const RequestWork& work) {
  const int c = static_cast<int>(code);
  const auto r = std::find(rpcs_.begin(), rpcs_.end(), rpc);
  const bool known = r != rpcs_.end();
  const size_t ri = known ? static_cast<size_t>(r - rpcs_.begin()) : 0;
  if (known) {
    requests_[ri][c >= 0 && c < kNumCodes ? c : static_cast<int>(absl::StatusCode::kUnknown)]
        ->Increment();
  }
  if (bytes_in > 0) bytes_in_->Increment(static_cast<double>(bytes_in));
  if (bytes_out > 0) bytes_out_->Increment(static_cast<double>(bytes_out));

  double compute = 0, comm_wait = 0, ring = 0;
  int steps = 0;
  for (const v1::WorkerTiming& w : timings.workers()) {
    compute = std::max(compute, w.compute_seconds());
    comm_wait = std::max(comm_wait, w.comm_wait_seconds());
    ring = std::max(ring, w.ring_seconds());
    steps = std::max(steps, w.steps_size());
  }
  if (steps == 0) steps = timings.workers_size();
  if (steps > 0) ring_steps_->Increment(steps);

  if (!known) return;
  const std::array<prometheus::Histogram*, kNumPhases>& observe = phase_seconds_[ri];
  observe[static_cast<int>(Phase::kTotal)]->Observe(timings.total_seconds());
  if (code != absl::StatusCode::kOk) return;
  if (work.tokens > 0) tokens_[ri]->Increment(static_cast<double>(work.tokens));
  if (work.flops > 0) flops_[ri]->Increment(work.flops);
  const std::pair<Phase, double> phases[] = {{Phase::kQueue, timings.queue_seconds()},
                                             {Phase::kReceive, timings.receive_seconds()},
                                             {Phase::kValidate, timings.validate_seconds()},
                                             {Phase::kRingWait, timings.ring_wait_seconds()},
                                             {Phase::kScatter, timings.scatter_seconds()},
                                             {Phase::kWorkers, timings.workers_seconds()},
                                             {Phase::kCompute, compute},
                                             {Phase::kCommWait, comm_wait},
                                             {Phase::kRing, ring},
                                             {Phase::kGather, timings.gather_seconds()},
                                             {Phase::kRespond, timings.respond_seconds()},
                                             {Phase::kSend, timings.send_seconds()}};
  for (const auto& [phase, seconds] : phases) {
    observe[static_cast<int>(phase)]->Observe(seconds);
  }
}

void ServiceMetrics::RecordRequest(std::string_view rpc, grpc::StatusCode code,
                                   const v1::Timings& timings, int64_t bytes_in,
                                   int64_t bytes_out, const RequestWork& work) {
  // The canonical codes have the same numbers in gRPC and absl.
  RecordRequest(rpc, static_cast<absl::StatusCode>(code), timings, bytes_in, bytes_out, work);
}

void ServiceMetrics::SampleLoad(std::function<Load()> load) {
  AddSampler([this, load = std::move(load)] {
    const Load now = load();
    queue_depth_->Set(static_cast<double>(now.queued));
    running_->Set(static_cast<double>(now.running));
    held_bytes_->Set(static_cast<double>(now.held_bytes));
    ring_ready_->Set(now.ring_ready ? 1 : 0);
  });
}

void ServiceMetrics::SetWorkersUp(int64_t workers) {
  workers_up_->Set(static_cast<double>(workers));
}

void ServiceMetrics::RecordRingFormed() {
  if (formations_.fetch_add(1) > 0) ring_reforms_->Increment();
  ring_formations_->Increment();
}

}  // namespace ringattn
