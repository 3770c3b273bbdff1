// What implementations.cc (CPU implementations, registry) and gpu_implementations.cc (the GPU
// ones) share. Internal to the comparison framework.
#pragma once

#include <algorithm>
#include <chrono>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bench/compare/implementations.h"
#include "ring/ring_step.h"

namespace ringattn::compare::internal {

using Clock = std::chrono::steady_clock;

inline double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// A ring call's latency: its slowest rank's time.
inline double SlowestRank(const std::vector<RingTimings>& timings) {
  double slowest = 0;
  for (const RingTimings& t : timings) slowest = std::max(slowest, t.total_seconds);
  return slowest;
}

// A registered implementation that cannot run in this build: every call says why.
class NotAvailable final : public Implementation {
 public:
  NotAvailable(std::string name, std::string description, Placement placement, bool is_ring,
               absl::Status reason)
      : name_(std::move(name)),
        description_(std::move(description)),
        placement_(placement),
        is_ring_(is_ring),
        reason_(std::move(reason)) {}

  std::string_view name() const override { return name_; }
  std::string_view description() const override { return description_; }
  Placement placement() const override { return placement_; }
  bool is_ring() const override { return is_ring_; }
  absl::Status Available() const override { return reason_; }
  absl::StatusOr<ForwardRun> Forward(const Problem&, int, const Repeats&) override {
    return reason_;
  }

 private:
  std::string name_, description_;
  Placement placement_;
  bool is_ring_;
  absl::Status reason_;
};

// Registers the GPU implementations (single_cudnn, single_cuda, ring_cudnn, ring_cuda,
// ring_nccl_cudnn, ring_nccl_cuda): the real ones where their pieces are in the build,
// otherwise NotAvailable with the reason. gpu_implementations.cc.
void AddGpuImplementations(ImplementationRegistry& registry);

// "GPU: ..." for MachineDescription: the device count and device 0, or why there is none.
std::string GpuDescription();

}  // namespace ringattn::compare::internal
