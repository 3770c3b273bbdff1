#include "base/metrics_endpoint.h"

#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"
#include "ringattn_config.h"
#include "ringattn_version.h"

namespace ringattn {

class MetricsEndpoint::Collector final : public prometheus::Collectable {
 public:
  explicit Collector(std::shared_ptr<prometheus::Registry> registry)
      : registry_(std::move(registry)) {}

  void Add(std::function<void()> sample) {
    absl::MutexLock lock(&mu_);
    samplers_.push_back(std::move(sample));
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    {
      absl::MutexLock lock(&mu_);
      for (const auto& sample : samplers_) sample();
    }
    return registry_->Collect();
  }

 private:
  const std::shared_ptr<prometheus::Registry> registry_;
  mutable absl::Mutex mu_;  // also keeps two scrapes' samplers from interleaving
  std::vector<std::function<void()>> samplers_ ABSL_GUARDED_BY(mu_);
};

MetricsEndpoint::MetricsEndpoint(std::string_view component)
    : registry_(std::make_shared<prometheus::Registry>()),
      collector_(std::make_shared<Collector>(registry_)) {
  const auto flag = [](bool on) { return std::string(on ? "true" : "false"); };
  prometheus::BuildGauge()
      .Name("ringattn_build_info")
      .Help("What runs: the component, the release and the build's features; always 1.")
      .Register(*registry_)
      .Add({{"component", std::string(component)},
            {"version", RINGATTN_VERSION},
            {"cuda", flag(RINGATTN_HAVE_CUDA)},
            {"cudnn", flag(RINGATTN_HAVE_CUDNN)},
            {"nccl", flag(RINGATTN_HAVE_NCCL)}})
      .Set(1);
}

MetricsEndpoint::~MetricsEndpoint() { StopExposer(); }

void MetricsEndpoint::AddSampler(std::function<void()> sample) {
  collector_->Add(std::move(sample));
}

absl::Status MetricsEndpoint::StartExposer(const std::string& address) {
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
  exposer->RegisterCollectable(collector_);
  exposer_ = std::move(exposer);
  return absl::OkStatus();
}

int MetricsEndpoint::exposer_port() const {
  absl::MutexLock lock(&exposer_mu_);
  if (exposer_ == nullptr) return 0;
  const std::vector<int> ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

void MetricsEndpoint::StopExposer() {
  absl::MutexLock lock(&exposer_mu_);
  exposer_.reset();
}

std::string MetricsEndpoint::Serialize() const {
  return prometheus::TextSerializer().Serialize(collector_->Collect());
}

}  // namespace ringattn
