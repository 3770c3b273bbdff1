#include "cli/bench_command.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cli/attend_command.h"
#include "cli/cli_parse.h"
#include "cli/exit_codes.h"
#include "cli/timing_table.h"
#include "client/attention_client.h"
#include "client/head_split.h"
#include "client/shared_memory_session.h"
#include "kernels/dtype.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {
namespace {

// Server-side phases of one response, in seconds. compute, comm_wait, ring and the worker_
// ones (waiting for the ring's turn, the inputs' and outputs' host-device copies) are the
// largest over the workers (the slowest worker bounds the request). The client's: client_wire from the
// response's Timings; shm_in and shm_out (--shm) its copies into and out of shared memory,
// measured here.
struct Phases {
  double queue = 0, receive = 0, validate = 0, ring_wait = 0, scatter = 0, workers = 0, compute = 0,
         comm_wait = 0, ring = 0, worker_turn_wait = 0, worker_h2d = 0, worker_d2h = 0, gather = 0, respond = 0, send = 0, total = 0, client_wire = 0,
         shm_in = 0, shm_out = 0;
};

// Every field of Phases with its name, in report order (the coordinator's, then the client's).
constexpr std::pair<const char*, double Phases::*> kPhaseFields[] = {
    {"queue", &Phases::queue},       {"receive", &Phases::receive},
    {"validate", &Phases::validate}, {"ring_wait", &Phases::ring_wait},
    {"scatter", &Phases::scatter},   {"workers", &Phases::workers},
    {"compute", &Phases::compute},   {"comm_wait", &Phases::comm_wait},
    {"ring", &Phases::ring},         {"worker_turn", &Phases::worker_turn_wait},
    {"worker_h2d", &Phases::worker_h2d}, {"worker_d2h", &Phases::worker_d2h},
    {"gather", &Phases::gather},
    {"respond", &Phases::respond},   {"send", &Phases::send},
    {"total", &Phases::total},       {"client_wire", &Phases::client_wire},
    {"shm_in", &Phases::shm_in},     {"shm_out", &Phases::shm_out}};

bool IsSharedMemoryPhase(double Phases::*field) {
  return field == &Phases::shm_in || field == &Phases::shm_out;
}

// The outcome of one call.
struct CallRecord {
  absl::StatusCode code = absl::StatusCode::kOk;
  double latency_seconds = 0;  // client round trip
  int64_t payload_bytes = 0;   // request + response tensor bytes (successful calls)
  Phases phases;               // successful calls
};

struct BenchSummary {
  std::string target;
  int concurrency = 0;
  bool shm = false;
  int sent = 0;
  int ok = 0;
  int warmup_calls = 0, warmup_failed = 0;  // before the timed load, not counted below
  double warmup_max = 0;                    // their slowest round trip
  std::map<std::string, int> failed_by_code;  // status code name -> calls
  double wall_seconds = 0;
  double requests_per_second = 0;                       // successful calls over wall time
  double p50 = 0, p90 = 0, p99 = 0, max = 0, mean = 0;  // latency of successful calls
  int64_t payload_bytes = 0;
  double payload_gb_per_second = 0;
  // This machine's host memcpy in the same run (bytes copied per second): the rate the payload
  // could move at if nothing but one copy stood in its way.
  double memcpy_gb_per_second = 0;
  Phases server_mean;
  double outside_compute_share = 0;  // 1 - mean compute / mean client latency
  double flops_per_request = 0;
  double tflops_ring = 0;       // flops / mean slowest-worker ring time
  // ok x mean slowest-worker ring time / wall time: how busy the ring was (one ring runs one
  // request at a time; transfers hidden behind other requests' compute bring it toward 1).
  double ring_busy_share = 0;
  double tflops_delivered = 0;  // ok * flops / wall time (~ concurrency * flops / mean latency)

  int failed() const {
    int n = 0;
    for (const auto& [code, count] : failed_by_code) n += count;
    return n;
  }
};

// Host memcpy rate, bytes copied per second: the best of 5 copies of 64 MiB between two buffers
// written beforehand (so the pages exist), on the calling thread.
double MeasureMemcpyGbPerSecond() {
  constexpr size_t kBytes = size_t{64} << 20;
  std::vector<char> from(kBytes, 1), to(kBytes, 0);
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    const absl::Time t0 = absl::Now();
    std::memcpy(to.data(), from.data(), kBytes);
    const double seconds = absl::ToDoubleSeconds(absl::Now() - t0);
    if (seconds > 0) best = std::max(best, static_cast<double>(kBytes) / seconds * 1e-9);
    // Each copy's result feeds the next copy's source, so none can be elided.
    from[static_cast<size_t>(i) * 4096] = to[kBytes - 1 - static_cast<size_t>(i)];
  }
  return best;
}

absl::Status ValidateOptions(const BenchOptions& o) {
  if (o.target.empty()) return absl::InvalidArgumentError("--target must be host:port");
  if (o.concurrency < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--concurrency must be >= 1, got ", o.concurrency));
  }
  if (!(o.duration_seconds >= 0) || !std::isfinite(o.duration_seconds)) {
    return absl::InvalidArgumentError("--duration must be a finite number of seconds >= 0");
  }
  if (o.shm_resident && !o.shm) {
    return absl::InvalidArgumentError("--shm_resident needs --shm");
  }
  if (o.shm && o.streaming) {
    return absl::InvalidArgumentError(
        "--shm and --stream exclude each other: shared-memory references go in unary calls");
  }
  if (o.warmup < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--warmup must be >= 0, got ", o.warmup));
  }
  if (o.duration_seconds == 0 && o.requests < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--requests must be >= 1 (or give --duration), got ", o.requests));
  }
  if (o.batch < 1 || o.seqlen < 1 || o.heads < 1 || o.heads_k < 0 || o.head_dim < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--batch, --seqlen, --heads and --head_dim must be >= 1 and --heads_k >= 0, got ", o.batch,
        ", ", o.seqlen, ", ", o.heads, ", ", o.head_dim, " and ", o.heads_k));
  }
  if (absl::Status s = ParseDTypeName(o.dtype).status(); !s.ok()) return s;
  if (absl::Status s = ParseLayoutName(o.layout).status(); !s.ok()) return s;
  if (!(o.timeout_seconds > 0) || !(o.connect_timeout_seconds > 0)) {
    return absl::InvalidArgumentError("--timeout and the connect timeout must be > 0 seconds");
  }
  return absl::OkStatus();
}

// The one request every call sends; the options are already validated.
v1::AttendRequest BuildRequest(const BenchOptions& o) {
  v1::AttendRequest request =
      MakeSyntheticRequest(o.batch, o.seqlen, o.heads, o.heads_k > 0 ? o.heads_k : o.heads,
                           o.head_dim, *ParseDTypeName(o.dtype), o.seed);
  request.set_layout(*ParseLayoutName(o.layout));
  request.mutable_options()->set_causal(o.causal);
  return request;
}

Phases PhasesOf(const v1::Timings& t) {
  Phases p;
  p.queue = t.queue_seconds();
  p.receive = t.receive_seconds();
  p.validate = t.validate_seconds();
  p.ring_wait = t.ring_wait_seconds();
  p.scatter = t.scatter_seconds();
  p.workers = t.workers_seconds();
  p.gather = t.gather_seconds();
  p.respond = t.respond_seconds();
  p.send = t.send_seconds();
  p.total = t.total_seconds();
  p.client_wire = t.client_wire_seconds();
  for (const v1::WorkerTiming& w : t.workers()) {
    p.compute = std::max(p.compute, w.compute_seconds());
    p.comm_wait = std::max(p.comm_wait, w.comm_wait_seconds());
    p.ring = std::max(p.ring, w.ring_seconds());
    p.worker_turn_wait = std::max(p.worker_turn_wait, w.turn_wait_seconds());
    p.worker_h2d = std::max(p.worker_h2d, w.host_to_device_seconds());
    p.worker_d2h = std::max(p.worker_d2h, w.device_to_host_seconds());
  }
  return p;
}

// How the calls go out: unary or streaming, and the limits of the server.
struct CallPlan {
  bool force_streaming = false;
  int64_t max_unary_bytes = 0;  // the server's; <= 0 unknown
  absl::Duration timeout;
};

// Chunks of a forced stream: the default, within the server's unary limit.
int64_t StreamChunkBytes(const CallPlan& plan) {
  int64_t chunk_bytes = kDefaultChunkBytes;
  if (plan.max_unary_bytes > 0) chunk_bytes = std::min(chunk_bytes, plan.max_unary_bytes);
  return chunk_bytes;
}

// One call, `call(copies)`, timed and recorded: its status, its client round trip (with --shm,
// the copies into and out of the region too), the tensor bytes of `rpc`'s request and response,
// and the phases.
template <typename Request, typename Call>
CallRecord RecordCall(const ComputeRpc& rpc, const Request& request, const Call& call) {
  SharedMemoryCopyTimes copies;
  const absl::Time start = absl::Now();
  const auto response = call(&copies);
  CallRecord record;
  record.latency_seconds = absl::ToDoubleSeconds(absl::Now() - start);
  record.code = response.status().code();
  if (response.ok()) {
    record.payload_bytes =
        TensorDataBytes(request, rpc.inputs) + TensorDataBytes(*response, rpc.outputs);
    record.phases = PhasesOf(response->timings());
    record.phases.shm_in = copies.in_seconds;
    record.phases.shm_out = copies.out_seconds;
  }
  return record;
}

// A call of `request` through `shm` when set, else unary or streamed as the plan says.
// `resident`, when set, is `request` already placed in shm's region (sent as it is).
CallRecord OneBackwardCall(AttentionClient& client, SharedMemorySession* shm,
                           const v1::AttendBackwardRequest* resident,
                           const v1::AttendBackwardRequest& request, const CallPlan& plan) {
  return RecordCall(
      AttendBackwardRpc(), request,
      [&](SharedMemoryCopyTimes* copies) -> absl::StatusOr<v1::AttendBackwardResponse> {
        if (resident != nullptr) return client.AttendBackward(*resident, plan.timeout);
        if (shm != nullptr) return shm->AttendBackward(request, plan.timeout, copies);
        if (plan.force_streaming) {
          return client.AttendBackwardStreaming(request, plan.timeout, StreamChunkBytes(plan));
        }
        return client.AttendBackwardAuto(request, plan.timeout, plan.max_unary_bytes);
      });
}

CallRecord OneCall(AttentionClient& client, SharedMemorySession* shm,
                   const v1::AttendRequest* resident, const v1::AttendRequest& request,
                   const CallPlan& plan) {
  return RecordCall(AttendRpc(), request,
                    [&](SharedMemoryCopyTimes* copies) -> absl::StatusOr<v1::AttendResponse> {
                      if (resident != nullptr) return client.Attend(*resident, plan.timeout);
                      if (shm != nullptr) return shm->Attend(request, plan.timeout, copies);
                      if (plan.force_streaming) {
                        return client.AttendStreaming(request, plan.timeout,
                                                      StreamChunkBytes(plan));
                      }
                      return client.AttendAuto(request, plan.timeout, plan.max_unary_bytes);
                    });
}

struct LoadResult {
  std::vector<CallRecord> records;
  double wall_seconds = 0;
  int warmup_failed = 0;          // warm-up calls that failed
  double warmup_max_seconds = 0;  // the slowest warm-up round trip
};

// Makes `one_call(thread)` from `concurrency` threads (numbered from 0) until `requests` calls
// have gone out, or, with a duration, until it has passed. Every call is bounded by the plan's
// timeout.
LoadResult RunLoad(const std::function<CallRecord(int thread)>& one_call, const BenchOptions& o) {
  const bool by_time = o.duration_seconds > 0;
  std::atomic<int> next{0};
  std::vector<std::vector<CallRecord>> per_thread(static_cast<size_t>(o.concurrency));
  LoadResult result;
  if (o.warmup > 0) {  // every thread's warm-up calls, concurrently, before the clock starts
    std::vector<std::vector<CallRecord>> warm(per_thread.size());
    std::vector<std::thread> threads;
    threads.reserve(warm.size());
    for (size_t i = 0; i < warm.size(); ++i) {
      threads.emplace_back([&, thread = static_cast<int>(i), mine = &warm[i]] {
        for (int c = 0; c < o.warmup; ++c) mine->push_back(one_call(thread));
      });
    }
    for (std::thread& t : threads) t.join();
    for (const std::vector<CallRecord>& records : warm) {
      for (const CallRecord& r : records) {
        if (r.code != absl::StatusCode::kOk) ++result.warmup_failed;
        result.warmup_max_seconds = std::max(result.warmup_max_seconds, r.latency_seconds);
      }
    }
  }
  const absl::Time start = absl::Now();
  const absl::Time deadline = start + absl::Seconds(o.duration_seconds);
  {
    std::vector<std::thread> threads;
    threads.reserve(per_thread.size());
    for (size_t i = 0; i < per_thread.size(); ++i) {
      threads.emplace_back([&, thread = static_cast<int>(i), mine = &per_thread[i]] {
        while (by_time ? absl::Now() < deadline : next.fetch_add(1) < o.requests) {
          mine->push_back(one_call(thread));
        }
      });
    }
    for (std::thread& t : threads) t.join();
  }
  result.wall_seconds = absl::ToDoubleSeconds(absl::Now() - start);
  for (std::vector<CallRecord>& records : per_thread) {
    result.records.insert(result.records.end(), records.begin(), records.end());
  }
  return result;
}

// The nearest-rank percentile `p` (0, 1] of sorted `values`; 0 when empty.
double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(p * static_cast<double>(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

BenchSummary Summarize(const BenchOptions& o, const LoadResult& load, double flops) {
  BenchSummary s;
  s.target = o.target;
  s.concurrency = o.concurrency;
  s.shm = o.shm;
  s.sent = static_cast<int>(load.records.size());
  s.warmup_calls = o.warmup * o.concurrency;
  s.warmup_failed = load.warmup_failed;
  s.warmup_max = load.warmup_max_seconds;
  s.wall_seconds = load.wall_seconds;
  s.flops_per_request = flops;
  std::vector<double> latencies;
  Phases sum;
  for (const CallRecord& r : load.records) {
    if (r.code != absl::StatusCode::kOk) {
      ++s.failed_by_code[absl::StatusCodeToString(r.code)];
      continue;
    }
    ++s.ok;
    latencies.push_back(r.latency_seconds);
    s.payload_bytes += r.payload_bytes;
    for (const auto& [name, field] : kPhaseFields) sum.*field += r.phases.*field;
  }
  if (s.ok > 0) {
    const double n = s.ok;
    for (const auto& [name, field] : kPhaseFields) s.server_mean.*field = sum.*field / n;
    std::sort(latencies.begin(), latencies.end());
    s.p50 = Percentile(latencies, 0.50);
    s.p90 = Percentile(latencies, 0.90);
    s.p99 = Percentile(latencies, 0.99);
    s.max = latencies.back();
    double total = 0;
    for (const double l : latencies) total += l;
    s.mean = total / n;
    if (s.mean > 0) s.outside_compute_share = 1 - s.server_mean.compute / s.mean;
    if (s.server_mean.ring > 0) s.tflops_ring = flops / s.server_mean.ring * 1e-12;
  }
  if (s.wall_seconds > 0) {
    s.requests_per_second = s.ok / s.wall_seconds;
    s.payload_gb_per_second = static_cast<double>(s.payload_bytes) / s.wall_seconds * 1e-9;
    s.tflops_delivered = s.ok * flops / s.wall_seconds * 1e-12;
    s.ring_busy_share = s.ok * s.server_mean.ring / s.wall_seconds;
  }
  return s;
}

std::string FailedByCode(const BenchSummary& s) {
  std::vector<std::string> parts;
  for (const auto& [code, count] : s.failed_by_code)
    parts.push_back(absl::StrCat(code, " ", count));
  return parts.empty() ? "" : absl::StrCat(" (", absl::StrJoin(parts, ", "), ")");
}

std::string FormatReport(const BenchSummary& s) {
  std::string r;
  absl::StrAppendFormat(&r, "requests: %d sent, %d ok, %d failed%s\n", s.sent, s.ok, s.failed(),
                        FailedByCode(s));
  if (s.warmup_calls > 0) {
    absl::StrAppendFormat(&r, "warm-up: %d calls before the clock (%d failed), slowest %.3f ms\n",
                          s.warmup_calls, s.warmup_failed, s.warmup_max * 1e3);
  }
  absl::StrAppendFormat(&r, "wall: %.3f s, %.2f requests/s (ok), concurrency %d\n", s.wall_seconds,
                        s.requests_per_second, s.concurrency);
  absl::StrAppendFormat(&r,
                        "latency ms (client round trip, ok): p50 %.3f  p90 %.3f  p99 %.3f  "
                        "max %.3f  mean %.3f\n",
                        s.p50 * 1e3, s.p90 * 1e3, s.p99 * 1e3, s.max * 1e3, s.mean * 1e3);
  absl::StrAppendFormat(&r, "payload: %.3f GB, %.3f GB/s (request + response tensors, ok calls)\n",
                        static_cast<double>(s.payload_bytes) * 1e-9, s.payload_gb_per_second);
  absl::StrAppendFormat(&r,
                        "host memcpy on this machine: %.3f GB/s (same run); payload at %.2f%% of "
                        "it\n",
                        s.memcpy_gb_per_second,
                        s.memcpy_gb_per_second > 0
                            ? 100 * s.payload_gb_per_second / s.memcpy_gb_per_second
                            : 0.0);
  const Phases& m = s.server_mean;
  r += "server phases, mean ms (compute, comm wait, ring: slowest worker; client_wire: the "
       "client library's call minus the server's total";
  r += s.shm ? "; shm_in, shm_out: the client's copies into and out of shared memory):\n" : "):\n";
  for (const auto& [name, field] : kPhaseFields) {
    if (!s.shm && IsSharedMemoryPhase(field)) continue;
    absl::StrAppendFormat(&r, "  %-11s %11.3f\n", name, m.*field * 1e3);
  }
  absl::StrAppendFormat(&r, "outside compute: %.1f%% of the client latency; ring busy %.1f%% of "
                        "the wall time\n",
                        s.outside_compute_share * 100, s.ring_busy_share * 100);
  absl::StrAppendFormat(&r,
                        "throughput: %.4g TFLOP/s over the mean ring, %.4g TFLOP/s delivered "
                        "(ok x %.4g GFLOP over wall)\n",
                        s.tflops_ring, s.tflops_delivered, s.flops_per_request * 1e-9);
  return r;
}

// A JSON number; null for NaN and infinities, which JSON lacks.
std::string Num(double x) { return std::isfinite(x) ? absl::StrFormat("%.9g", x) : "null"; }

std::string FormatJson(const BenchSummary& s) {
  std::vector<std::string> codes;
  for (const auto& [code, count] : s.failed_by_code) {
    codes.push_back(absl::StrFormat("\"%s\": %d", code, count));
  }
  const Phases& m = s.server_mean;
  std::string target;  // escaped
  for (const char c : s.target) {
    if (c == '"' || c == '\\') target += '\\';
    target += c;
  }
  std::string j = "{\n";
  absl::StrAppendFormat(&j, "  \"target\": \"%s\",\n  \"concurrency\": %d,\n", target,
                        s.concurrency);
  absl::StrAppendFormat(&j, "  \"shm\": %s,\n", s.shm ? "true" : "false");
  absl::StrAppendFormat(&j, "  \"sent\": %d,\n  \"ok\": %d,\n  \"failed\": %d,\n", s.sent, s.ok,
                        s.failed());
  absl::StrAppendFormat(&j, "  \"failed_by_code\": {%s},\n", absl::StrJoin(codes, ", "));
  absl::StrAppendFormat(&j,
                        "  \"warmup\": {\"calls\": %d, \"failed\": %d, \"max_seconds\": %s},\n",
                        s.warmup_calls, s.warmup_failed, Num(s.warmup_max));
  absl::StrAppendFormat(&j, "  \"wall_seconds\": %s,\n  \"requests_per_second\": %s,\n",
                        Num(s.wall_seconds), Num(s.requests_per_second));
  absl::StrAppendFormat(&j,
                        "  \"latency_seconds\": {\"p50\": %s, \"p90\": %s, \"p99\": %s, "
                        "\"max\": %s, \"mean\": %s},\n",
                        Num(s.p50), Num(s.p90), Num(s.p99), Num(s.max), Num(s.mean));
  absl::StrAppendFormat(&j, "  \"payload_bytes\": %d,\n  \"payload_gb_per_second\": %s,\n",
                        s.payload_bytes, Num(s.payload_gb_per_second));
  absl::StrAppendFormat(&j, "  \"memcpy_gb_per_second\": %s,\n", Num(s.memcpy_gb_per_second));
  std::vector<std::string> means;
  for (const auto& [name, field] : kPhaseFields) {
    means.push_back(absl::StrFormat("\"%s\": %s", name, Num(m.*field)));
  }
  absl::StrAppendFormat(&j, "  \"server_mean_seconds\": {%s},\n", absl::StrJoin(means, ", "));
  absl::StrAppendFormat(&j, "  \"outside_compute_share\": %s,\n", Num(s.outside_compute_share));
  absl::StrAppendFormat(&j, "  \"ring_busy_share\": %s,\n", Num(s.ring_busy_share));
  absl::StrAppendFormat(&j, "  \"flops_per_request\": %s,\n", Num(s.flops_per_request));
  absl::StrAppendFormat(&j, "  \"tflops_ring\": %s,\n  \"tflops_delivered\": %s\n}\n",
                        Num(s.tflops_ring), Num(s.tflops_delivered));
  return j;
}

absl::Status WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file << contents;
  file.close();
  if (!file) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

// 0 when every call succeeded; else 3 when every failure was UNAVAILABLE or DEADLINE_EXCEEDED,
// 4 when any was of another code (cli/exit_codes.h).
int ExitCodeOf(const BenchSummary& s) {
  if (s.failed() == 0) return s.ok > 0 ? kExitOk : kExitFailure;
  for (const auto& [code, count] : s.failed_by_code) {
    if (code != absl::StatusCodeToString(absl::StatusCode::kUnavailable) &&
        code != absl::StatusCodeToString(absl::StatusCode::kDeadlineExceeded)) {
      return kExitRpcFailed;
    }
  }
  return kExitUnavailable;
}

}  // namespace

int RunBenchCommand(const BenchOptions& o, std::ostream& out) {
  if (absl::Status s = ValidateOptions(o); !s.ok()) {
    out << ErrorLine(s);
    return kExitUsage;
  }
  const v1::AttendRequest request = BuildRequest(o);
  absl::StatusOr<ConnectedClient> connected =
      ConnectAndGetInfo(o.target, absl::Seconds(o.connect_timeout_seconds), o.credentials,
                        o.connections);
  if (!connected.ok()) {
    out << ErrorLine(connected.status());
    return ExitCodeOfCall(connected.status());
  }
  AttentionClient& client = *connected->client;
  const v1::InfoResponse& info = connected->info;
  CallPlan plan;
  plan.force_streaming = o.streaming;
  plan.max_unary_bytes = info.max_unary_bytes();
  plan.timeout = absl::Seconds(o.timeout_seconds);
  // With --backward: one forward for out and lse, then the gradients request every call sends.
  v1::AttendBackwardRequest backward;
  if (o.backward) {
    v1::AttendRequest with_lse = request;
    with_lse.set_return_lse(true);
    absl::StatusOr<v1::AttendResponse> forward =
        client.AttendAuto(with_lse, plan.timeout, plan.max_unary_bytes);
    if (!forward.ok()) {
      out << ErrorLine(forward.status());
      return ExitCodeOfCall(forward.status());
    }
    backward = MakeBackwardRequest(with_lse, *forward, o.seed);
  }
  const bool past_unary_limit =
      o.backward ? static_cast<int64_t>(backward.ByteSizeLong()) > plan.max_unary_bytes &&
                       plan.max_unary_bytes > 0
                 : NeedsStreaming(request, plan.max_unary_bytes);
  // Shared-memory requests are small whatever their tensors: always unary.
  const bool streaming = !o.shm && (o.streaming || past_unary_limit);
  std::string via = o.backward ? "AttendBackward" : "Attend";
  if (streaming) {
    via += "Stream";
  } else {
    via += !o.shm        ? " (unary)"
           : o.cuda_shm ? " (unary, CUDA shared memory)"
                        : " (unary, system shared memory)";
  }
  if (!o.shm && !o.streaming) {
    const google::protobuf::Message& sent =
        o.backward ? static_cast<const google::protobuf::Message&>(backward) : request;
    const int parts =
        static_cast<int64_t>(sent.ByteSizeLong()) > kSplitAboveBytes
            ? HeadParts(o.backward ? AttendBackwardRpc() : AttendRpc(), sent, o.connections)
            : 1;
    if (parts > 1) absl::StrAppend(&via, ", ", parts, " parts by K/V heads");
  }
  // FlashAttention's count: the backward is 2.5 forwards.
  const double flops = (o.backward ? 2.5 : 1.0) * RequestFlops(request);
  out << absl::StrFormat("server %s: version %s, world %d (%s)\n", o.target, info.version(),
                         info.world_size(), info.ready() ? "ready" : "not ready");
  out << absl::StrFormat(
      "bench: q [%d, %d, %d, %d] %s, causal=%d, layout %s, via %s; %s from %d threads\n", o.batch,
      o.seqlen, o.heads, o.head_dim, o.dtype, o.causal, o.layout, via,
      o.duration_seconds > 0 ? absl::StrFormat("for %.3g s", o.duration_seconds)
                             : absl::StrCat(o.requests, " requests"),
      o.concurrency);
  out.flush();

  // --shm: a registered region per thread, sized for the request; unregistered and unlinked
  // when `sessions` goes, on every path.
  std::vector<std::unique_ptr<SharedMemorySession>> sessions;
  const absl::Duration register_timeout = absl::Seconds(o.connect_timeout_seconds);
  const SharedMemorySession::Kind kind =
      o.cuda_shm ? SharedMemorySession::Kind::kCuda : SharedMemorySession::Kind::kSystem;
  for (int i = 0; o.shm && i < o.concurrency; ++i) {
    absl::StatusOr<std::unique_ptr<SharedMemorySession>> session =
        o.backward ? SharedMemorySession::OpenFor(client, backward, register_timeout, kind)
                   : SharedMemorySession::OpenFor(client, request, register_timeout, kind);
    if (!session.ok()) {
      out << ErrorLine(session.status());
      return ExitCodeOfCall(session.status());
    }
    sessions.push_back(*std::move(session));
  }
  // --shm_resident: each thread's request placed in its region once.
  std::vector<v1::AttendRequest> resident;
  std::vector<v1::AttendBackwardRequest> resident_backward;
  for (int i = 0; o.shm_resident && i < o.concurrency; ++i) {
    absl::Status placed;
    if (o.backward) {
      absl::StatusOr<v1::AttendBackwardRequest> r = sessions[i]->PlaceResident(backward);
      if (r.ok()) resident_backward.push_back(*std::move(r));
      placed = r.status();
    } else {
      absl::StatusOr<v1::AttendRequest> r = sessions[i]->PlaceResident(request);
      if (r.ok()) resident.push_back(*std::move(r));
      placed = r.status();
    }
    if (!placed.ok()) {
      out << ErrorLine(placed);
      return kExitFailure;
    }
  }
  if (o.shm) {
    out << absl::StrFormat("shared memory: %d regions of %d bytes registered%s\n", o.concurrency,
                           sessions.front()->size(),
                           o.shm_resident ? ", the tensors resident in them" : "");
  }
  const auto shm_of = [&sessions](int thread) {
    return sessions.empty() ? nullptr : sessions[static_cast<size_t>(thread)].get();
  };
  const auto at = [](const auto& v, int thread) {
    return v.empty() ? nullptr : &v[static_cast<size_t>(thread)];
  };
  const LoadResult load =
      o.backward ? RunLoad(
                       [&](int t) {
                         return OneBackwardCall(client, shm_of(t), at(resident_backward, t),
                                                backward, plan);
                       },
                       o)
                 : RunLoad(
                       [&](int t) {
                         return OneCall(client, shm_of(t), at(resident, t), request, plan);
                       },
                       o);
  BenchSummary summary = Summarize(o, load, flops);
  summary.memcpy_gb_per_second = MeasureMemcpyGbPerSecond();
  out << FormatReport(summary);
  if (!o.json_path.empty()) {
    if (absl::Status s = WriteFile(o.json_path, FormatJson(summary)); !s.ok()) {
      out << ErrorLine(s);
      return kExitFailure;
    }
    out << "wrote " << o.json_path << "\n";
  }
  return ExitCodeOf(summary);
}

}  // namespace ringattn
