// The `ringattn` command line. This file only turns flags into options; the work is in the
// libraries. Which command takes which flag, and which flags environment variables set, is the
// table in CommandLineSpecOf (cli/command_line.h parses against it).
//
//   ringattn serve [--workers 3] [--demo]     coordinator + local workers (the embedded default)
//   ringattn coordinator [--workers N]        coordinator only; workers register from elsewhere
//   ringattn worker --coordinator host:port   one worker process
//   ringattn attend --target host:port        send a request (random or .npy inputs)
//   ringattn bench --target host:port         load generator: one request, many times
//   ringattn ring [--world 4]                 forward ring over local processes, no service
//   ringattn help [command], ringattn <command> --help, ringattn --version
#include <grpc/support/log.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "cli/attend_command.h"
#include "cli/bench_command.h"
#include "cli/cli_parse.h"
#include "cli/command_line.h"
#include "cli/exit_codes.h"
#include "cli/local_ring.h"
#include "cli/serve_command.h"
#include "proto/cluster_auth.h"
#include "ringattn_config.h"
#include "ringattn_version.h"
#include "worker/worker.h"

// The attention problem (ring, attend, bench, serve --demo).
ABSL_FLAG(int, batch, 1, "batch size");
ABSL_FLAG(int64_t, seqlen, 4096, "sequence length (whole sequence, before sharding)");
ABSL_FLAG(int, heads, 8, "query heads");
ABSL_FLAG(int, heads_k, 0, "key/value heads (GQA); 0 means equal to --heads");
ABSL_FLAG(int, head_dim, 64, "head dimension: 64, 128 or 256");
ABSL_FLAG(std::string, dtype, "bf16", "input dtype: fp32, fp16 or bf16");
ABSL_FLAG(std::string, layout, "auto", "auto, contiguous, zigzag or stripe");
ABSL_FLAG(bool, causal, false, "causal mask");
ABSL_FLAG(int64_t, window_left, -1, "sliding window, keys allowed to the left (-1: unbounded)");
ABSL_FLAG(int64_t, window_right, -1, "sliding window, keys allowed to the right (-1: unbounded)");
ABSL_FLAG(bool, alibi, false, "ALiBi with the standard slopes 2^(-8 i / heads)");
ABSL_FLAG(double, softcap, 0.0, "score soft-capping (0 disables)");
ABSL_FLAG(double, softmax_scale, 0.0, "softmax scale (0: 1/sqrt(head_dim))");
ABSL_FLAG(double, dropout_p, 0.0, "dropout probability in [0, 1) (CPU kernels)");
ABSL_FLAG(uint64_t, dropout_seed, 0, "dropout mask seed");
ABSL_FLAG(std::string, cu_seqlens, "",
          "packed variable-length sequences, boundaries 0,...,seqlen (CPU kernels)");
ABSL_FLAG(uint64_t, seed, 1, "seed of the synthetic inputs");
ABSL_FLAG(bool, check, true, "compare the result with the fp64 reference computed here");
ABSL_FLAG(double, timeout, 300,
          "seconds for the whole request, connecting included (bench: each call; ring: before "
          "ranks are killed)");

// ring
ABSL_FLAG(int, world, 4, "ranks (worker processes)");

// serve, coordinator, worker
ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "the public API's listen address");
ABSL_FLAG(std::string, internal_listen, "",
          "the internal plane's address, where workers register (serve: a free loopback port "
          "when empty; coordinator: required)");
ABSL_FLAG(std::string, cluster_secret_file, "",
          "file whose first line is the internal plane's secret (else RINGATTN_CLUSTER_SECRET; "
          "serve generates one for its local workers)");
ABSL_FLAG(std::string, worker_listen, "127.0.0.1:0", "listen address (port 0: any)");
ABSL_FLAG(std::string, metrics, "127.0.0.1:9464",
          "/metrics address ('' off); worker: its own /metrics, off unless given (another "
          "port than the coordinator's)");
ABSL_FLAG(std::string, health_listen, "",
          "also serve grpc.health.v1 alone, in plaintext, here (for probes that cannot speak "
          "TLS, e.g. Kubernetes' gRPC probe); '' off");
ABSL_FLAG(int, workers, 3, "workers in the ring");
ABSL_FLAG(std::string, kernel, "auto",
          "serve/worker: auto (cuda with a GPU, else cpu), cpu, cpu_reference, cuda, "
          "cuda_reference, cudnn; ring: cpu or cpu_reference");
ABSL_FLAG(int, device, 0, "GPU index (modulo the number of GPUs)");
ABSL_FLAG(bool, demo, false, "answer one sample request (the problem flags), print it and stop");
ABSL_FLAG(int, max_queue, 16, "admitted requests that may wait");
ABSL_FLAG(int, pipeline_depth, 3,
          "requests on the ring at once: above 1 the next requests' transfers overlap the "
          "current one's compute (the ring passes stay one at a time); 1: none. worker: the "
          "calls it stages at once (give it the coordinator's)");
ABSL_FLAG(int64_t, max_queued_bytes, int64_t{8} << 30,
          "request bytes the service holds at once (being received, queued or running); more "
          "are RESOURCE_EXHAUSTED (0: no bound)");
ABSL_FLAG(double, max_client_share, 0.5,
          "the part of --max_queue and --max_queued_bytes one client may take (at least one "
          "request), so that one client cannot crowd out the others");
ABSL_FLAG(std::string, api_tokens_file, "",
          "require a bearer token on every public call (health excepted): a file of '<token> "
          "<client name>' lines; the name is the client's identity");
ABSL_FLAG(std::string, tls_cert, "",
          "serve/coordinator: the public API's TLS certificate chain (PEM); attend/bench: the "
          "client certificate for mTLS");
ABSL_FLAG(std::string, tls_key, "",
          "serve/coordinator: the key of --tls_cert (PEM); attend/bench: the client key");
ABSL_FLAG(std::string, tls_client_ca, "",
          "mTLS: clients must present a certificate this CA (PEM) signed");
ABSL_FLAG(std::string, internal_tls_cert, "",
          "TLS on the internal plane: this process's certificate (PEM, with the DNS name "
          "ringattn-internal), with --internal_tls_key and --internal_tls_ca (the CA of every "
          "internal certificate); serve passes them to its workers");
ABSL_FLAG(std::string, internal_tls_key, "", "key of --internal_tls_cert");
ABSL_FLAG(std::string, internal_tls_ca, "", "CA that signed every internal certificate");
ABSL_FLAG(double, max_request_seconds, 600,
          "the longest a request may take from arrival, whatever deadline its client set (or "
          "none)");
ABSL_FLAG(double, stream_idle_seconds, 60,
          "a streaming call whose client neither sends nor reads for this long is cancelled");
ABSL_FLAG(double, drain_seconds, 30,
          "on SIGTERM, how long admitted requests get to finish before the workers stop (new "
          "ones are refused meanwhile)");
ABSL_FLAG(int64_t, max_unary_bytes, int64_t{1} << 30, "unary message limit");
ABSL_FLAG(int64_t, max_request_bytes, int64_t{4} << 30, "request limit");
ABSL_FLAG(std::string, coordinator, "", "the coordinator's internal plane, host:port (required)");
ABSL_FLAG(bool, exit_with_parent, false,
          "exit when the process that started it exits (local workers)");
ABSL_FLAG(std::string, advertise_host, "127.0.0.1", "host others reach this worker at");
ABSL_FLAG(bool, shared_memory, true,
          "serve/coordinator: accept same-host clients' system shared memory; worker: read and "
          "write it itself (false where the worker does not share the coordinator's /dev/shm)");
ABSL_FLAG(std::string, log_format, "text",
          "log lines on stderr as text or json (one object per line)");
ABSL_FLAG(std::string, log_level, "info", "the least level logged: debug, info, warning, error");

// attend, bench
ABSL_FLAG(std::string, target, "127.0.0.1:50051", "the coordinator's host:port");
ABSL_FLAG(bool, tls, false, "TLS, verifying the server against the system's roots");
ABSL_FLAG(std::string, tls_ca, "", "TLS, verifying the server's certificate against this CA (PEM)");
ABSL_FLAG(std::string, tls_server_name, "",
          "the name the server's certificate must carry (default: --target's host)");
ABSL_FLAG(std::string, token_file, "",
          "file whose first line is the bearer token sent on every call (else RINGATTN_TOKEN)");
ABSL_FLAG(int, connections, 4,
          "connections to the service: a request over 64 MiB is cut by K/V heads into that many "
          "parts sent at once (one gRPC connection moves about 1 GB/s); 1: one call");
ABSL_FLAG(std::string, q_npy, "", "q from a .npy file [batch, seq, heads, head_dim]");
ABSL_FLAG(std::string, k_npy, "", "k from a .npy file");
ABSL_FLAG(std::string, v_npy, "", "v from a .npy file");
ABSL_FLAG(std::string, out_npy, "", "write the output here");
ABSL_FLAG(std::string, grads_npy_prefix, "",
          "with --backward: write the gradients to <prefix>dq.npy, <prefix>dk.npy, "
          "<prefix>dv.npy");
ABSL_FLAG(bool, stream, false, "force the streaming RPC");
ABSL_FLAG(bool, shm, false,
          "send the tensors through system shared memory (POSIX shm regions this process "
          "creates and registers with the service, which must run on this host): unary calls "
          "only, not with --stream; the timings add the copies into and out of the regions "
          "(shm_in, shm_out)");
ABSL_FLAG(bool, cuda_shm, false,
          "send the tensors through CUDA shared memory (a GPU allocation of this process on "
          "device 0, exported by CUDA IPC; the workers must be GPU workers on this host); as "
          "--shm otherwise");
ABSL_FLAG(bool, shm_resident, false,
          "with --shm: the tensors live in the regions (inputs copied in once before the load, "
          "outputs left there): the latency is the service's alone");
ABSL_FLAG(int64_t, chunk_bytes, int64_t{4} << 20, "streaming chunk size");
ABSL_FLAG(bool, return_lse, true, "ask for the log-sum-exp too");
ABSL_FLAG(bool, backward, false,
          "attend: also take the gradients (AttendBackward with a synthetic dout; with --check, "
          "against the fp64 reference backward); bench: drive AttendBackward instead of Attend");

// bench
ABSL_FLAG(int, concurrency, 4, "client threads, one call in flight each");
ABSL_FLAG(int, warmup, 0,
          "bench: calls each thread makes before the clock starts (not counted; their slowest "
          "round trip is printed apart)");
ABSL_FLAG(int, requests, 32, "calls in all (when --duration is 0)");
ABSL_FLAG(double, duration, 0, "seconds to keep sending (0: --requests calls)");
ABSL_FLAG(std::string, json, "", "also write the results here as JSON");

namespace {

using ringattn::CommandSpec;
using ringattn::kExitCannotListen;
using ringattn::kExitFailure;
using ringattn::kExitOk;
using ringattn::kExitUnavailable;
using ringattn::kExitUsage;
using Flags = std::vector<std::string>;

Flags Join(std::initializer_list<Flags> parts) {
  Flags out;
  for (const Flags& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

// The flag groups the commands share.
const Flags kShape = {"batch", "seqlen", "heads",  "heads_k", "head_dim",
                      "dtype", "layout", "causal", "seed"};
const Flags kOptions = {"window_left",   "window_right", "alibi",        "softcap",
                        "softmax_scale", "dropout_p",    "dropout_seed", "cu_seqlens"};
const Flags kClient = {"target",   "tls",     "tls_ca",     "tls_server_name",
                       "tls_cert", "tls_key", "token_file", "connections"};
const Flags kTransfer = {"stream", "shm", "cuda_shm"};
const Flags kLog = {"log_format", "log_level"};
const Flags kCoordinator = {"listen",
                            "internal_listen",
                            "metrics",
                            "health_listen",
                            "workers",
                            "cluster_secret_file",
                            "max_queue",
                            "pipeline_depth",
                            "max_queued_bytes",
                            "max_client_share",
                            "max_request_seconds",
                            "stream_idle_seconds",
                            "drain_seconds",
                            "max_unary_bytes",
                            "max_request_bytes",
                            "api_tokens_file",
                            "tls_cert",
                            "tls_key",
                            "tls_client_ca",
                            "internal_tls_cert",
                            "internal_tls_key",
                            "internal_tls_ca",
                            "shared_memory"};
// serve --demo's sample request: the attend flags a client on the same host needs.
const Flags kDemo =
    Join({kShape,
          kOptions,
          {"check", "timeout", "return_lse", "chunk_bytes", "backward", "tls_ca", "token_file"},
          kTransfer});

const ringattn::CommandLineSpec& Spec() {
  static const ringattn::CommandLineSpec* const spec = [] {
    auto* s = new ringattn::CommandLineSpec;
    const Flags serve_env = Join({kCoordinator, {"kernel"}, kLog});
    const Flags worker =
        Join({{"coordinator", "worker_listen", "advertise_host", "kernel", "device",
               "cluster_secret_file", "internal_tls_cert", "internal_tls_key", "internal_tls_ca",
               "shared_memory", "exit_with_parent", "pipeline_depth"},
              kLog});
    // --metrics by flag only: serve's local workers inherit its environment, where
    // RINGATTN_METRICS names the coordinator's port.
    const Flags worker_flags = Join({worker, {"metrics"}});
    s->commands = {
        {"serve", "coordinator + local worker processes (CPU + Gloo without a GPU)",
         "The coordinator and --workers local `ringattn worker` processes, restarted when they "
         "exit; serves until SIGTERM or SIGINT, then drains. --demo: answer one sample request "
         "(the problem flags, which need --demo), print it and stop.\n",
         Join({serve_env, {"demo"}, kDemo}), serve_env},
        {"coordinator", "the coordinator alone; workers register from elsewhere",
         "The coordinator alone: --workers workers register on --internal_listen with the "
         "cluster secret (docs/running.md, \"Across machines\").\n",
         Join({kCoordinator, kLog}), Join({kCoordinator, kLog})},
        {"worker", "one worker process (--coordinator host:port)",
         "One worker: registers with the coordinator's internal plane and runs its shards.\n",
         worker_flags, worker},
        {"attend",
         "send a request to a coordinator and print the result and timings",
         "Sends one request (synthetic, or --q_npy/--k_npy/--v_npy) and prints the output's "
         "summary and the timings; --check compares it with the fp64 reference; --backward "
         "takes the gradients too.\n",
         Join({kClient,
               kShape,
               kOptions,
               {"check", "timeout", "q_npy", "k_npy", "v_npy", "out_npy", "grads_npy_prefix",
                "return_lse", "chunk_bytes", "backward"},
               kTransfer}),
         {}},
        {"bench",
         "load generator: one synthetic request many times; latency and throughput",
         "Sends one synthetic request from --concurrency threads, --requests times (or for "
         "--duration seconds), and reports latency percentiles, throughput and the server's "
         "phases.\n",
         Join({kClient,
               kShape,
               {"timeout", "backward", "shm_resident", "concurrency", "requests", "warmup",
                "duration", "json"},
               kTransfer}),
         {}},
        {"ring",
         "forward ring attention over local processes, without the service",
         "Forks --world processes that run the ring over Gloo on loopback, gathers on rank 0 "
         "and compares with one process's run (and the fp64 reference when small).\n",
         Join({{"world", "kernel"}, kShape, kOptions, {"check", "timeout"}}),
         {}},
    };
    s->epilogue =
        "exit codes: 0 ok, 1 other failure, 2 usage, 3 unavailable or deadline exceeded, 4 a "
        "call failed otherwise, 5 check failed, 6 cannot listen (docs/running.md)\n";
    return s;
  }();
  return *spec;
}

std::string VersionText() {
  const std::string git = RINGATTN_GIT_DESCRIBE;
  return absl::StrCat(
      "ringattn ", RINGATTN_VERSION, git.empty() ? "" : " (git " + git + ")",
      "\nbuild: ", RINGATTN_BUILD_TYPE, "; CUDA ", RINGATTN_HAVE_CUDA ? "yes" : "no", ", NCCL ",
      RINGATTN_HAVE_NCCL ? "yes" : "no", ", cuDNN ", RINGATTN_HAVE_CUDNN ? "yes" : "no", "\n");
}

// gRPC's own log lines, through ours (component "grpc").
void LogFromGrpc(gpr_log_func_args* args) {
  const ringattn::LogLevel level =
      args->severity == GPR_LOG_SEVERITY_ERROR  ? ringattn::LogLevel::kError
      : args->severity == GPR_LOG_SEVERITY_INFO ? ringattn::LogLevel::kInfo
                                                : ringattn::LogLevel::kDebug;
  ringattn::Log(level, "grpc", args->message,
                {{"source", absl::StrCat(args->file, ":", args->line)}});
}

// --log_format and --log_level into the log; gRPC's lines join it. False (printed) when either
// is invalid.
bool ConfigureLogFromFlags() {
  absl::StatusOr<ringattn::LogFormat> format =
      ringattn::ParseLogFormat(absl::GetFlag(FLAGS_log_format));
  absl::StatusOr<ringattn::LogLevel> level =
      ringattn::ParseLogLevel(absl::GetFlag(FLAGS_log_level));
  for (const absl::Status& s : {format.status(), level.status()}) {
    if (!s.ok()) {
      std::cerr << "ringattn: " << s.message() << "\n";
      return false;
    }
  }
  ringattn::ConfigureLog(*format, *level);
  gpr_set_log_function(LogFromGrpc);
  return true;
}

std::vector<float> StandardAlibiSlopes(int heads) {
  std::vector<float> s(heads);
  for (int i = 0; i < heads; ++i) s[i] = std::pow(2.0f, -8.0f * (i + 1) / heads);
  return s;
}

int HeadsK() {
  return absl::GetFlag(FLAGS_heads_k) > 0 ? absl::GetFlag(FLAGS_heads_k)
                                          : absl::GetFlag(FLAGS_heads);
}

std::string SelfBinary() {
  char buf[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  return std::string(buf, static_cast<size_t>(n));
}

// A usage error, the way every command prints it.
int UsageError(absl::string_view message) {
  std::cerr << "ringattn: " << message << "\n";
  return kExitUsage;
}

int RunRing() {
  ringattn::LocalRingOptions o;
  o.world = absl::GetFlag(FLAGS_world);
  o.batch = absl::GetFlag(FLAGS_batch);
  o.seqlen = absl::GetFlag(FLAGS_seqlen);
  o.heads = absl::GetFlag(FLAGS_heads);
  o.heads_k = HeadsK();
  o.head_dim = absl::GetFlag(FLAGS_head_dim);
  absl::StatusOr<ringattn::DType> dtype = ringattn::ParseDTypeName(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok()) return UsageError(dtype.status().message());
  o.dtype = *dtype;
  o.layout = absl::GetFlag(FLAGS_layout);
  o.attention.causal = absl::GetFlag(FLAGS_causal);
  o.attention.window_size = {absl::GetFlag(FLAGS_window_left), absl::GetFlag(FLAGS_window_right)};
  if (absl::GetFlag(FLAGS_alibi)) o.attention.alibi_slopes = StandardAlibiSlopes(o.heads);
  o.attention.softcap = static_cast<float>(absl::GetFlag(FLAGS_softcap));
  if (absl::GetFlag(FLAGS_softmax_scale) > 0) {
    o.attention.softmax_scale = static_cast<float>(absl::GetFlag(FLAGS_softmax_scale));
  }
  o.attention.dropout_p = static_cast<float>(absl::GetFlag(FLAGS_dropout_p));
  o.attention.dropout_seed = absl::GetFlag(FLAGS_dropout_seed);
  absl::StatusOr<std::vector<int64_t>> cu_seqlens =
      ringattn::ParseCuSeqlens(absl::GetFlag(FLAGS_cu_seqlens));
  if (!cu_seqlens.ok()) return UsageError(cu_seqlens.status().message());
  o.attention.seq_bounds = *std::move(cu_seqlens);
  // The local ring is a CPU tool: auto means the fast CPU kernel.
  o.backend =
      absl::GetFlag(FLAGS_kernel) == "auto" ? std::string("cpu") : absl::GetFlag(FLAGS_kernel);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.check = absl::GetFlag(FLAGS_check);
  o.timeout_seconds = absl::GetFlag(FLAGS_timeout);
  return ringattn::RunLocalRing(o, std::cout);
}

// The client's TLS and token flags. `client_cert`: --tls_cert and --tls_key are the client's
// (attend, bench), not the server's (serve --demo).
absl::StatusOr<ringattn::ClientCredentials> ClientCredentialsFromFlags(bool client_cert) {
  ringattn::ClientCredentials c;
  c.tls = absl::GetFlag(FLAGS_tls);
  c.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  c.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  if (client_cert) {
    c.tls_cert = absl::GetFlag(FLAGS_tls_cert);
    c.tls_key = absl::GetFlag(FLAGS_tls_key);
  }
  RA_ASSIGN_OR_RETURN(c.token, ringattn::LoadBearerToken(absl::GetFlag(FLAGS_token_file)));
  return c;
}

absl::StatusOr<ringattn::AttendCommandOptions> AttendOptionsFromFlags(bool client_cert = true) {
  ringattn::AttendCommandOptions o;
  o.target = absl::GetFlag(FLAGS_target);
  RA_ASSIGN_OR_RETURN(o.credentials, ClientCredentialsFromFlags(client_cert));
  o.connections = std::max(1, absl::GetFlag(FLAGS_connections));
  o.batch = absl::GetFlag(FLAGS_batch);
  o.seqlen = absl::GetFlag(FLAGS_seqlen);
  o.heads = absl::GetFlag(FLAGS_heads);
  o.heads_k = HeadsK();
  o.head_dim = absl::GetFlag(FLAGS_head_dim);
  o.dtype = absl::GetFlag(FLAGS_dtype);
  o.causal = absl::GetFlag(FLAGS_causal);
  o.window_left = absl::GetFlag(FLAGS_window_left);
  o.window_right = absl::GetFlag(FLAGS_window_right);
  o.alibi = absl::GetFlag(FLAGS_alibi);
  o.softcap = static_cast<float>(absl::GetFlag(FLAGS_softcap));
  o.softmax_scale = static_cast<float>(absl::GetFlag(FLAGS_softmax_scale));
  o.layout = absl::GetFlag(FLAGS_layout);
  o.q_npy = absl::GetFlag(FLAGS_q_npy);
  o.k_npy = absl::GetFlag(FLAGS_k_npy);
  o.v_npy = absl::GetFlag(FLAGS_v_npy);
  o.out_npy = absl::GetFlag(FLAGS_out_npy);
  o.grads_npy_prefix = absl::GetFlag(FLAGS_grads_npy_prefix);
  o.dropout_p = static_cast<float>(absl::GetFlag(FLAGS_dropout_p));
  o.dropout_seed = absl::GetFlag(FLAGS_dropout_seed);
  RA_ASSIGN_OR_RETURN(o.cu_seqlens, ringattn::ParseCuSeqlens(absl::GetFlag(FLAGS_cu_seqlens)));
  o.check = absl::GetFlag(FLAGS_check);
  o.streaming = absl::GetFlag(FLAGS_stream);
  o.shm = absl::GetFlag(FLAGS_shm) || absl::GetFlag(FLAGS_cuda_shm);
  o.cuda_shm = absl::GetFlag(FLAGS_cuda_shm);
  o.chunk_bytes = absl::GetFlag(FLAGS_chunk_bytes);
  o.timeout_seconds = absl::GetFlag(FLAGS_timeout);
  // Connecting is part of the request's time.
  o.connect_timeout_seconds = std::min(o.connect_timeout_seconds, o.timeout_seconds);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.return_lse = absl::GetFlag(FLAGS_return_lse);
  o.backward = absl::GetFlag(FLAGS_backward);
  return o;
}

absl::StatusOr<ringattn::BenchOptions> BenchOptionsFromFlags() {
  ringattn::BenchOptions o;
  o.target = absl::GetFlag(FLAGS_target);
  RA_ASSIGN_OR_RETURN(o.credentials, ClientCredentialsFromFlags(/*client_cert=*/true));
  o.connections = std::max(1, absl::GetFlag(FLAGS_connections));
  o.concurrency = absl::GetFlag(FLAGS_concurrency);
  o.warmup = absl::GetFlag(FLAGS_warmup);
  o.requests = absl::GetFlag(FLAGS_requests);
  o.duration_seconds = absl::GetFlag(FLAGS_duration);
  o.batch = absl::GetFlag(FLAGS_batch);
  o.seqlen = absl::GetFlag(FLAGS_seqlen);
  o.heads = absl::GetFlag(FLAGS_heads);
  o.heads_k = HeadsK();
  o.head_dim = absl::GetFlag(FLAGS_head_dim);
  o.dtype = absl::GetFlag(FLAGS_dtype);
  o.causal = absl::GetFlag(FLAGS_causal);
  o.layout = absl::GetFlag(FLAGS_layout);
  o.streaming = absl::GetFlag(FLAGS_stream);
  o.shm = absl::GetFlag(FLAGS_shm) || absl::GetFlag(FLAGS_cuda_shm);
  o.cuda_shm = absl::GetFlag(FLAGS_cuda_shm);
  o.shm_resident = absl::GetFlag(FLAGS_shm_resident);
  o.backward = absl::GetFlag(FLAGS_backward);
  o.timeout_seconds = absl::GetFlag(FLAGS_timeout);
  o.connect_timeout_seconds = std::min(o.connect_timeout_seconds, o.timeout_seconds);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.json_path = absl::GetFlag(FLAGS_json);
  return o;
}

ringattn::TlsFiles InternalTlsFromFlags() {
  return {absl::GetFlag(FLAGS_internal_tls_cert), absl::GetFlag(FLAGS_internal_tls_key),
          absl::GetFlag(FLAGS_internal_tls_ca)};
}

// `given`: the flags the command line and the environment set.
int RunServeOrCoordinator(bool spawn_workers, const std::vector<std::string>& given) {
  if (spawn_workers && !absl::GetFlag(FLAGS_demo)) {
    for (const std::string& flag : given) {
      if (std::find(kDemo.begin(), kDemo.end(), flag) != kDemo.end()) {
        return UsageError(absl::StrCat("--", flag,
                                       " is a flag of serve --demo's sample request: add --demo "
                                       "or leave it out"));
      }
    }
  }
  ringattn::ServeOptions o;
  o.listen_address = absl::GetFlag(FLAGS_listen);
  o.internal_listen_address = absl::GetFlag(FLAGS_internal_listen);
  if (!spawn_workers && o.internal_listen_address.empty()) {
    return UsageError(
        "coordinator: --internal_listen host:port is required (workers register "
        "there)");
  }
  absl::StatusOr<ringattn::ClusterSecret> secret =
      ringattn::ClusterSecret::FromFileOrEnvironment(absl::GetFlag(FLAGS_cluster_secret_file));
  if (secret.ok()) {
    o.cluster_secret = secret->value();
  } else if (!absl::IsNotFound(secret.status()) || !spawn_workers) {
    return UsageError(secret.status().message());  // remote workers need to know it
  }
  o.metrics_address = absl::GetFlag(FLAGS_metrics);
  o.health_listen_address = absl::GetFlag(FLAGS_health_listen);
  o.workers = absl::GetFlag(FLAGS_workers);
  o.spawn_workers = spawn_workers;
  o.kernel = absl::GetFlag(FLAGS_kernel);
  o.binary = SelfBinary();
  o.max_queue = static_cast<size_t>(std::max(1, absl::GetFlag(FLAGS_max_queue)));
  o.pipeline_depth = std::max(1, absl::GetFlag(FLAGS_pipeline_depth));
  o.max_queued_bytes = absl::GetFlag(FLAGS_max_queued_bytes);
  o.max_client_share = absl::GetFlag(FLAGS_max_client_share);
  if (!(o.max_client_share > 0 && o.max_client_share <= 1)) {
    return UsageError(
        absl::StrCat("--max_client_share must be in (0, 1], got ", o.max_client_share));
  }
  o.tls = {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
           absl::GetFlag(FLAGS_tls_client_ca)};
  o.internal_tls = InternalTlsFromFlags();
  o.api_tokens_file = absl::GetFlag(FLAGS_api_tokens_file);
  o.max_unary_bytes = absl::GetFlag(FLAGS_max_unary_bytes);
  o.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  o.shared_memory = absl::GetFlag(FLAGS_shared_memory);
  o.drain_seconds = std::max(0.0, absl::GetFlag(FLAGS_drain_seconds));
  o.max_request_seconds = std::max(0.001, absl::GetFlag(FLAGS_max_request_seconds));
  o.stream_idle_seconds = std::max(0.001, absl::GetFlag(FLAGS_stream_idle_seconds));
  o.demo = spawn_workers && absl::GetFlag(FLAGS_demo);
  if (o.demo) {
    absl::StatusOr<ringattn::AttendCommandOptions> demo =
        AttendOptionsFromFlags(/*client_cert=*/false);
    if (!demo.ok()) return UsageError(demo.status().message());
    o.demo_request = *std::move(demo);
  }
  return ringattn::RunServe(o, std::cout);
}

int RunWorker() {
  if (absl::GetFlag(FLAGS_exit_with_parent)) {
    // A local worker must not outlive its coordinator (nor hold its parent's output pipes).
    const pid_t parent = getppid();
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) return kExitOk;
  }
  ringattn::Worker::Options o;
  o.coordinator_address = absl::GetFlag(FLAGS_coordinator);
  if (o.coordinator_address.empty()) {
    return UsageError("worker: --coordinator host:port is required");
  }
  o.listen_address = absl::GetFlag(FLAGS_worker_listen);
  o.kernel = absl::GetFlag(FLAGS_kernel);
  o.device = absl::GetFlag(FLAGS_device);
  o.advertise_host = absl::GetFlag(FLAGS_advertise_host);
  o.shared_memory = absl::GetFlag(FLAGS_shared_memory);
  o.pipeline_depth = std::max(1, absl::GetFlag(FLAGS_pipeline_depth));
  absl::StatusOr<ringattn::ClusterSecret> secret =
      ringattn::ClusterSecret::FromFileOrEnvironment(absl::GetFlag(FLAGS_cluster_secret_file));
  if (!secret.ok()) return UsageError(absl::StrCat("worker: ", secret.status().message()));
  o.cluster_secret = secret->value();
  o.internal_tls = InternalTlsFromFlags();
  // The flag's default is the coordinator's address: a worker serves metrics only when asked.
  if (absl::GetFlag(FLAGS_metrics) != absl::GetFlagReflectionHandle(FLAGS_metrics).DefaultValue()) {
    o.metrics_address = absl::GetFlag(FLAGS_metrics);
  }
  const absl::Status s = ringattn::RunWorkerMain(o);
  if (s.ok()) return kExitOk;
  // UNAVAILABLE: the listen address; DEADLINE_EXCEEDED: no coordinator answered in time.
  if (absl::IsUnavailable(s)) return kExitCannotListen;
  return absl::IsDeadlineExceeded(s) ? kExitUnavailable : kExitFailure;
}

}  // namespace

int main(int argc, char** argv) {
  const ringattn::CommandLineSpec& spec = Spec();
  absl::StatusOr<ringattn::CommandLine> line =
      ringattn::ParseCommandLine(spec, std::vector<std::string>(argv, argv + argc), std::getenv);
  if (!line.ok()) {
    std::cerr << (argc < 2 ? "" : "ringattn: ") << line.status().message()
              << (argc < 2 ? "" : "\n");
    return kExitUsage;
  }
  switch (line->action) {
    case ringattn::CommandLine::Action::kVersion:
      std::cout << VersionText();
      return kExitOk;
    case ringattn::CommandLine::Action::kHelpFull:
      std::cout << ringattn::AllFlagsHelp(spec);
      return kExitOk;
    case ringattn::CommandLine::Action::kHelp:
      std::cout << (line->command == nullptr ? ringattn::Overview(spec)
                                             : ringattn::CommandHelp(spec, *line->command));
      return kExitOk;
    case ringattn::CommandLine::Action::kRun:
      break;
  }
  const std::string& command = line->command->name;
  std::vector<std::string> given = line->from_command_line;
  given.insert(given.end(), line->from_environment.begin(), line->from_environment.end());
  if (command == "ring") return RunRing();
  if (!ConfigureLogFromFlags()) return kExitUsage;
  if (command == "serve") return RunServeOrCoordinator(/*spawn_workers=*/true, given);
  if (command == "coordinator") return RunServeOrCoordinator(/*spawn_workers=*/false, given);
  if (command == "worker") return RunWorker();
  if (command == "attend") {
    absl::StatusOr<ringattn::AttendCommandOptions> o = AttendOptionsFromFlags();
    if (!o.ok()) return UsageError(o.status().message());
    return ringattn::RunAttendCommand(*o, std::cout);
  }
  if (command == "bench") {
    absl::StatusOr<ringattn::BenchOptions> o = BenchOptionsFromFlags();
    if (!o.ok()) return UsageError(o.status().message());
    return ringattn::RunBenchCommand(*o, std::cout);
  }
  return UsageError(absl::StrCat("unknown command '", command, "'"));
}
