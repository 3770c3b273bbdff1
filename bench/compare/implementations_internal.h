// What implementations.cc (CPU implementations, registry) and gpu_implementations.cc (the GPU
// ones) share. Internal to the comparison framework.
#pragma once

#include <algorithm>
#include <chrono>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/status_macros.h"
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

// One call of a whole ring: every rank's timings, [world].
using RingCall = std::function<absl::StatusOr<std::vector<RingTimings>>()>;

// `warmup` untimed ring calls, then `repeats` timed ones: per call the slowest rank's time into
// run->seconds, the host wall time around the call into run->wall_seconds and every rank's
// timings into run->ring.
template <typename Run>
absl::Status TimeRingCalls(const Repeats& repeats, const RingCall& call, Run* run) {
  for (int i = 0; i < repeats.warmup + repeats.repeats; ++i) {
    const Clock::time_point t0 = Clock::now();
    RA_ASSIGN_OR_RETURN(std::vector<RingTimings> timings, call());
    const double wall = SecondsSince(t0);
    if (i < repeats.warmup) continue;
    run->seconds.push_back(SlowestRank(timings));
    run->wall_seconds.push_back(wall);
    run->ring.push_back(std::move(timings));
  }
  return absl::OkStatus();
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
