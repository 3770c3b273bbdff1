// `ringattn serve` (the embedded default: a coordinator on localhost plus local worker
// processes, CPU backend and a Gloo ring without a GPU) and `ringattn coordinator` (the
// coordinator alone, for deployments whose workers register from elsewhere).
#pragma once

#include <ostream>
#include <string>

#include "cli/attend_command.h"
#include "proto/transport_security.h"

namespace ringattn {

struct ServeOptions {
  std::string listen_address = "127.0.0.1:50051";
  std::string metrics_address = "127.0.0.1:9464";  // empty disables /metrics
  std::string health_listen_address;               // Coordinator::Options::health_listen_address
  // The internal plane (workers register here); empty: a free loopback port, for local workers.
  std::string internal_listen_address;
  // The internal plane's secret; empty: generated (local workers are given it).
  std::string cluster_secret;
  int workers = 3;              // local worker processes (the ring's size)
  bool spawn_workers = true;    // false: wait for workers to register (Kubernetes)
  std::string kernel = "auto";  // passed to every local worker
  std::string binary;           // the ringattn executable, for local workers
  size_t max_queue = 16;
  int pipeline_depth = 3;  // Coordinator::Options::pipeline_depth
  int64_t max_queued_bytes = int64_t{8} << 30;  // Coordinator::Options::max_queued_bytes
  double max_client_share = 0.5;                // Coordinator::Options::max_client_share
  // Coordinator::Options::tls (the public API), internal_tls (also given to local workers, as
  // paths on their command line) and api_tokens_file.
  TlsFiles tls;
  TlsFiles internal_tls;
  std::string api_tokens_file;
  bool shared_memory = true;  // Coordinator::Options::shared_memory
  int64_t max_unary_bytes = int64_t{1} << 30;
  int64_t max_request_bytes = int64_t{4} << 30;
  double ready_timeout_seconds = 120;
  // On SIGTERM/SIGINT: how long queued and running requests get to finish before the workers
  // stop (new requests are refused meanwhile).
  double drain_seconds = 30;
  double max_request_seconds = 600;  // Coordinator::Options::max_request_time
  double stream_idle_seconds = 60;   // Coordinator::Options::stream_idle_timeout
  // --demo: once the ring is up, send `demo_request` through the client, print the result
  // and the timings, and stop. The exit code is the request's.
  bool demo = false;
  AttendCommandOptions demo_request;
};

// Runs until SIGINT/SIGTERM (or, with demo, until the sample request is answered, printed to
// `out`); its progress goes to the log (base/log.h). Returns the process exit code
// (cli/exit_codes.h): 0 after a clean stop, 6 when an address could not be listened on, 1 when
// the workers or their ring did not start; with demo, the request's.
int RunServe(const ServeOptions& options, std::ostream& out);

}  // namespace ringattn
