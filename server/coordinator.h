// The coordinator: serves the public AttentionService (gRPC callback API: no thread waits for a
// request) on its port and the internal CoordinatorService on another, where every call must
// carry the cluster secret (proto/cluster_auth.h); either may have TLS, and the public API may
// require bearer tokens (server/api_tokens.h). It admits requests into a queue bounded by
// requests and bytes and fair between clients (server/admission_queue.h), and runs them one at
// a time through the ring of workers that RingManager keeps formed.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "base/trace_context.h"
#include "proto/cluster_auth.h"
#include "proto/transport_security.h"
#include "ringattn/v1/attention.pb.h"
#include "server/admission_queue.h"
#include "server/api_tokens.h"
#include "server/attend_request.h"
#include "server/metrics.h"
#include "server/rendezvous_store.h"
#include "server/ring_manager.h"
#include "server/shared_memory_arena.h"
#include "server/shared_memory_registry.h"
#include "server/shared_tensors.h"

namespace grpc {
class Server;
}  // namespace grpc

namespace ringattn {

class Coordinator {
 public:
  struct Options {
    std::string listen_address = "127.0.0.1:0";  // the public API
    // The internal plane (worker registration, the rendezvous store); workers connect here.
    std::string internal_listen_address = "127.0.0.1:0";
    // The secret every internal call carries (>= 16 printable bytes); empty: one is generated
    // (cluster_secret() gives it to local workers).
    std::string cluster_secret;
    std::string metrics_address;  // host:port of /metrics; empty disables
    // host:port of a plaintext server of grpc.health.v1 alone, for probes that cannot speak
    // TLS (Kubernetes' gRPC probe); empty: none (health is on the public port as always).
    std::string health_listen_address;
    int world_size = 1;           // workers in the ring
    size_t max_queue = 16;        // admitted requests waiting; more are RESOURCE_EXHAUSTED
    // Request bytes the service holds (being received, queued or running); past it
    // RESOURCE_EXHAUSTED. <= 0: no bound.
    int64_t max_queued_bytes = int64_t{8} << 30;
    // The part of max_queue and of max_queued_bytes one client may take (at least one request).
    double max_client_share = 0.5;
    // TLS on the public API: this server's certificate and key (PEM files; empty: plaintext),
    // and with `ca` mTLS: clients must present a certificate that CA signed, and a client's
    // identity is its certificate's subject (alternative) name.
    TlsFiles tls;
    // TLS on the internal plane (ClusterSecret::WithTls): all three files, or none.
    TlsFiles internal_tls;
    // Bearer tokens the public API requires (server/api_tokens.h); empty: none. A caller's
    // identity is then its token's client name.
    std::string api_tokens_file;
    // Unary messages above this are refused by gRPC (RESOURCE_EXHAUSTED); clients stream.
    int64_t max_unary_bytes = int64_t{1} << 30;
    int64_t max_request_bytes = int64_t{4} << 30;  // any request, streamed or not
    int64_t stream_chunk_bytes = int64_t{4} << 20;  // response chunks of the streaming RPCs
    // Whether same-host callers may register system shared memory (callers on other hosts
    // never may), and whether requests sent as bytes reach workers on this host through the
    // coordinator's shared-memory arena instead of as shard messages.
    bool shared_memory = true;
    SharedMemoryRegistry::Limits shared_memory_limits;
    // The longest a request may take, from arrival: its deadline is the client's or this,
    // whichever comes first, so that a request without a deadline cannot hold the ring forever.
    absl::Duration max_request_time = absl::Minutes(10);
    // Requests on the ring at once (>= 1): with 2, the next request is scattered and its inputs
    // staged by the workers while the current one computes (the ring passes stay one at a time,
    // in turn order). Requests leave the queue one at a time, each once the one before it has
    // reached its workers.
    int pipeline_depth = 3;
    // A streaming call whose client sends nothing (while the call waits for its chunks) or
    // reads nothing (while the answer waits to be sent) for this long is cancelled, freeing
    // what it holds.
    absl::Duration stream_idle_timeout = absl::Seconds(60);
    // Public connections: closed (GOAWAY) after this long without a call, and pinged after this
    // long without traffic, dropped when a ping goes unanswered for keepalive_timeout; so that
    // idle or dead peers do not hold connections.
    absl::Duration connection_idle = absl::Minutes(10);
    absl::Duration keepalive_time = absl::Seconds(60);
    absl::Duration keepalive_timeout = absl::Seconds(20);
    // How long a request waits for a ring that is being (re-)formed before UNAVAILABLE.
    absl::Duration ring_wait = absl::Seconds(20);
    RingManager::Options ring;
  };

  explicit Coordinator(Options options);
  ~Coordinator();
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  absl::Status BuildAndStart();
  int port() const { return port_; }
  int internal_port() const { return internal_port_; }
  int health_port() const { return health_port_; }  // 0 without health_listen_address
  // "127.0.0.1:<internal port>" for workers on this host.
  std::string internal_address() const;
  // Empty when none could be made (BuildAndStart then fails).
  const std::string& cluster_secret() const;
  // host:port of the registered workers (the internal plane's; GetInfo does not show them).
  std::vector<std::string> worker_addresses() const;
  // The formed ring's generation; 0 while none is formed.
  int64_t ring_generation() const;
  int metrics_port() const;
  bool WaitUntilReady(absl::Duration timeout) const { return ring_->WaitUntilReady(timeout); }
  // What admission holds now: requests queued, request bytes held (AdmissionQueue), and the
  // requests the dispatchers have (running, or waiting for the ring; up to pipeline_depth).
  struct AdmissionState {
    size_t queued = 0;
    int64_t held_bytes = 0;
    bool running = false;  // running_count > 0
    size_t running_count = 0;
  };
  AdmissionState admission() const;
  // Graceful stop, step one: health NOT_SERVING, new requests refused (UNAVAILABLE), and waits
  // up to `grace` for the queued and running requests to finish. True when they all did.
  // Shutdown follows.
  bool Drain(absl::Duration grace);
  void Shutdown();
  void Wait();

  // For the services (server/coordinator.cc).
  class Services;

 private:
  // The compute RPCs' handlers (coordinator.cc): one unary and one streaming reactor, each a
  // template over the RPC's description.
  template <typename Call>
  class UnaryCall;
  template <typename Call>
  class StreamCall;

  AttendLimits Limits() const;
  // OK when an internal call carries the cluster secret; UNAUTHENTICATED otherwise.
  absl::Status CheckInternal(const grpc::ServerContextBase& ctx) const;
  // Who makes a public call: the client its bearer token names ("client:<name>") when tokens are
  // required (UNAUTHENTICATED without a valid one), else the authenticated peer (mTLS), else the
  // peer's address. Keys what a caller owns and its share of admission.
  absl::StatusOr<std::string> Caller(const grpc::ServerContextBase& ctx) const;
  // Checks `request` and queues its job, which runs it into `response`; `finish` gets the job's
  // status once, after which request and response may be gone. A refused request (invalid, queue
  // full) returns its status and `finish` is never called.
  // `owner` is the caller's identity (CallerIdentity), whose shared-memory regions the request
  // may refer to. `work` gets the request's work (for the metrics) before the job is queued;
  // `trace` is the call's span, which the worker calls carry on. `landed` are tensors already
  // in the coordinator's shared memory (a stream's landing arena): inputs the request carries
  // without data, outputs the run writes there instead of into `response`.
  template <typename Call>
  absl::StatusOr<std::shared_ptr<AttendJob>> Submit(const typename Call::Request& request,
                                                    typename Call::Response* response,
                                                    const std::string& owner, absl::Time arrival,
                                                    absl::Time deadline, RequestWork* work,
                                                    const TraceContext& trace,
                                                    std::function<void(absl::Status)> finish,
                                                    SharedTensors landed = {});
  // The client went away or the deadline passed (`reason`): a queued job is taken out and
  // finished, a running one stops its worker calls.
  void Cancel(const std::shared_ptr<AttendJob>& job, const absl::Status& reason);
  // Waits for the ring and runs the job on it; reports a failed ring. `fanning_out` as
  // RunControl's.
  absl::Status RunJob(AttendJob& job, std::function<void()> fanning_out, SharedMemoryArena* arena);
  void FillInfo(v1::InfoResponse* response) const;
  // Health (grpc.health.v1) on the public port and the health port.
  void SetServing(bool serving);
  // Takes jobs off the queue and runs them, with `arena` (null: none) for their bytes.
  void DispatchLoop(SharedMemoryArena* arena);
  // The streams' activity, for cancelling idle ones (StatusLoop).
  struct StreamWatch {
    absl::Mutex mu;
    grpc::CallbackServerContext* ctx ABSL_GUARDED_BY(mu);  // null once done or cancelled
    absl::Time last ABSL_GUARDED_BY(mu);
    bool server_busy ABSL_GUARDED_BY(mu) = false;  // the job runs: not the client's idleness
  };
  std::shared_ptr<StreamWatch> WatchStream(grpc::CallbackServerContext* ctx);
  void UnwatchStream(const std::shared_ptr<StreamWatch>& watch);
  void CancelIdleStreams();
  // A member of ring `generation` stopped answering: the job running on it is stopped.
  void OnRingBroken(int64_t generation, const std::string& why);
  void StatusLoop();

  const Options options_;
  RendezvousStore store_;
  SharedMemoryRegistry shared_memory_;
  // For requests that arrive as bytes, when workers share this host (one request at a time:
  // the dispatcher runs them in turn).
  // One arena per dispatcher: a request in flight has its own.
  std::vector<std::unique_ptr<SharedMemoryArena>> arenas_;
  // Where streamed requests land their chunks (pipeline_depth + 1 arenas; a stream that finds
  // none free assembles its tensors in memory as before). Null without shared memory.
  std::unique_ptr<ArenaPool> landing_;
  ServiceMetrics metrics_;
  absl::StatusOr<ClusterSecret> secret_;  // with internal TLS when configured
  std::optional<ApiTokens> tokens_;       // set by BuildAndStart when api_tokens_file is
  std::unique_ptr<RingManager> ring_;
  AdmissionQueue queue_;
  std::unique_ptr<Services> services_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::Server> internal_server_;
  std::unique_ptr<grpc::Server> health_server_;
  int port_ = 0;
  int internal_port_ = 0;
  int health_port_ = 0;
  std::vector<std::thread> dispatchers_;  // pipeline_depth of them
  std::thread status_thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> draining_{false};
  absl::Mutex watches_mu_;
  std::vector<std::shared_ptr<StreamWatch>> watches_ ABSL_GUARDED_BY(watches_mu_);
  std::atomic<int> in_flight_{0};  // admitted jobs not yet finished: queued or running
  // The jobs the dispatchers run (each with the ring generation it runs on, for stopping it when
  // that ring breaks: RingManager::Options::on_ring_broken), and whether one of them is between
  // the queue and its workers (the next may leave the queue only after).
  mutable absl::Mutex running_mu_;
  std::vector<std::pair<std::shared_ptr<AttendJob>, int64_t>> running_ ABSL_GUARDED_BY(running_mu_);
  bool starting_ ABSL_GUARDED_BY(running_mu_) = false;
};

}  // namespace ringattn
