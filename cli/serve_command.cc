#include "cli/serve_command.h"

#include <signal.h>

#include <atomic>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/log.h"
#include "cli/exit_codes.h"
#include "server/coordinator.h"
#include "server/local_workers.h"

namespace ringattn {
namespace {

std::atomic<bool> g_stop{false};

void OnSignal(int) { g_stop = true; }

constexpr char kComponent[] = "serve";

}  // namespace

int RunServe(const ServeOptions& o, std::ostream& out) {
  Coordinator::Options co;
  co.listen_address = o.listen_address;
  co.internal_listen_address =
      o.internal_listen_address.empty() ? "127.0.0.1:0" : o.internal_listen_address;
  co.cluster_secret = o.cluster_secret;
  co.metrics_address = o.metrics_address;
  co.health_listen_address = o.health_listen_address;
  co.world_size = o.workers;
  co.max_queue = o.max_queue;
  co.pipeline_depth = o.pipeline_depth;
  co.max_queued_bytes = o.max_queued_bytes;
  co.max_client_share = o.max_client_share;
  co.tls = o.tls;
  co.internal_tls = o.internal_tls;
  co.api_tokens_file = o.api_tokens_file;
  co.max_unary_bytes = o.max_unary_bytes;
  co.max_request_bytes = o.max_request_bytes;
  co.shared_memory = o.shared_memory;
  co.max_request_time = absl::Seconds(o.max_request_seconds);
  co.stream_idle_timeout = absl::Seconds(o.stream_idle_seconds);
  Coordinator coordinator(co);
  if (absl::Status s = coordinator.BuildAndStart(); !s.ok()) {
    LogError(kComponent, absl::StrCat("cannot start the coordinator: ", s.ToString()));
    // UNAVAILABLE: an address in use or not this host's (the public, internal, health or
    // metrics one).
    return absl::IsUnavailable(s) ? kExitCannotListen : kExitFailure;
  }
  const std::string address = absl::StrCat("127.0.0.1:", coordinator.port());
  std::string listening =
      absl::StrCat("coordinator listening on port ", coordinator.port(),
                   o.tls.cert.empty() ? ""
                   : o.tls.ca.empty() ? " (TLS)"
                                      : " (mTLS)",
                   o.api_tokens_file.empty() ? "" : " (bearer tokens)", " (internal plane on port ",
                   coordinator.internal_port(), o.internal_tls.cert.empty() ? "" : ", mTLS", ")");
  if (!o.metrics_address.empty()) {
    absl::StrAppend(&listening, ", metrics on port ", coordinator.metrics_port());
  }
  if (coordinator.health_port() != 0) {
    absl::StrAppend(&listening, ", health on port ", coordinator.health_port());
  }
  LogInfo(kComponent, listening,
          {{"port", coordinator.port()}, {"internal_port", coordinator.internal_port()}});
  if (!o.api_tokens_file.empty() && o.tls.cert.empty()) {
    LogWarning(kComponent, "bearer tokens without TLS (--tls_cert) cross the network in plaintext");
  }

  std::unique_ptr<LocalWorkerPool> workers;
  if (o.spawn_workers) {
    LocalWorkerPool::Options wo;
    wo.binary = o.binary;
    wo.count = o.workers;
    wo.coordinator_address = coordinator.internal_address();
    wo.cluster_secret = coordinator.cluster_secret();
    wo.kernel = o.kernel;
    // The workers log as this process does.
    wo.extra_args = {absl::StrCat("--log_format=", LogFormatName(CurrentLogFormat())),
                     absl::StrCat("--log_level=", LogLevelName(CurrentLogLevel())),
                   absl::StrCat("--pipeline_depth=", o.pipeline_depth)};
    if (!o.internal_tls.cert.empty()) {
      wo.extra_args.insert(wo.extra_args.end(), {"--internal_tls_cert=" + o.internal_tls.cert,
                                                 "--internal_tls_key=" + o.internal_tls.key,
                                                 "--internal_tls_ca=" + o.internal_tls.ca});
    }
    workers = std::make_unique<LocalWorkerPool>(wo);
    if (absl::Status s = workers->Start(); !s.ok()) {
      LogError(kComponent, s.ToString());
      return kExitFailure;
    }
  }
  if (!coordinator.WaitUntilReady(absl::Seconds(o.ready_timeout_seconds))) {
    LogError(kComponent, absl::StrCat("the ring of ", o.workers, " workers did not form within ",
                                      o.ready_timeout_seconds, " s"));
    if (workers) workers->Stop();
    coordinator.Shutdown();
    return kExitFailure;
  }
  LogInfo(kComponent, absl::StrCat("ring of ", o.workers, " workers ready (kernel ", o.kernel, ")"),
          {{"workers", o.workers}, {"kernel", o.kernel}});

  int code = kExitOk;
  if (o.demo) {
    AttendCommandOptions req = o.demo_request;
    req.target = address;
    code = RunAttendCommand(req, out);
  } else {
    signal(SIGINT, OnSignal);
    signal(SIGTERM, OnSignal);
    while (!g_stop) absl::SleepFor(absl::Milliseconds(100));
    LogInfo(kComponent, absl::StrCat("draining: refusing new requests, finishing the admitted "
                                     "ones (up to ",
                                     o.drain_seconds, " s)"));
    const bool drained = coordinator.Drain(absl::Seconds(o.drain_seconds));
    LogInfo(kComponent, drained ? "drained; shutting down" : "drain time over; shutting down");
  }
  if (workers) workers->Stop();
  coordinator.Shutdown();
  return code;
}

}  // namespace ringattn
