// `ringattn bench`: a load generator for a running coordinator.
//
// Builds one synthetic request (Attend, or with `backward` an AttendBackward) and sends it from
// `concurrency` client threads, `requests` times
// in all (or for `duration_seconds`), then reports how many calls succeeded and how the failed
// ones failed (by status code), requests per second, the client round-trip latency percentiles,
// the payload rate, the means of the server's phases from the responses' Timings, the share of
// the end-to-end time spent outside the workers' compute, and the attention throughput.
//
// All threads share one AttentionClient (one channel): the client is thread-safe, and gRPC
// shares the TCP connection between channels with the same arguments to one target anyway, so a
// channel per thread would not add connections. Concurrent calls are concurrent HTTP/2 streams,
// as in any one process that calls the service.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>

#include "client/attention_client.h"

namespace ringattn {

struct BenchOptions {
  std::string target = "127.0.0.1:50051";  // the coordinator, host:port
  ClientCredentials credentials;           // TLS and bearer token; default: neither
  int connections = 1;  // AttentionClient::Connect's: requests past kSplitAboveBytes cut by heads
  int concurrency = 4;                     // client threads, each with one call in flight
  int requests = 32;                       // calls in all (by count, when duration_seconds is 0)
  // Calls each thread makes before the timed load, not counted: first calls pay one-time costs
  // (a worker registering a shared-memory region with CUDA, a cudnn graph build). Their
  // slowest round trip is reported apart.
  int warmup = 0;
  // > 0: keep sending until this many seconds have passed (calls already started finish), and
  // ignore `requests`. 0: send exactly `requests` calls.
  double duration_seconds = 0;
  // The synthetic request, as `ringattn attend` makes it.
  int batch = 1;
  int64_t seqlen = 4096;
  int heads = 8;
  int heads_k = 0;  // 0: equal to heads
  int head_dim = 64;
  std::string dtype = "bf16";  // fp32, fp16 or bf16
  bool causal = false;
  std::string layout = "auto";  // auto, contiguous, zigzag or stripe
  bool streaming = false;       // force AttendStream (else by the server's unary limit)
  // Send the tensors through system shared memory: one region per client thread, sized for the
  // request, registered before the load and reused by each of the thread's calls, then
  // unregistered and unlinked. Unary calls only (not with `streaming`). Latency then includes
  // the copies into and out of the region, also reported as the phases shm_in and shm_out.
  bool shm = false;
  // With `shm`: the tensors live in the regions (a client that computes in shared memory): each
  // thread's inputs are copied in once before the load and its outputs are left there, so the
  // latency is the service's alone.
  bool shm_resident = false;
  // With `shm`: the regions are GPU allocations of this process (device 0, CUDA IPC).
  bool cuda_shm = false;
  // Drive AttendBackward (AttendBackwardStream past the unary limit or with `streaming`)
  // instead of Attend: one forward first for out and lse, then every call sends the same
  // gradients request (synthetic dout); throughput counts the backward as 2.5 forwards.
  bool backward = false;
  double timeout_seconds = 300;         // for each call
  double connect_timeout_seconds = 10;  // for the connection and GetInfo
  uint64_t seed = 1;
  std::string json_path;  // when set, the results are also written here as one JSON object
};

// Runs the benchmark, printing the report to `out`. Returns the process exit code
// (cli/exit_codes.h): 0 when every call succeeded, 2 for bad options, 3 when the server could
// not be reached or every failed call was UNAVAILABLE or DEADLINE_EXCEEDED, 4 when a call failed
// with another code (the report is still printed), 1 when the JSON file was not written.
int RunBenchCommand(const BenchOptions& options, std::ostream& out);

}  // namespace ringattn
