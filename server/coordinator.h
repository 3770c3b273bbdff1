// The coordinator: serves the public AttentionService and the internal CoordinatorService on
// one port, admits requests into a bounded queue, and runs them one at a time through the ring
// of workers that RingManager keeps formed.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "ringattn/v1/attention.pb.h"
#include "server/admission_queue.h"
#include "server/attend_request.h"
#include "server/metrics.h"
#include "server/rendezvous_store.h"
#include "server/ring_manager.h"

namespace grpc {
class Server;
class ServerContext;
template <class W, class R>
class ServerReaderWriter;
}  // namespace grpc

namespace ringattn {

class Coordinator {
 public:
  struct Options {
    std::string listen_address = "127.0.0.1:0";
    std::string metrics_address;  // host:port of /metrics; empty disables
    int world_size = 1;           // workers in the ring
    size_t max_queue = 16;        // admitted requests waiting; more are RESOURCE_EXHAUSTED
    // Unary messages above this are refused by gRPC (RESOURCE_EXHAUSTED); clients stream.
    int64_t max_unary_bytes = int64_t{1} << 30;
    int64_t max_request_bytes = int64_t{4} << 30;  // any request, streamed or not
    int64_t stream_chunk_bytes = int64_t{4} << 20; // response chunks of AttendStream
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
  int metrics_port() const;
  bool WaitUntilReady(absl::Duration timeout) const { return ring_->WaitUntilReady(timeout); }
  void Shutdown();
  void Wait();

  // For the services (server/coordinator.cc).
  class Services;

 private:
  absl::Status Handle(grpc::ServerContext* ctx, const v1::AttendRequest& request,
                      absl::Time arrival, double receive_seconds, v1::AttendResponse* response);
  absl::Status HandleBackward(grpc::ServerContext* ctx, const v1::AttendBackwardRequest& request,
                              absl::Time arrival, v1::AttendBackwardResponse* response);
  // Admits a validated job and waits until the dispatcher ran it (or it left the queue because
  // its client went away or its deadline passed). The job's status.
  absl::Status AdmitAndWait(grpc::ServerContext* ctx, const std::shared_ptr<AttendJob>& job);
  absl::Status ReceiveStream(
      grpc::ServerReaderWriter<v1::AttendStreamResponse, v1::AttendStreamRequest>* stream,
      v1::AttendRequest* request);
  absl::Status SendStream(
      grpc::ServerReaderWriter<v1::AttendStreamResponse, v1::AttendStreamRequest>* stream,
      absl::Time arrival, v1::AttendResponse* response);
  // AttendBackwardStream's halves: the header checked for the sizes to expect, then the six
  // tensors' chunks; the response header, then dq, dk and dv in chunks.
  absl::Status ReceiveBackwardStream(
      grpc::ServerReaderWriter<v1::AttendBackwardStreamResponse,
                               v1::AttendBackwardStreamRequest>* stream,
      v1::AttendBackwardRequest* request);
  absl::Status SendBackwardStream(
      grpc::ServerReaderWriter<v1::AttendBackwardStreamResponse,
                               v1::AttendBackwardStreamRequest>* stream,
      absl::Time arrival, v1::AttendBackwardResponse* response);
  void DispatchLoop();
  void StatusLoop();

  const Options options_;
  RendezvousStore store_;
  ServiceMetrics metrics_;
  std::unique_ptr<RingManager> ring_;
  AdmissionQueue queue_;
  std::unique_ptr<Services> services_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::thread dispatcher_;
  std::thread status_thread_;
  std::atomic<bool> stopping_{false};
};

}  // namespace ringattn
