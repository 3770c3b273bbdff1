// Benchmark (not a test) of the cudnn backend's first-call tax: the wall time of the first call
// at a sequence length the backend has not met (graph build, and kernel compile where the
// graph mode needs one), against its steady state, in four graph modes:
//   static    every graph static, compiled for its sizes (RINGATTN_CUDNN_DYNAMIC=0);
//   dynamic   dynamic shapes, one kernel cache per class (the default);
//   prewarm   dynamic, after CudnnBackend::Prewarm (default classes; forward, and backward
//             unless --no-backward), whose time is reported;
//   background  static graphs with background builds (what the worker runs): the first call
//             runs our kernel while the graph builds on the backend's thread; the bench then
//             waits for the graph (WaitForGraphs) before the steady calls, which run cuDNN.
// Each mode runs in a fresh process (this program re-executes itself with --mode), so that
// no cuDNN state carries from one mode into the next.
//
// Per mode: one init call of another class (bf16 d64, seq 64: the handle, cuDNN's libraries),
// then for the forward and then the backward, unmasked and causal, for each length in turn:
//   first_ms   wall time of the first call (call + stream synchronize);
//   steady_ms  median wall time of --iters later calls;
//   kernel_ms  median time between two events around the call on its stream (cuDNN's kernel
//              and the backend's small epilogue/copy kernels): dynamic vs static is the cost
//              of dynamic-shape kernels;
//   graphs     graphs built by the first call (1, 0 when an earlier graph served; background:
//              built for it in the background).
// The backward's O and LSE come from a forward call at the same length (its graph already
// built by the forward pass). Shape: b 1, h 32, h_k 8, d 128, bf16 inputs and bf16 O.
//
// Output: a table per mode, a summary table over the modes (first-call ms of each, background
// included; kernel ms
// of static and dynamic and their ratio, with its geometric mean), and JSON lines in --json
// (one object per mode and per call row).
//
// Usage: cudnn_first_call_bench [--json PATH] [--iters N] [--lengths L1,L2,...]
//                               [--no-backward] [--mode static|dynamic|prewarm|background]
//   --json PATH    JSON lines (default cudnn_first_call_bench.jsonl)
//   --iters N      steady-state calls per length (default 5)
//   --lengths ...  sequence lengths (default 4096,5000,6000,7000,8191,12345,16384)
//   --no-backward  forward only
//   --mode M       run this mode alone, in this process, appending to --json
#include <cuda_runtime.h>
#include <cudnn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "bench/gpu_bench_util.cuh"
#include "bench/gpu_timing.h"
#include "kernels/attention_backward_params.h"
#include "kernels/attention_params.h"
#include "kernels/cudnn/cudnn_backend.h"
#include "kernels/params_check.h"

namespace ringattn {
namespace {

using bench::CheckStatus;
using bench::CurrentDevice;
using bench::DeviceMemory;
using bench::FillBf16;
using bench::Median;
using bench::SelfAttentionParams;

constexpr int kBatch = 1, kHeads = 32, kHeadsK = 8, kHeadDim = 128;
constexpr const char* kModes[] = {"static", "dynamic", "prewarm", "background"};

struct Options {
  std::string json = "cudnn_first_call_bench.jsonl";
  int iters = 5;
  std::vector<int64_t> lengths = {4096, 5000, 6000, 7000, 8191, 12345, 16384};
  bool backward = true;
  std::string mode;  // empty: every mode, each in a child process
};

// One row: a direction, mask and length in one mode.
struct Row {
  std::string mode, direction;
  bool causal = false;
  int64_t seqlen = 0;
  double first_ms = 0, steady_ms = 0, kernel_ms = 0;
  int64_t graphs = 0;
};

double NowMs() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The buffers of the longest call; shorter calls use their beginning.
struct Buffers {
  DeviceMemory q, k, v, o, lse, dout, dq, dk, dv;
  explicit Buffers(int64_t s)
      : q(s * kHeads * kHeadDim * 2),
        k(s * kHeadsK * kHeadDim * 2),
        v(s * kHeadsK * kHeadDim * 2),
        o(s * kHeads * kHeadDim * 2),
        lse(s * kHeads * sizeof(float)),
        dout(s * kHeads * kHeadDim * 2),
        dq(s * kHeads * kHeadDim * sizeof(float)),
        dk(s * kHeadsK * kHeadDim * sizeof(float)),
        dv(s * kHeadsK * kHeadDim * sizeof(float)) {}
};

AttentionParams ForwardCall(Buffers& b, int64_t seqlen, bool causal, int head_dim = kHeadDim,
                            int heads_k = kHeadsK) {
  AttentionParams p = SelfAttentionParams(kBatch, seqlen, kHeads, head_dim, causal);
  p.heads_k = heads_k;
  SetContiguousStrides(&p);
  p.q = b.q.ptr;
  p.k = b.k.ptr;
  p.v = b.v.ptr;
  p.o = b.o.ptr;
  p.lse = static_cast<float*>(b.lse.ptr);
  return p;
}

AttentionBackwardParams BackwardCall(Buffers& b, int64_t seqlen, bool causal) {
  AttentionBackwardParams p;
  p.fwd = ForwardCall(b, seqlen, causal);
  p.out = b.o.ptr;
  p.dout = b.dout.ptr;
  p.out_dtype = DType::kBF16;
  p.lse = static_cast<const float*>(b.lse.ptr);
  p.dq = static_cast<float*>(b.dq.ptr);
  p.dk = static_cast<float*>(b.dk.ptr);
  p.dv = static_cast<float*>(b.dv.ptr);
  SetContiguousBackwardStrides(&p);
  return p;
}

// Wall ms of `run` plus a synchronize of `stream`, and the ms between events around it.
template <typename Run>
std::pair<double, double> TimeCall(const Run& run, cudaStream_t stream, cudaEvent_t start,
                                   cudaEvent_t stop) {
  const double t0 = NowMs();
  BENCH_CUDA_CHECK(cudaEventRecord(start, stream));
  run();
  BENCH_CUDA_CHECK(cudaEventRecord(stop, stream));
  BENCH_CUDA_CHECK(cudaEventSynchronize(stop));
  const double wall = NowMs() - t0;
  float kernel = 0.0f;
  BENCH_CUDA_CHECK(cudaEventElapsedTime(&kernel, start, stop));
  return {wall, kernel};
}

void WriteRow(FILE* json, const Row& r) {
  std::fprintf(json,
               "{\"kind\":\"call\",\"mode\":\"%s\",\"direction\":\"%s\",\"causal\":%d,"
               "\"seqlen\":%lld,\"first_ms\":%.4f,\"steady_ms\":%.4f,\"kernel_ms\":%.4f,"
               "\"graphs\":%lld,\"batch\":%d,\"heads\":%d,\"heads_k\":%d,\"head_dim\":%d,"
               "\"dtype\":\"bf16\"}\n",
               r.mode.c_str(), r.direction.c_str(), r.causal ? 1 : 0,
               static_cast<long long>(r.seqlen), r.first_ms, r.steady_ms, r.kernel_ms,
               static_cast<long long>(r.graphs), kBatch, kHeads, kHeadsK, kHeadDim);
}

bool ReadRow(const char* line, Row* r) {
  char mode[32], direction[32];
  int causal = 0;
  long long seqlen = 0, graphs = 0;
  if (std::sscanf(line,
                  "{\"kind\":\"call\",\"mode\":\"%31[^\"]\",\"direction\":\"%31[^\"]\","
                  "\"causal\":%d,\"seqlen\":%lld,\"first_ms\":%lf,\"steady_ms\":%lf,"
                  "\"kernel_ms\":%lf,\"graphs\":%lld",
                  mode, direction, &causal, &seqlen, &r->first_ms, &r->steady_ms, &r->kernel_ms,
                  &graphs) != 8) {
    return false;
  }
  r->mode = mode;
  r->direction = direction;
  r->causal = causal != 0;
  r->seqlen = seqlen;
  r->graphs = graphs;
  return true;
}

void PrintRowHeader() {
  std::printf("%-4s %-6s %7s %10s %10s %10s %6s\n", "dir", "mask", "seqlen", "first_ms",
              "steady_ms", "kernel_ms", "graphs");
}

// Runs one mode in this process, printing its table and appending its rows to the JSON file.
int RunMode(const Options& o) {
  cudaDeviceProp prop;
  if (!CurrentDevice(&prop)) return 1;
  FILE* json = std::fopen(o.json.c_str(), "a");
  if (json == nullptr) {
    std::fprintf(stderr, "cannot open %s\n", o.json.c_str());
    return 1;
  }
  const bool background = o.mode == "background";
  std::unique_ptr<CudnnBackend> backend = MakeCudnnBackend(
      {.dynamic_shapes = o.mode != "static" && !background, .background_builds = background});
  const int64_t longest = *std::max_element(o.lengths.begin(), o.lengths.end());
  Buffers b(std::max<int64_t>(longest, 64));
  cudaStream_t stream = nullptr;
  BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start = nullptr, stop = nullptr;
  BENCH_CUDA_CHECK(cudaEventCreate(&start));
  BENCH_CUDA_CHECK(cudaEventCreate(&stop));
  FillBf16(b.q.ptr, longest * kHeads * kHeadDim, 1, stream);
  FillBf16(b.k.ptr, longest * kHeadsK * kHeadDim, 2, stream);
  FillBf16(b.v.ptr, longest * kHeadsK * kHeadDim, 3, stream);
  FillBf16(b.dout.ptr, longest * kHeads * kHeadDim, 4, stream);
  BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
  const ExecutionContext ctx{stream};

  // Init: another class (d 64, MHA), so that no class of the timed calls is compiled by it.
  const AttentionParams init = ForwardCall(b, 64, false, 64, kHeads);
  const double init_ms = TimeCall([&] { CheckStatus(backend->Forward(init, ctx), "init forward"); },
                                  stream, start, stop)
                             .first;
  CheckStatus(backend->WaitForGraphs(), "WaitForGraphs");  // background: the init call's graph
  double prewarm_ms = 0.0;
  int64_t prewarm_graphs = 0;
  if (o.mode == "prewarm") {
    CudnnPrewarmSpec spec;
    spec.backward = o.backward;
    const int64_t before = backend->graph_builds();
    const double t0 = NowMs();
    CheckStatus(backend->Prewarm(spec), "Prewarm");
    prewarm_ms = NowMs() - t0;
    prewarm_graphs = backend->graph_builds() - before;
  }
  std::printf("mode %s (cuDNN %zu, dynamic shapes %s): init call %.1f ms", o.mode.c_str(),
              cudnnGetVersion(), backend->dynamic_shapes() ? "on" : "off", init_ms);
  if (o.mode == "prewarm") {
    std::printf(", prewarm %.1f ms (%lld graphs)", prewarm_ms,
                static_cast<long long>(prewarm_graphs));
  }
  std::printf("\n");
  PrintRowHeader();

  for (const char* direction : {"fwd", "bwd"}) {
    const bool bwd = std::strcmp(direction, "bwd") == 0;
    if (bwd && !o.backward) continue;
    for (bool causal : {false, true}) {
      for (int64_t s : o.lengths) {
        const AttentionParams fp = ForwardCall(b, s, causal);
        const AttentionBackwardParams bp = BackwardCall(b, s, causal);
        if (bwd) {  // O and LSE of this length (the forward pass built its graph)
          CheckStatus(backend->Forward(fp, ctx), "forward for the backward");
          BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
        }
        auto call = [&] {
          CheckStatus(bwd ? backend->Backward(bp, ctx) : backend->Forward(fp, ctx), direction);
        };
        Row r;
        r.mode = o.mode;
        r.direction = direction;
        r.causal = causal;
        r.seqlen = s;
        const int64_t before = backend->graph_builds();
        r.first_ms = TimeCall(call, stream, start, stop).first;
        CheckStatus(backend->WaitForGraphs(), "WaitForGraphs");  // steady calls run cuDNN
        r.graphs = backend->graph_builds() - before;
        std::vector<double> walls, kernels;
        for (int i = 0; i < o.iters; ++i) {
          const auto [wall, kernel] = TimeCall(call, stream, start, stop);
          walls.push_back(wall);
          kernels.push_back(kernel);
        }
        r.steady_ms = Median(walls);
        r.kernel_ms = Median(kernels);
        std::printf("%-4s %-6s %7lld %10.2f %10.3f %10.3f %6lld\n", direction,
                    causal ? "causal" : "none", static_cast<long long>(s), r.first_ms, r.steady_ms,
                    r.kernel_ms, static_cast<long long>(r.graphs));
        WriteRow(json, r);
      }
    }
  }
  const CudnnGraphStats st = backend->graph_stats();
  std::printf(
      "graphs: %lld built, %lld dynamic, %lld static after a refusal, %lld classes; %lld calls "
      "served by our kernel while their graph built\n\n",
      static_cast<long long>(st.builds), static_cast<long long>(st.dynamic_builds),
      static_cast<long long>(st.static_fallbacks), static_cast<long long>(st.kernel_classes),
      static_cast<long long>(st.own_kernel_calls));
  std::fprintf(
      json,
      "{\"kind\":\"mode\",\"mode\":\"%s\",\"device\":\"%s\",\"cudnn_version\":%zu,"
      "\"dynamic_shapes\":%s,\"init_ms\":%.3f,\"prewarm_ms\":%.3f,"
      "\"prewarm_graphs\":%lld,\"graphs\":%lld,\"dynamic_graphs\":%lld,"
      "\"static_fallbacks\":%lld,\"kernel_classes\":%lld,\"own_kernel_calls\":%lld}\n",
      o.mode.c_str(), prop.name, cudnnGetVersion(), backend->dynamic_shapes() ? "true" : "false",
      init_ms, prewarm_ms, static_cast<long long>(prewarm_graphs),
      static_cast<long long>(st.builds), static_cast<long long>(st.dynamic_builds),
      static_cast<long long>(st.static_fallbacks), static_cast<long long>(st.kernel_classes),
      static_cast<long long>(st.own_kernel_calls));
  std::fclose(json);
  backend.reset();
  BENCH_CUDA_CHECK(cudaEventDestroy(start));
  BENCH_CUDA_CHECK(cudaEventDestroy(stop));
  BENCH_CUDA_CHECK(cudaStreamDestroy(stream));
  return 0;
}

// Runs `argv0 --mode mode` plus `pass` and waits; its exit status.
int RunChild(const char* argv0, const char* mode, const std::vector<std::string>& pass) {
  std::vector<std::string> args = {argv0, "--mode", mode};
  args.insert(args.end(), pass.begin(), pass.end());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid < 0) {
    std::perror("fork");
    return 1;
  }
  if (pid == 0) {
    execv("/proc/self/exe", argv.data());
    std::perror("execv /proc/self/exe");
    _exit(127);
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) {
    std::perror("waitpid");
    return 1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

// The summary over the modes, from the JSON lines.
void PrintSummary(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return;
  // (direction, causal, seqlen) -> mode -> row
  std::map<std::tuple<std::string, bool, int64_t>, std::map<std::string, Row>> rows;
  char line[1024];
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    Row r;
    if (ReadRow(line, &r)) rows[{r.direction, r.causal, r.seqlen}][r.mode] = r;
  }
  std::fclose(f);
  std::printf("summary: first-call wall ms per mode; kernel ms static vs dynamic\n");
  std::printf("%-4s %-6s %7s %9s %9s %9s %10s %9s %9s %7s\n", "dir", "mask", "seqlen", "static",
              "dynamic", "prewarm", "background", "k_static", "k_dyn", "ratio");
  double log_sum = 0.0;
  int n = 0;
  auto ms = [](const std::map<std::string, Row>& m, const char* mode, bool kernel) {
    auto it = m.find(mode);
    return it == m.end() ? NAN : (kernel ? it->second.kernel_ms : it->second.first_ms);
  };
  for (const auto& [key, by_mode] : rows) {
    const auto& [direction, causal, seqlen] = key;
    const double ks = ms(by_mode, "static", true), kd = ms(by_mode, "dynamic", true);
    const double ratio = kd / ks;
    if (std::isfinite(ratio) && ratio > 0) {
      log_sum += std::log(ratio);
      ++n;
    }
    std::printf("%-4s %-6s %7lld %9.2f %9.2f %9.2f %10.2f %9.3f %9.3f %7.3f\n",
                direction.c_str(), causal ? "causal" : "none", static_cast<long long>(seqlen),
                ms(by_mode, "static", false), ms(by_mode, "dynamic", false),
                ms(by_mode, "prewarm", false), ms(by_mode, "background", false), ks, kd, ratio);
  }
  if (n > 0) {
    std::printf("kernel ms dynamic / static, geometric mean over %d rows: %.3f\n", n,
                std::exp(log_sum / n));
  }
}

std::vector<int64_t> ParseLengths(const char* text) {
  std::vector<int64_t> lengths;
  for (const char* p = text; *p != '\0';) {
    char* end = nullptr;
    const long long v = std::strtoll(p, &end, 10);
    if (end == p || v <= 0) return {};
    lengths.push_back(v);
    p = *end == ',' ? end + 1 : end;
    if (*end != ',' && *end != '\0') return {};
  }
  return lengths;
}

int Main(int argc, char** argv) {
  Options o;
  std::vector<std::string> pass;  // what a child gets besides --mode
  bool bad = false;
  for (int i = 1; i < argc && !bad; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--json" && has_value) {
      o.json = argv[++i];
      pass.insert(pass.end(), {arg, o.json});
    } else if (arg == "--iters" && has_value) {
      o.iters = std::max(1, std::atoi(argv[++i]));
      pass.insert(pass.end(), {arg, argv[i]});
    } else if (arg == "--lengths" && has_value) {
      o.lengths = ParseLengths(argv[++i]);
      pass.insert(pass.end(), {arg, argv[i]});
      bad = o.lengths.empty();
    } else if (arg == "--no-backward") {
      o.backward = false;
      pass.push_back(arg);
    } else if (arg == "--mode" && has_value) {
      o.mode = argv[++i];
      bad = o.mode != "static" && o.mode != "dynamic" && o.mode != "prewarm" &&
            o.mode != "background";
    } else {
      bad = true;
    }
  }
  if (bad) {
    std::fprintf(stderr,
                 "usage: %s [--json PATH] [--iters N] [--lengths L1,L2,...] [--no-backward] "
                 "[--mode static|dynamic|prewarm|background]\n",
                 argv[0]);
    return 2;
  }
  if (!o.mode.empty()) return RunMode(o);
  FILE* json = std::fopen(o.json.c_str(), "w");  // the children append
  if (json == nullptr) {
    std::fprintf(stderr, "cannot open %s\n", o.json.c_str());
    return 1;
  }
  std::fclose(json);
  std::printf("cudnn first-call bench: b %d, h %d, h_k %d, d %d, bf16; %d steady calls\n\n", kBatch,
              kHeads, kHeadsK, kHeadDim, o.iters);
  for (const char* mode : kModes) {
    if (const int rc = RunChild(argv[0], mode, pass); rc != 0) {
      std::fprintf(stderr, "mode %s failed (exit %d)\n", mode, rc);
      return rc;
    }
  }
  PrintSummary(o.json);
  return 0;
}

}  // namespace
}  // namespace ringattn

int main(int argc, char** argv) { return ringattn::Main(argc, argv); }
