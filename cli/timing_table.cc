#include "cli/timing_table.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kernels/attention_params.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

// Ranks whose row counts are listed one by one; more are summarised.
constexpr int kListedRanks = 16;

std::string LayoutLabel(v1::Layout layout) {
  std::string name = v1::Layout_Name(layout);
  if (name.empty()) return absl::StrCat("layout ", static_cast<int>(layout));
  if (absl::StartsWith(name, "LAYOUT_")) name = name.substr(7);
  return absl::AsciiStrToLower(name);
}

std::string RowsPerRank(const v1::ShardPlan& plan) {
  if (plan.rows_per_rank().empty()) return "-";
  if (plan.rows_per_rank_size() <= kListedRanks) {
    return absl::StrJoin(plan.rows_per_rank(), " ");
  }
  const auto [lo, hi] =
      std::minmax_element(plan.rows_per_rank().begin(), plan.rows_per_rank().end());
  return absl::StrCat(*lo, "..", *hi, " over ", plan.rows_per_rank_size(), " ranks");
}

std::string Rate(double flop_per_second) {
  if (flop_per_second >= 1e12) return absl::StrFormat("%.3g TFLOP/s", flop_per_second * 1e-12);
  return absl::StrFormat("%.3g GFLOP/s", flop_per_second * 1e-9);
}

std::string Bytes(double bytes) {
  if (bytes >= 1 << 30) return absl::StrFormat("%.2f GiB", bytes / (1 << 30));
  if (bytes >= 1 << 20) return absl::StrFormat("%.1f MiB", bytes / (1 << 20));
  return absl::StrFormat("%.0f KiB", bytes / 1024);
}

}  // namespace

double RequestFlops(const v1::AttendRequest& request) {
  const v1::Tensor& q = request.q();
  const v1::Tensor& k = request.k();
  if (q.shape_size() != 4 || k.shape_size() != 4) return 0;
  AttentionParams p;
  p.batch = static_cast<int>(q.shape(0));
  p.seqlen_q = q.shape(1);
  p.heads = static_cast<int>(q.shape(2));
  p.head_dim = static_cast<int>(q.shape(3));
  p.seqlen_k = k.shape(1);
  p.heads_k = static_cast<int>(k.shape(2));
  p.causal = request.options().causal();
  return ForwardFlops(p);
}

std::string FormatTimings(const v1::AttendResponse& response, double flops,
                          const SharedMemoryCopyTimes* shm_copies) {
  return FormatTimings(response.request_id(), response.plan(), response.timings(), flops,
                       shm_copies);
}

std::string FormatTimings(const std::string& request_id, const v1::ShardPlan& plan,
                          const v1::Timings& t, double flops,
                          const SharedMemoryCopyTimes* shm_copies) {
  std::string s = absl::StrCat("request id ", request_id.empty() ? "(none)" : request_id, "\n");
  absl::StrAppendFormat(&s, "plan: layout %s, world %d, rows per rank %s\n",
                        LayoutLabel(plan.layout()), plan.world_size(), RowsPerRank(plan));
  // The coordinator's phases in order, what none of them covers, its total, then the client's.
  absl::StrAppendFormat(&s, "  %-11s %9s\n", "phase", "ms");
  const std::pair<const char*, double> phases[] = {
      {"receive", t.receive_seconds()}, {"validate", t.validate_seconds()},
      {"queue", t.queue_seconds()},     {"ring_wait", t.ring_wait_seconds()},
      {"scatter", t.scatter_seconds()}, {"workers", t.workers_seconds()},
      {"gather", t.gather_seconds()},   {"respond", t.respond_seconds()},
      {"send", t.send_seconds()}};
  double accounted = 0;
  for (const auto& [name, seconds] : phases) {
    absl::StrAppendFormat(&s, "  %-11s %9.3f\n", name, seconds * 1e3);
    accounted += seconds;
  }
  absl::StrAppendFormat(&s, "  %-11s %9.3f\n", "(other)",
                        std::max(0.0, t.total_seconds() - accounted) * 1e3);
  absl::StrAppendFormat(&s, "  %-11s %9.3f\n", "total", t.total_seconds() * 1e3);
  if (t.client_seconds() > 0) {  // set by the client library
    absl::StrAppendFormat(&s, "  %-11s %9.3f\n", "client_wire", t.client_wire_seconds() * 1e3);
    absl::StrAppendFormat(&s, "  %-11s %9.3f\n", "client", t.client_seconds() * 1e3);
  }
  if (shm_copies != nullptr) {  // client-local: the copies around the client library's call
    absl::StrAppendFormat(&s, "  %-11s %9.3f\n", "shm_in", shm_copies->in_seconds * 1e3);
    absl::StrAppendFormat(&s, "  %-11s %9.3f\n", "shm_out", shm_copies->out_seconds * 1e3);
  }
  double slowest_ring = 0;
  if (t.workers_size() > 0) {
    absl::StrAppendFormat(&s, "  %4s %10s %-8s %12s %14s %12s %11s %11s\n", "rank", "rows",
                          "backend", "compute_ms", "comm_wait_ms", "ring_ms", "device_ms",
                          "launch_ms");
    for (const v1::WorkerTiming& w : t.workers()) {
      // Device and launch times exist on GPU workers only ("-" where both are 0).
      const bool device_timed = w.device_seconds() > 0 || w.launch_seconds() > 0;
      const auto ms_or_dash = [&](double seconds) {
        return device_timed ? absl::StrFormat("%.3f", seconds * 1e3) : std::string("-");
      };
      absl::StrAppendFormat(&s, "  %4d %10d %-8s %12.3f %14.3f %12.3f %11s %11s\n", w.rank(),
                            w.rows(), w.backend().empty() ? "-" : w.backend(),
                            w.compute_seconds() * 1e3, w.comm_wait_seconds() * 1e3,
                            w.ring_seconds() * 1e3, ms_or_dash(w.device_seconds()),
                            ms_or_dash(w.launch_seconds()));
      if (w.steps_size() > 1) {  // per step: compute / wait for the next block, ms
        std::vector<std::string> steps;
        for (const v1::StepTiming& st : w.steps()) {
          steps.push_back(absl::StrFormat("%.3f/%.3f", st.compute_seconds() * 1e3,
                                          st.comm_wait_seconds() * 1e3));
        }
        absl::StrAppend(&s, "       steps (compute/wait ms): ", absl::StrJoin(steps, " "), "\n");
      }
      if (w.handler_seconds() > 0) {  // the worker's handler, and the coordinator's call to it
        // Shared-memory copies only where there were any (the arena or a client's region).
        const bool shm = w.shared_memory_read_seconds() > 0 || w.shared_memory_write_seconds() > 0;
        absl::StrAppendFormat(&s, "       handler ms: receive %.3f, ", w.receive_seconds() * 1e3);
        if (shm) absl::StrAppendFormat(&s, "shm_read %.3f, ", w.shared_memory_read_seconds() * 1e3);
        absl::StrAppendFormat(&s, "h2d %.3f, ring %.3f, d2h %.3f, ", w.host_to_device_seconds() * 1e3,
                              w.ring_seconds() * 1e3, w.device_to_host_seconds() * 1e3);
        if (shm) {
          absl::StrAppendFormat(&s, "shm_write %.3f, ", w.shared_memory_write_seconds() * 1e3);
        }
        absl::StrAppendFormat(&s, "send %.3f; handler %.3f, call %.3f (wire %.3f)\n",
                              w.send_seconds() * 1e3, w.handler_seconds() * 1e3,
                              w.call_seconds() * 1e3,
                              std::max(0.0, w.call_seconds() - w.handler_seconds()) * 1e3);
      }
      slowest_ring = std::max(slowest_ring, w.ring_seconds());
    }
  }
  if (flops > 0) {
    std::vector<std::string> rates;
    if (t.total_seconds() > 0) {
      rates.push_back(absl::StrCat(Rate(flops / t.total_seconds()), " over the total"));
    }
    if (slowest_ring > 0) {
      rates.push_back(absl::StrCat(Rate(flops / slowest_ring), " over the slowest ring"));
    }
    absl::StrAppendFormat(&s, "throughput: %s (%.3g GFLOP)\n",
                          rates.empty() ? "n/a (no time reported)" : absl::StrJoin(rates, ", "),
                          flops * 1e-9);
  }
  return s;
}

ProgressBar::ProgressBar(std::string label, std::ostream* out, absl::Duration delay)
    : label_(std::move(label)), out_(out), delay_(delay), start_(absl::Now()) {}

ProgressBar::~ProgressBar() { Finish(); }

void ProgressBar::Update(int64_t done, int64_t total) {
  const absl::Time now = absl::Now();
  const absl::Duration elapsed = now - start_;
  if (elapsed < delay_) return;
  if (drawn_ && done < total && now - last_draw_ < absl::Milliseconds(100)) return;
  std::string line =
      absl::StrFormat("%s %5.1f%% %s of %s, %.1f s", label_,
                      total > 0 ? 100.0 * done / total : 100.0, Bytes(static_cast<double>(done)),
                      Bytes(static_cast<double>(total)), absl::ToDoubleSeconds(elapsed));
  const size_t width = line.size();
  if (width < last_width_) line.append(last_width_ - width, ' ');  // erase the longer last line
  *out_ << '\r' << line << std::flush;
  last_width_ = width;
  last_draw_ = now;
  drawn_ = true;
}

void ProgressBar::Finish() {
  if (!drawn_) return;
  *out_ << '\n' << std::flush;
  drawn_ = false;
  last_width_ = 0;
}

}  // namespace ringattn
