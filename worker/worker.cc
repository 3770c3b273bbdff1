#include "worker/worker.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <functional>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/log.h"
#include "base/shared_memory.h"
#include "base/status_macros.h"
#include "proto/cluster_auth.h"
#include "proto/convert.h"
#include "worker/ring_engine.h"
#include "worker/worker_service.h"

namespace ringattn {
namespace {

using Clock = std::chrono::system_clock;

constexpr char kComponent[] = "worker";

// Each registration attempt waits this long at most for the coordinator to answer.
constexpr auto kRegisterAttemptTimeout = std::chrono::seconds(2);
constexpr auto kInitialBackoff = std::chrono::milliseconds(100);
constexpr auto kMaxBackoff = std::chrono::seconds(2);
// Calls in flight get this long to finish after Shutdown (they fail fast: the ring is aborted).
constexpr auto kShutdownGrace = std::chrono::seconds(5);

// Codes worth retrying: the coordinator is not (yet) reachable or not ready.
bool Retryable(grpc::StatusCode code) {
  return code == grpc::UNAVAILABLE || code == grpc::DEADLINE_EXCEEDED ||
         code == grpc::RESOURCE_EXHAUSTED || code == grpc::ABORTED;
}

std::shared_ptr<grpc::Channel> CoordinatorChannel(const std::string& address,
                                                 const ClusterSecret& secret) {
  grpc::ChannelArguments args;
  // Reconnect soon after the coordinator comes up, instead of gRPC's default backoff (up to
  // two minutes).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return ClusterChannel(address, args, secret);
}

// host:port, bracketing an IPv6 literal.
std::string JoinHostPort(const std::string& host, int port) {
  const bool ipv6 = !host.empty() && host.find(':') != std::string::npos && host.front() != '[';
  return ipv6 ? absl::StrCat("[", host, "]:", port) : absl::StrCat(host, ":", port);
}

// Write end of RunWorkerMain's signal pipe.
volatile sig_atomic_t g_signal_pipe = -1;

void OnShutdownSignal(int sig) {
  const int saved_errno = errno;
  const unsigned char byte = static_cast<unsigned char>(sig);
  if (write(g_signal_pipe, &byte, 1) < 0) {
    // Nothing safe to do in a handler; the pipe only fills after many signals.
  }
  errno = saved_errno;
}

}  // namespace

Worker::Worker(Options options) : options_(std::move(options)) {}

Worker::~Worker() {
  Shutdown();
  Wait();
  if (metrics_ != nullptr) metrics_->StopExposer();
}

std::string Worker::address() const { return JoinHostPort(options_.advertise_host, port_); }

std::string Worker::worker_id() const {
  absl::MutexLock lock(&id_mu_);
  return worker_id_;
}

absl::Status Worker::BuildAndStart() {
  if (options_.coordinator_address.empty()) {
    return absl::InvalidArgumentError("coordinator_address must be set (host:port)");
  }
  if (options_.listen_address.empty()) {
    return absl::InvalidArgumentError("listen_address must be set (host:port; port 0 picks one)");
  }
  if (options_.advertise_host.empty()) {
    return absl::InvalidArgumentError(
        "advertise_host must be set: the host the coordinator and the other ranks reach this "
        "worker at");
  }
  RingEngineOptions engine_options;
  engine_options.kernel = options_.kernel;
  engine_options.device = options_.device;
  engine_options.gloo_hostname = options_.advertise_host;
  RA_ASSIGN_OR_RETURN(std::unique_ptr<RingEngine> engine, MakeRingEngine(engine_options));
  backend_name_ = engine->backend_name();
  device_name_ = engine->device_name();
  transport_ = engine->transport();

  absl::StatusOr<ClusterSecret> secret =
      options_.cluster_secret.empty() ? ClusterSecret::FromFileOrEnvironment("")
                                      : ClusterSecret::FromString(options_.cluster_secret);
  if (!secret.ok()) return secret.status();
  const TlsFiles& tls = options_.internal_tls;
  if (!tls.cert.empty() || !tls.key.empty() || !tls.ca.empty()) {
    secret = secret->WithTls(tls);
    if (!secret.ok()) return secret.status();
  }
  coordinator_channel_ = CoordinatorChannel(options_.coordinator_address, *secret);
  coordinator_ = v1::CoordinatorService::NewStub(coordinator_channel_);

  std::function<std::optional<RingEngine::DeviceMemory>()> gpu_memory;
  if (engine->DeviceMemoryNow().has_value()) {
    gpu_memory = [e = engine.get()] { return e->DeviceMemoryNow(); };
  }
  metrics_ = std::make_unique<WorkerMetrics>(
      WorkerMetrics::Info{backend_name_, device_name_, transport_}, std::move(gpu_memory));
  if (!options_.metrics_address.empty()) {
    RA_RETURN_IF_ERROR(metrics_->StartExposer(options_.metrics_address));
  }
  auto service = std::make_unique<WorkerServiceImpl>(coordinator_, std::move(engine), *secret,
                                                     metrics_.get(), options_.pipeline_depth);

  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.listen_address, secret->ServerCredentials(), &port);
  builder.RegisterService(service.get());
  // Shards of long sequences are large; the coordinator enforces the request limits.
  builder.SetMaxReceiveMessageSize(INT_MAX);
  builder.SetMaxSendMessageSize(INT_MAX);
  // A port in use is an error, not shared (gRPC sets SO_REUSEPORT by default).
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError(
        absl::StrCat("could not listen on ", options_.listen_address, " (in use or invalid?)"));
  }
  {
    absl::MutexLock lock(&shutdown_mu_);
    service_ = std::move(service);
    server_ = std::move(server);
    port_ = port;
    if (shut_down_) {
      service_->Shutdown();
      server_->Shutdown(Clock::now());
      return absl::CancelledError("the worker was shut down before it started");
    }
  }

  absl::Status registered = Register(options_.register_timeout);
  if (!registered.ok()) {
    Shutdown();
    return registered;
  }
  if (options_.reregister_after > std::chrono::milliseconds(0)) {
    keep_registered_ = std::thread([this] { KeepRegistered(); });
  }
  return absl::OkStatus();
}

void Worker::KeepRegistered() {
  const absl::Duration quiet = absl::FromChrono(options_.reregister_after);
  absl::Time last_registered = absl::Now();
  while (!shutdown_requested_.WaitForNotificationWithTimeout(
      std::min(quiet / 4, absl::Milliseconds(500)))) {
    const absl::Time heard = std::max(service_->last_ping(), last_registered);
    if (absl::Now() - heard < quiet) continue;
    // The coordinator forgot this worker (it restarted, or dropped it during a pause).
    const absl::Status s = Register(std::chrono::milliseconds(2000));
    last_registered = absl::Now();
    Log(s.ok() ? LogLevel::kInfo : LogLevel::kWarning, kComponent,
        absl::StrFormat("no ping for %.1f s; registered again: %s",
                        absl::ToDoubleSeconds(absl::Now() - heard), s.ok() ? "ok" : s.ToString()),
        {{"worker", address()}});
  }
}

absl::Status Worker::Register(std::chrono::milliseconds timeout) {
  v1::RegisterRequest request;
  request.set_address(address());
  request.set_backend(backend_name_);
  request.set_device(device_name_);
  request.set_pid(static_cast<int64_t>(getpid()));
  request.set_transport(transport_);
  if (options_.shared_memory) request.set_host_id(HostId());

  const auto deadline = Clock::now() + timeout;
  auto backoff = std::chrono::duration_cast<std::chrono::milliseconds>(kInitialBackoff);
  grpc::Status last;
  int attempts = 0;
  while (true) {
    const auto now = Clock::now();
    if (now >= deadline && attempts > 0) break;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::min<Clock::time_point>(deadline, now + kRegisterAttemptTimeout));
    // Wait for the channel to connect within the attempt rather than failing at once.
    ctx.set_wait_for_ready(true);
    v1::RegisterResponse response;
    last = coordinator_->Register(&ctx, request, &response);
    ++attempts;
    if (last.ok()) {
      absl::MutexLock lock(&id_mu_);
      worker_id_ = response.worker_id();
      return absl::OkStatus();
    }
    if (!Retryable(last.error_code())) {
      return absl::Status(FromGrpcStatus(last).code(),
                          absl::StrCat("the coordinator at ", options_.coordinator_address,
                                       " refused to register this worker: ", last.error_message()));
    }
    if (Clock::now() + backoff >= deadline) break;
    if (shutdown_requested_.WaitForNotificationWithTimeout(absl::FromChrono(backoff))) {
      return absl::CancelledError("the worker was shut down while registering");
    }
    backoff = std::min<std::chrono::milliseconds>(backoff * 2, kMaxBackoff);
  }
  if (shutdown_requested_.HasBeenNotified()) {
    return absl::CancelledError("the worker was shut down while registering");
  }
  return absl::DeadlineExceededError(
      absl::StrCat("could not register with the coordinator at ", options_.coordinator_address,
                   " within ", std::chrono::duration<double>(timeout).count(),
                   " s (", attempts, " attempt(s)); last error: ", last.error_message()));
}

void Worker::Shutdown() {
  absl::MutexLock lock(&shutdown_mu_);
  if (shut_down_) return;
  shut_down_ = true;
  shutdown_requested_.Notify();
  // The ring first, so that a shard in flight fails at once instead of holding the server up.
  if (service_ != nullptr) service_->Shutdown();
  if (server_ != nullptr) server_->Shutdown(Clock::now() + kShutdownGrace);
}

void Worker::Wait() {
  grpc::Server* server;
  {
    absl::MutexLock lock(&shutdown_mu_);
    server = server_.get();
  }
  if (server != nullptr) server->Wait();
  if (shutdown_requested_.HasBeenNotified() && keep_registered_.joinable()) {
    keep_registered_.join();
  }
}

absl::Status RunWorkerMain(const Worker::Options& options) {
  // The handlers only write the signal number to a pipe; a thread of ours reads it and shuts
  // the worker down. Unlike a blocked mask this works whatever threads already exist.
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    const absl::Status s = absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
    LogError(kComponent, s.ToString());
    return s;
  }
  g_signal_pipe = fds[1];
  struct sigaction action = {};
  action.sa_handler = OnShutdownSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  struct sigaction previous_int, previous_term;
  sigaction(SIGINT, &action, &previous_int);
  sigaction(SIGTERM, &action, &previous_term);

  absl::Status result;
  {
    Worker worker(options);
    std::atomic<int> received{0};
    std::thread signal_thread([&] {
      unsigned char sig = 0;
      ssize_t n;
      do {
        n = read(fds[0], &sig, 1);
      } while (n < 0 && errno == EINTR);
      if (n == 1 && sig != 0) received.store(sig);
      worker.Shutdown();
    });

    const absl::Status status = worker.BuildAndStart();
    if (status.ok()) {
      LogInfo(kComponent,
              absl::StrCat("serving on ", worker.address(), " (kernel ", worker.backend_name(),
                           " on ", worker.device_name(), "), registered with ",
                           options.coordinator_address, " as ", worker.worker_id()),
              {{"worker", worker.address()}, {"worker_id", worker.worker_id()}});
      worker.Wait();  // until the signal thread shuts the worker down
    } else if (received.load() == 0) {
      LogError(kComponent, absl::StrCat("cannot start: ", status.ToString()));
      result = status;
    }
    // A zero byte wakes the signal thread when no signal came.
    const unsigned char wake = 0;
    while (write(fds[1], &wake, 1) < 0 && errno == EINTR) {
    }
    signal_thread.join();
    if (received.load() != 0) {
      LogInfo(kComponent, absl::StrCat(strsignal(received.load()), " received, shut down"),
              {{"worker", worker.address()}});
    }
  }
  sigaction(SIGINT, &previous_int, nullptr);
  sigaction(SIGTERM, &previous_term, nullptr);
  g_signal_pipe = -1;
  close(fds[0]);
  close(fds[1]);
  return result;
}

}  // namespace ringattn
