#include "worker/host_ring_engine.h"

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "ring/host_ring.h"
#include "ring/transport/transport_registry.h"

namespace ringattn {
namespace {

class HostRingConnection final : public RingConnection {
 public:
  HostRingConnection(AttentionBackend* backend, AttentionBackend* backward,
                     std::unique_ptr<Communicator> comm)
      : backend_(backend), backward_(backward), comm_(std::move(comm)) {}
  int rank() const override { return comm_->rank(); }
  int world_size() const override { return comm_->world_size(); }
  absl::StatusOr<RingTimings> Forward(const ShardPlan& plan, const RingShardTensors& t,
                                      const RingAttentionOptions& options) override {
    return RingFlashAttnForward(*comm_, *backend_, plan, t, options);
  }
  absl::StatusOr<RingTimings> Backward(const ShardPlan& plan, const RingBackwardTensors& t,
                                       const RingAttentionOptions& options) override {
    if (backward_ == nullptr) {
      return absl::UnimplementedError(absl::StrCat("kernel ", std::string(backend_->name()),
                                                   " has no CPU backward"));
    }
    return RingFlashAttnBackward(*comm_, *backward_, plan, t, options);
  }
  void Abort(const absl::Status& reason) override { comm_->Abort(reason); }

 private:
  AttentionBackend* backend_;
  AttentionBackend* backward_;  // null when the kernel has none
  std::unique_ptr<Communicator> comm_;
};

class HostRingEngine final : public RingEngine {
 public:
  HostRingEngine(std::unique_ptr<AttentionBackend> backend, RingEngineOptions options)
      : backend_(std::move(backend)), options_(std::move(options)) {}
  std::string backend_name() const override { return std::string(backend_->name()); }
  std::string device_name() const override { return "cpu"; }
  std::string transport() const override { return "gloo"; }
  absl::StatusOr<std::unique_ptr<RingConnection>> Connect(
      int rank, int world, std::shared_ptr<CoordinatorStore> store,
      std::chrono::milliseconds timeout) override {
    RA_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                        HostTransports().Join("gloo", {.rank = rank,
                                                       .world = world,
                                                       .timeout = timeout,
                                                       .store = std::move(store),
                                                       .hostname = options_.gloo_hostname,
                                                       .interface = options_.gloo_interface}));
    return std::unique_ptr<RingConnection>(
        std::make_unique<HostRingConnection>(backend_.get(), backward(), std::move(comm)));
  }

 private:
  // The backend itself (host backends keep no per-call state), or null without a backward.
  AttentionBackend* backward() const {
    return backend_->capabilities().backward ? backend_.get() : nullptr;
  }

  std::unique_ptr<AttentionBackend> backend_;
  const RingEngineOptions options_;
};

}  // namespace

std::unique_ptr<RingEngine> MakeHostRingEngine(std::unique_ptr<AttentionBackend> backend,
                                               const RingEngineOptions& options) {
  return std::make_unique<HostRingEngine>(std::move(backend), options);
}

}  // namespace ringattn
