#include "cli/local_ring.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "base/error_metrics.h"
#include "base/status_macros.h"
#include "cli/exit_codes.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/params_check.h"
#include "ring/testing/synthetic_inputs.h"
#include "ring/transport/gloo_communicator.h"  // MakeFileStore
#include "ring/transport/transport_registry.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

// Synthetic tensor ids.
constexpr uint32_t kQ = 0, kK = 1, kV = 2;

struct Tolerance {
  double vs_single;     // relative L2 against the single-device run (same kernel, same dtype)
  double vs_reference;  // relative L2 against fp64
};

// Both runs accumulate in fp32 and round the output to the dtype once, so against each other
// they differ by a rounding step at most; against fp64 the dtype's epsilon dominates.
Tolerance ToleranceFor(DType dtype) {
  switch (dtype) {
    case DType::kF32: return {1e-5, 1e-5};
    case DType::kF16: return {1e-3, 2e-3};
    case DType::kBF16: return {8e-3, 1e-2};
  }
  return {0, 0};
}

size_t TensorBytes(int batch, int64_t rows, int heads, int head_dim, DType dtype) {
  return static_cast<size_t>(batch) * rows * heads * head_dim * DTypeSize(dtype);
}

// Per-rank timings flattened for transport: total, then (compute, wait) per step.
std::vector<double> FlattenTimings(const RingTimings& t) {
  std::vector<double> v{t.total_seconds};
  for (const RingStepTiming& s : t.steps) {
    v.push_back(s.compute_seconds);
    v.push_back(s.comm_wait_seconds);
  }
  return v;
}

struct RankResult {
  std::vector<std::byte> out;  // [batch, rows, heads, head_dim]
  std::vector<float> lse;      // [batch, heads, rows]
  std::vector<double> timings; // FlattenTimings
};

// Prints the result of the ring (gathered on rank 0) and checks it; returns the exit code.
int ReportOnRankZero(const LocalRingOptions& o, const ShardPlan& plan,
                     std::vector<RankResult>& ranks, std::ostream& out) {
  const int W = o.world;
  const DType dt = o.dtype;
  std::vector<std::byte> ring_out(TensorBytes(o.batch, o.seqlen, o.heads, o.head_dim, dt));
  std::vector<float> ring_lse(static_cast<size_t>(o.batch) * o.heads * o.seqlen);
  const size_t row_bytes = static_cast<size_t>(o.heads) * o.head_dim * DTypeSize(dt);
  for (int r = 0; r < W; ++r) {
    InsertShard(plan, r, ranks[r].out.data(), o.batch, row_bytes, ring_out.data());
    InsertShard(plan, r, ranks[r].lse.data(), static_cast<int64_t>(o.batch) * o.heads,
                sizeof(float), ring_lse.data());
  }

  AttentionParams p;
  p.batch = o.batch;
  p.seqlen_q = p.seqlen_k = o.seqlen;
  p.heads = o.heads;
  p.heads_k = o.heads_k;
  p.head_dim = o.head_dim;
  p.dtype = p.o_dtype = dt;
  p.causal = o.attention.causal;
  const double flops = ForwardFlops(p);

  out << absl::StrFormat(
      "ring forward: world=%d layout=%s batch=%d seqlen=%d heads=%d/%d head_dim=%d dtype=%s "
      "causal=%d backend=%s\n",
      W, std::string(LayoutName(plan.layout)), o.batch, o.seqlen, o.heads, o.heads_k, o.head_dim,
      std::string(DTypeName(dt)), o.attention.causal, o.backend);
  out << absl::StrFormat("%-6s %8s %12s %14s %12s\n", "rank", "rows", "compute_s", "comm_wait_s",
                         "total_s");
  double slowest = 0;
  for (int r = 0; r < W; ++r) {
    const std::vector<double>& t = ranks[r].timings;
    double compute = 0, wait = 0;
    for (int s = 0; s < W; ++s) {
      compute += t[1 + 2 * s];
      wait += t[2 + 2 * s];
    }
    slowest = std::max(slowest, t[0]);
    out << absl::StrFormat("%-6d %8d %12.4f %14.4f %12.4f\n", r, plan.shards[r].rows, compute,
                           wait, t[0]);
  }
  out << absl::StrFormat("ring: %.4f s, %.2f GFLOP/s\n", slowest, flops / slowest * 1e-9);
  if (!o.check) return 0;

  // Single device: the same backend on the whole sequence.
  const size_t q_bytes = TensorBytes(o.batch, o.seqlen, o.heads, o.head_dim, dt);
  const size_t kv_bytes = TensorBytes(o.batch, o.seqlen, o.heads_k, o.head_dim, dt);
  std::vector<std::byte> q(q_bytes), k(kv_bytes), v(kv_bytes), single_out(q_bytes);
  std::vector<float> single_lse(ring_lse.size());
  FillSynthetic(o.seed, kQ, o.batch, o.seqlen, o.heads, o.head_dim, dt, q.data());
  FillSynthetic(o.seed, kK, o.batch, o.seqlen, o.heads_k, o.head_dim, dt, k.data());
  FillSynthetic(o.seed, kV, o.batch, o.seqlen, o.heads_k, o.head_dim, dt, v.data());
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.o = single_out.data();
  p.lse = single_lse.data();
  SetContiguousStrides(&p);
  p.softmax_scale =
      o.attention.softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(o.head_dim)));
  p.softcap = o.attention.softcap;
  p.alibi_slopes = o.attention.alibi_slopes.empty() ? nullptr : o.attention.alibi_slopes.data();
  p.dropout_p = o.attention.dropout_p;
  p.dropout_seed = o.attention.dropout_seed;
  SetSequenceBounds(&p, o.attention.seq_bounds.data(), o.attention.seq_bounds.size());
  p.causal = o.attention.causal;
  p.window_left = o.attention.window_size.first;
  p.window_right = o.attention.window_size.second;

  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend =
      MakeBackend(o.backend, MemorySpace::kHost);
  if (!backend.ok()) {
    out << "error: " << backend.status() << "\n";
    return 1;
  }
  const auto t0 = Clock::now();
  if (absl::Status s = (*backend)->Forward(p); !s.ok()) {
    out << "error: single-device run: " << s << "\n";
    return 1;
  }
  const double single_s = std::chrono::duration<double>(Clock::now() - t0).count();
  out << absl::StrFormat("single device: %.4f s, %.2f GFLOP/s (ring/single time ratio %.2f)\n",
                         single_s, flops / single_s * 1e-9, slowest / single_s);

  const Tolerance tol = ToleranceFor(dt);
  bool ok = true;
  const int64_t n_out = static_cast<int64_t>(o.batch) * o.seqlen * o.heads * o.head_dim;
  std::vector<float> single_out_f(n_out);
  for (int64_t i = 0; i < n_out; ++i) single_out_f[i] = LoadAsFloat(single_out.data(), i, dt);
  const ErrorStats e_out = CompareTensor(ring_out.data(), dt, single_out_f.data(), n_out);
  const ErrorStats e_lse = CompareTensor(ring_lse.data(), DType::kF32, single_lse.data(),
                                         static_cast<int64_t>(single_lse.size()));
  out << "ring vs single device: out " << e_out.ToString() << "\n";
  out << "ring vs single device: lse " << e_lse.ToString() << "\n";
  ok &= e_out.Within(tol.vs_single, 1.0) && e_lse.Within(1e-5, 1e-3);

  if (flops <= o.reference_flop_limit) {
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
    if (!ref.ok()) {
      out << "error: reference: " << ref.status() << "\n";
      return 1;
    }
    const ErrorStats r_out = CompareTensor(ring_out.data(), dt, ref->o.data(), n_out);
    const ErrorStats r_lse = CompareTensor(ring_lse.data(), DType::kF32, ref->lse.data(),
                                           static_cast<int64_t>(ref->lse.size()));
    out << "ring vs fp64 reference: out " << r_out.ToString() << "\n";
    out << "ring vs fp64 reference: lse " << r_lse.ToString() << "\n";
    ok &= r_out.Within(tol.vs_reference, 1.0) && r_lse.Within(1e-5, 1e-3);
  } else {
    out << "fp64 reference skipped (over --reference_flop_limit)\n";
  }
  out << (ok ? "check: PASS\n" : "check: FAIL (tolerance breached)\n");
  return ok ? kExitOk : kExitCheckFailed;
}

absl::Status RunRank(const LocalRingOptions& o, int rank, const std::string& store_dir,
                     std::ostream& out, int* exit_code) {
  RA_ASSIGN_OR_RETURN(const Layout layout, o.layout == "auto" ? AutoLayout(o.attention.causal)
                                                               : ParseLayout(o.layout));
  RA_ASSIGN_OR_RETURN(const ShardPlan plan, PlanShards(o.seqlen, o.world, layout));
  const int64_t rows = plan.shards[rank].rows;
  const DType dt = o.dtype;
  std::vector<std::byte> q(TensorBytes(o.batch, rows, o.heads, o.head_dim, dt));
  std::vector<std::byte> k(TensorBytes(o.batch, rows, o.heads_k, o.head_dim, dt));
  std::vector<std::byte> v(k.size());
  FillSyntheticShard(o.seed, kQ, plan, rank, o.batch, o.heads, o.head_dim, dt, q.data());
  FillSyntheticShard(o.seed, kK, plan, rank, o.batch, o.heads_k, o.head_dim, dt, k.data());
  FillSyntheticShard(o.seed, kV, plan, rank, o.batch, o.heads_k, o.head_dim, dt, v.data());

  RankResult mine;
  mine.out.resize(q.size());
  mine.lse.resize(static_cast<size_t>(o.batch) * o.heads * rows);
  RingShardTensors t;
  t.dtype = dt;
  t.batch = o.batch;
  t.heads = o.heads;
  t.heads_k = o.heads_k;
  t.head_dim = o.head_dim;
  t.q = q.data();
  t.k = k.data();
  t.v = v.data();
  t.out = mine.out.data();
  t.lse = mine.lse.data();

  RA_ASSIGN_OR_RETURN(std::shared_ptr<gloo::rendezvous::Store> store, MakeFileStore(store_dir));
  const std::chrono::milliseconds timeout(static_cast<int64_t>(o.timeout_seconds * 1000));
  RA_ASSIGN_OR_RETURN(
      std::unique_ptr<Communicator> comm,
      HostTransports().Join(
          "gloo", {.rank = rank, .world = o.world, .timeout = timeout, .store = std::move(store)}));
  RA_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackend> backend,
                      MakeBackend(o.backend, MemorySpace::kHost));
  RA_ASSIGN_OR_RETURN(const RingTimings timings,
                      RingFlashAttnForward(*comm, *backend, plan, t, o.attention));
  mine.timings = FlattenTimings(timings);

  // Gather on rank 0: timings, out and lse of every rank.
  const size_t timing_bytes = mine.timings.size() * sizeof(double);
  if (rank != 0) {
    const SendOp sends[] = {{0, mine.timings.data(), timing_bytes},
                            {0, mine.out.data(), mine.out.size()},
                            {0, mine.lse.data(), mine.lse.size() * sizeof(float)}};
    RA_RETURN_IF_ERROR(Exchange(*comm, sends, {}));
    *exit_code = 0;
    return absl::OkStatus();
  }
  std::vector<RankResult> all(o.world);
  std::vector<RecvOp> recvs;
  for (int r = 1; r < o.world; ++r) {
    const int64_t rr = plan.shards[r].rows;
    all[r].timings.resize(mine.timings.size());
    all[r].out.resize(TensorBytes(o.batch, rr, o.heads, o.head_dim, dt));
    all[r].lse.resize(static_cast<size_t>(o.batch) * o.heads * rr);
    recvs.push_back({r, all[r].timings.data(), timing_bytes});
    recvs.push_back({r, all[r].out.data(), all[r].out.size()});
    recvs.push_back({r, all[r].lse.data(), all[r].lse.size() * sizeof(float)});
  }
  RA_RETURN_IF_ERROR(Exchange(*comm, {}, recvs));
  all[0] = std::move(mine);
  *exit_code = ReportOnRankZero(o, plan, all, out);
  return absl::OkStatus();
}

// Waits for every child until the deadline; kills them all past it. Returns the worst code.
int WaitForRanks(const std::vector<pid_t>& pids, double timeout_seconds, std::ostream& out) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_seconds);
  std::vector<bool> done(pids.size(), false);
  int worst = 0;
  size_t remaining = pids.size();
  while (remaining > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int status = 0;
      if (waitpid(pids[i], &status, WNOHANG) == pids[i]) {
        done[i] = true;
        --remaining;
        const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (code != 0) {
          out << "rank " << i << " exited with code " << code << "\n";
          worst = std::max(worst, code);
        }
      }
    }
    if (remaining > 0 && Clock::now() > deadline) {
      out << "error: ranks still running after " << timeout_seconds << " s; killing them\n";
      for (size_t i = 0; i < pids.size(); ++i) {
        if (!done[i]) kill(pids[i], SIGKILL);
      }
      for (size_t i = 0; i < pids.size(); ++i) {
        if (!done[i]) waitpid(pids[i], nullptr, 0);
      }
      return kExitUnavailable;  // as a call past its deadline
    }
    if (remaining > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return worst;
}

}  // namespace

int RunLocalRing(const LocalRingOptions& options, std::ostream& out) {
  if (options.world < 1) {
    out << "error: --world must be >= 1, got " << options.world << "\n";
    return 2;
  }
  char dir_template[] = "/tmp/ringattn-ring-XXXXXX";
  if (mkdtemp(dir_template) == nullptr) {
    out << "error: cannot create a rendezvous directory under /tmp\n";
    return 1;
  }
  const std::string store_dir = dir_template;
  out.flush();
  std::vector<pid_t> pids;
  for (int r = 0; r < options.world; ++r) {
    const pid_t pid = fork();
    if (pid < 0) {
      out << "error: fork failed for rank " << r << "\n";
      for (pid_t p : pids) kill(p, SIGKILL);
      return 1;
    }
    if (pid == 0) {
      int code = 1;
      absl::Status s = RunRank(options, r, store_dir, out, &code);
      if (!s.ok()) {
        out << "rank " << r << ": " << s << "\n";
        code = 1;
      }
      out.flush();
      std::fflush(nullptr);
      _exit(code);
    }
    pids.push_back(pid);
  }
  const int code = WaitForRanks(pids, options.timeout_seconds + 10, out);
  std::error_code ec;
  std::filesystem::remove_all(store_dir, ec);
  return code;
}

}  // namespace ringattn
