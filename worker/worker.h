// The worker process: serves ringattn.v1.WorkerService and registers with the coordinator,
// which then tells it to join a ring and sends it shards.
//
//   Worker::Options options;
//   options.coordinator_address = "coordinator:50051";
//   Worker worker(options);
//   absl::Status s = worker.BuildAndStart();  // serving and registered, or an error
//   ...
//   worker.Shutdown();
//   worker.Wait();
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "proto/transport_security.h"
#include "ringattn/v1/worker.grpc.pb.h"
#include "worker/worker_metrics.h"

namespace ringattn {

class WorkerServiceImpl;

class Worker {
 public:
  struct Options {
    // host:port of the coordinator's CoordinatorService. Required.
    std::string coordinator_address;
    // Where the WorkerService listens; port 0 picks a free one (see port()).
    std::string listen_address = "127.0.0.1:0";
    // Kernel: auto (cuda when there is a GPU, else cpu), cpu, cpu_reference, cuda,
    // cuda_reference, cudnn. GPU kernels run the ring over NCCL, CPU ones over Gloo.
    std::string kernel = "auto";
    // GPU index for GPU kernels (modulo the number of GPUs).
    int device = 0;
    // Host the coordinator and the other ranks reach this worker at: advertised to the
    // coordinator with the port, and the address the Gloo transport listens on.
    std::string advertise_host = "127.0.0.1";
    // Whether to read and write same-host clients' shared memory itself: advertises HostId() to
    // the coordinator. Off for a worker that does not share the coordinator's /dev/shm (another
    // container): the coordinator then moves those tensors' bytes for it.
    bool shared_memory = true;
    // The internal plane's secret (proto/cluster_auth.h): carried by every call to the
    // coordinator and required of every call to this worker. Empty: RINGATTN_CLUSTER_SECRET.
    std::string cluster_secret;
    // TLS on the internal plane (ClusterSecret::WithTls): this worker's certificate and key and
    // the cluster's CA, all three or none (plaintext).
    TlsFiles internal_tls;
    // Registers again when the coordinator has not pinged this worker for this long (it
    // restarted, or dropped the worker while it was paused); 0 disables.
    std::chrono::milliseconds reregister_after = std::chrono::seconds(3);
    // How long registration keeps retrying while the coordinator is not up yet.
    std::chrono::milliseconds register_timeout = std::chrono::seconds(60);
    // host:port of this worker's Prometheus /metrics (worker/worker_metrics.h; port 0 picks a
    // free one, see metrics_port()); empty: none.
    std::string metrics_address;
    // Calls of consecutive turns staged at once (WorkerServiceImpl's staging_sets): the
    // coordinator's --pipeline_depth. Each set holds one call's shard buffers.
    int pipeline_depth = 3;
  };

  explicit Worker(Options options);
  // Shuts down and waits.
  ~Worker();

  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Makes the engine (kernel and transport), starts the gRPC server (message limits raised for shard payloads),
  // then registers with the coordinator, retrying with backoff for up to register_timeout.
  // InvalidArgument for bad options (an unknown kernel names the known ones; a GPU kernel without a GPU is
  // Unavailable), Unavailable
  // when the port cannot be bound, DeadlineExceeded (or the coordinator's refusal) when
  // registration fails; the server is stopped again on any error. Call once.
  absl::Status BuildAndStart();

  // The bound port; 0 before BuildAndStart succeeds.
  int port() const { return port_; }
  // host:port as advertised to the coordinator.
  std::string address() const;
  // The id the coordinator gave this worker at registration.
  std::string worker_id() const;
  // What the engine reported (valid after BuildAndStart).
  const std::string& backend_name() const { return backend_name_; }
  const std::string& device_name() const { return device_name_; }
  // The port of /metrics; 0 without metrics_address.
  int metrics_port() const { return metrics_ != nullptr ? metrics_->exposer_port() : 0; }

  // Aborts the ring and any rendezvous, stops the server (calls in flight fail promptly) and
  // interrupts a registration still retrying. Idempotent; callable from any thread.
  void Shutdown();
  // Blocks until the server has shut down. Returns at once if it never started.
  void Wait();

 private:
  // Registers, retrying until `timeout` passes (or the worker is shut down).
  absl::Status Register(std::chrono::milliseconds timeout);
  // Until shutdown: registers again whenever the coordinator stopped pinging (reregister_after).
  void KeepRegistered();

  const Options options_;
  int port_ = 0;
  mutable absl::Mutex id_mu_;  // KeepRegistered writes the id while others may read it
  std::string worker_id_ ABSL_GUARDED_BY(id_mu_);
  std::string backend_name_;
  std::string device_name_;
  std::string transport_;
  std::shared_ptr<grpc::Channel> coordinator_channel_;
  std::shared_ptr<v1::CoordinatorService::Stub> coordinator_;
  // Outlives the service that records into it; its exposer is stopped before the service (and
  // the engine its GPU memory sampler reads) goes.
  std::unique_ptr<WorkerMetrics> metrics_;
  // The service outlives the server that calls it.
  std::unique_ptr<WorkerServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;

  std::thread keep_registered_;
  absl::Notification shutdown_requested_;
  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
};

// The `ringattn worker` process: builds and starts a Worker, serves until SIGTERM or SIGINT,
// then shuts down cleanly, logging each step (base/log.h). Returns OK after a clean shutdown
// (also when the signal came while still registering), else why the worker could not start:
// UNAVAILABLE when it could not listen, DEADLINE_EXCEEDED when no coordinator answered its
// registration in time. Installs handlers for those two signals while it runs and restores the
// previous ones on return.
absl::Status RunWorkerMain(const Worker::Options& options);

}  // namespace ringattn
