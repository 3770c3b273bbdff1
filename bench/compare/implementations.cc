// The host side of implementations.h: the CPU implementations, the problem, the fp64 reference
// backward and the registry. The GPU implementations are in gpu_implementations.cc.
#include "bench/compare/implementations.h"

#include <chrono>
#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "bench/compare/implementations_internal.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_backward_params.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/reference_backward.h"
#include "kernels/params_check.h"
#include "ring/testing/inprocess_ranks.h"
#include "ring/testing/synthetic_inputs.h"

namespace ringattn::compare {
namespace {

using internal::Clock;
using internal::SecondsSince;
using internal::TimeRingCalls;

// The backend of the CPU implementations.
constexpr std::string_view kCpu = "cpu";

// The same as the rings take it.
BackendFactory CpuFactory() {
  return [] { return MakeBackend(kCpu); };
}

// Synthetic tensor ids (as the command line's ring uses them).
constexpr uint32_t kQ = 0, kK = 1, kV = 2, kDOut = 3;

// Peak host bytes of a run: the problem's inputs plus the heap's growth since `live_at_start`.
MemoryUse HostMemorySince(const Problem& problem, int64_t live_at_start) {
  return {"host",
          std::string(kHostMemoryMethod),
          problem.input_bytes() + (HostHeap::PeakBytes() - live_at_start),
          {}};
}

// Whole-sequence backward params over the problem's host tensors: the forward's `out` and `lse`
// and the problem's dout in, fp32 gradients out (overwritten).
AttentionBackwardParams WholeBackwardParams(const Problem& problem, const void* out,
                                            const float* lse, Gradients* grads) {
  AttentionBackwardParams p;
  p.fwd = problem.Params();
  p.out = out;
  p.dout = problem.dout.data();
  p.out_dtype = problem.spec.dtype;
  p.lse = lse;
  p.dq = grads->dq.data();
  p.dk = grads->dk.data();
  p.dv = grads->dv.data();
  SetContiguousBackwardStrides(&p);
  return p;
}

// ---- CPU ----------------------------------------------------------------------------------------

constexpr std::string_view kSingleCpuDescription =
    "the fast CPU kernel (backend \"cpu\": blocked online softmax, fp32, all cores) on the whole "
    "sequence; the baseline without a GPU";
constexpr std::string_view kRingCpuDescription =
    "the ring forward (RunRingInProcess) with the \"cpu\" backend on every rank: W ranks as "
    "threads of one process, K/V passed by the in-process transport, fp32 LSE merge";

class SingleCpu final : public Implementation {
 public:
  std::string_view name() const override { return "single_cpu"; }
  std::string_view description() const override { return kSingleCpuDescription; }
  Placement placement() const override { return Placement::kHost; }
  bool is_ring() const override { return false; }
  absl::Status Available() const override { return absl::OkStatus(); }

  absl::StatusOr<ForwardRun> Forward(const Problem& problem, int world,
                                     const Repeats& repeats) override {
    if (world != 1) return absl::InvalidArgumentError("single_cpu runs at world size 1 only");
    RA_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackend> backend, MakeBackend(kCpu));
    HostHeap::ResetPeak();
    const int64_t live_at_start = HostHeap::LiveBytes();
    ForwardRun run;
    run.timer = "steady_clock";
    run.out.resize(problem.q.size());
    run.lse.resize(problem.lse_elements());
    AttentionParams p = problem.Params();
    p.o = run.out.data();
    p.lse = run.lse.data();
    for (int i = 0; i < repeats.warmup; ++i) RA_RETURN_IF_ERROR(backend->Forward(p));
    for (int i = 0; i < repeats.repeats; ++i) {
      const Clock::time_point t0 = Clock::now();
      RA_RETURN_IF_ERROR(backend->Forward(p));
      run.seconds.push_back(SecondsSince(t0));
    }
    run.wall_seconds = run.seconds;
    run.memory = HostMemorySince(problem, live_at_start);
    return run;
  }

  bool has_backward() const override { return true; }

  // The fast CPU backward (the "cpu" backend's) on the whole sequence, after one untimed
  // forward for its out and LSE.
  absl::StatusOr<BackwardRun> Backward(const Problem& problem, int world,
                                       const Repeats& repeats) override {
    if (world != 1) return absl::InvalidArgumentError("single_cpu runs at world size 1 only");
    if (problem.dout.empty()) return absl::FailedPreconditionError("the problem has no dout");
    RA_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackend> backend, MakeBackend(kCpu));
    HostHeap::ResetPeak();
    const int64_t live_at_start = HostHeap::LiveBytes();
    std::vector<std::byte> out(problem.q.size());
    std::vector<float> lse(problem.lse_elements());
    AttentionParams fp = problem.Params();
    fp.o = out.data();
    fp.lse = lse.data();
    RA_RETURN_IF_ERROR(backend->Forward(fp));

    BackwardRun run;
    run.timer = "steady_clock";
    run.grads.dq.resize(problem.out_elements());
    run.grads.dk.resize(problem.k.size() / DTypeSize(problem.spec.dtype));
    run.grads.dv.resize(run.grads.dk.size());
    const AttentionBackwardParams bp =
        WholeBackwardParams(problem, out.data(), lse.data(), &run.grads);
    for (int i = 0; i < repeats.warmup; ++i) RA_RETURN_IF_ERROR(backend->Backward(bp));
    for (int i = 0; i < repeats.repeats; ++i) {
      const Clock::time_point t0 = Clock::now();
      RA_RETURN_IF_ERROR(backend->Backward(bp));
      run.seconds.push_back(SecondsSince(t0));
    }
    run.wall_seconds = run.seconds;
    run.memory = HostMemorySince(problem, live_at_start);
    run.memory.peak_bytes += static_cast<int64_t>(problem.dout.size());
    return run;
  }
};

class RingCpu final : public Implementation {
 public:
  std::string_view name() const override { return "ring_cpu"; }
  std::string_view description() const override { return kRingCpuDescription; }
  Placement placement() const override { return Placement::kHost; }
  bool is_ring() const override { return true; }
  absl::Status Available() const override { return absl::OkStatus(); }

  absl::StatusOr<ForwardRun> Forward(const Problem& problem, int world,
                                     const Repeats& repeats) override {
    HostHeap::ResetPeak();
    const int64_t live_at_start = HostHeap::LiveBytes();
    ForwardRun run;
    run.timer = "steady_clock";
    run.out.resize(problem.q.size());
    run.lse.resize(problem.lse_elements());
    const WholeAttention whole = Whole(problem, run.out.data(), run.lse.data());
    const RingAttentionOptions options = problem.RingOptions();
    RA_RETURN_IF_ERROR(TimeRingCalls(
        repeats,
        [&] { return RunRingInProcess(whole, world, problem.layout, options, CpuFactory()); },
        &run));
    run.memory = HostMemorySince(problem, live_at_start);
    return run;
  }

  bool has_backward() const override { return true; }

  // The ring backward (RunRingBackwardInProcess) with the "cpu" backend, after one
  // untimed ring forward of the same size for its out and LSE.
  absl::StatusOr<BackwardRun> Backward(const Problem& problem, int world,
                                       const Repeats& repeats) override {
    if (problem.dout.empty()) return absl::FailedPreconditionError("the problem has no dout");
    HostHeap::ResetPeak();
    const int64_t live_at_start = HostHeap::LiveBytes();
    std::vector<std::byte> out(problem.q.size());
    std::vector<float> lse(problem.lse_elements());
    WholeAttention whole = Whole(problem, out.data(), lse.data());
    const RingAttentionOptions options = problem.RingOptions();
    RA_RETURN_IF_ERROR(
        RunRingInProcess(whole, world, problem.layout, options, CpuFactory()).status());

    BackwardRun run;
    run.timer = "steady_clock";
    run.grads.dq.resize(problem.out_elements());
    run.grads.dk.resize(problem.k.size() / DTypeSize(problem.spec.dtype));
    run.grads.dv.resize(run.grads.dk.size());
    WholeAttentionBackward wb;
    wb.dtype = problem.spec.dtype;
    wb.grad_dtype = DType::kF32;
    wb.batch = whole.batch;
    wb.seqlen = whole.seqlen;
    wb.heads = whole.heads;
    wb.heads_k = whole.heads_k;
    wb.head_dim = whole.head_dim;
    wb.q = whole.q;
    wb.k = whole.k;
    wb.v = whole.v;
    wb.out = out.data();
    wb.lse = lse.data();
    wb.dout = problem.dout.data();
    wb.dq = run.grads.dq.data();
    wb.dk = run.grads.dk.data();
    wb.dv = run.grads.dv.data();
    RA_RETURN_IF_ERROR(TimeRingCalls(
        repeats,
        [&] { return RunRingBackwardInProcess(wb, world, problem.layout, options, CpuFactory()); },
        &run));
    run.memory = HostMemorySince(problem, live_at_start);
    run.memory.peak_bytes += static_cast<int64_t>(problem.dout.size());
    return run;
  }

 private:
  // The whole problem as RunRingInProcess takes it, writing into `out` and `lse`.
  static WholeAttention Whole(const Problem& problem, void* out, float* lse) {
    WholeAttention whole;
    whole.dtype = problem.spec.dtype;
    whole.batch = problem.spec.batch;
    whole.seqlen = problem.spec.seqlen;
    whole.heads = problem.spec.heads;
    whole.heads_k = problem.spec.kv_heads();
    whole.head_dim = problem.spec.head_dim;
    whole.q = problem.q.data();
    whole.k = problem.k.data();
    whole.v = problem.v.data();
    whole.out = out;
    whole.lse = lse;
    return whole;
  }
};

}  // namespace

std::string_view PlacementName(Placement placement) {
  return placement == Placement::kHost ? "host" : "device";
}

// ---- Problem ------------------------------------------------------------------------------------

AttentionParams Problem::Params() const {
  AttentionParams p;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.batch = spec.batch;
  p.seqlen_q = p.seqlen_k = spec.seqlen;
  p.heads = spec.heads;
  p.heads_k = spec.kv_heads();
  p.head_dim = spec.head_dim;
  p.dtype = p.o_dtype = spec.dtype;
  p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(spec.head_dim));
  p.softcap = spec.softcap;
  p.alibi_slopes = alibi_slopes.empty() ? nullptr : alibi_slopes.data();
  p.causal = spec.causal;
  p.window_left = spec.window_left;
  p.window_right = spec.window_right;
  SetSequenceBounds(&p, spec.cu_seqlens.data(), spec.cu_seqlens.size());
  SetContiguousStrides(&p);
  return p;
}

RingAttentionOptions Problem::RingOptions() const {
  RingAttentionOptions o;
  o.causal = spec.causal;
  o.window_size = {spec.window_left, spec.window_right};
  o.alibi_slopes = alibi_slopes;
  o.softcap = spec.softcap;
  o.seq_bounds = spec.cu_seqlens;
  return o;
}

double Problem::forward_flops() const { return ForwardFlops(Params()); }

int64_t Problem::out_elements() const {
  return static_cast<int64_t>(spec.batch) * spec.seqlen * spec.heads * spec.head_dim;
}

int64_t Problem::lse_elements() const {
  return static_cast<int64_t>(spec.batch) * spec.heads * spec.seqlen;
}

absl::StatusOr<Problem> DescribeProblem(const ComparisonCase& spec) {
  Problem pr;
  pr.spec = spec;
  RA_RETURN_IF_ERROR(ValidateCase(pr.spec));
  if (spec.layout == "auto") {
    pr.layout = AutoLayout(spec.causal);
  } else {
    RA_ASSIGN_OR_RETURN(pr.layout, ParseLayout(spec.layout));
  }
  if (spec.alibi) {
    for (int h = 0; h < spec.heads; ++h) {
      pr.alibi_slopes.push_back(
          std::exp2(-8.0f * static_cast<float>(h + 1) / static_cast<float>(spec.heads)));
    }
  }
  return pr;
}

absl::StatusOr<Problem> MakeProblem(const ComparisonCase& spec, uint64_t seed,
                                    bool with_grad_output) {
  RA_ASSIGN_OR_RETURN(Problem pr, DescribeProblem(spec));
  const size_t es = DTypeSize(spec.dtype);
  const size_t q_elems = static_cast<size_t>(pr.out_elements());
  const size_t kv_elems =
      static_cast<size_t>(spec.batch) * spec.seqlen * spec.kv_heads() * spec.head_dim;
  pr.q.resize(q_elems * es);
  pr.k.resize(kv_elems * es);
  pr.v.resize(kv_elems * es);
  FillSynthetic(seed, kQ, spec.batch, spec.seqlen, spec.heads, spec.head_dim, spec.dtype,
                pr.q.data());
  FillSynthetic(seed, kK, spec.batch, spec.seqlen, spec.kv_heads(), spec.head_dim, spec.dtype,
                pr.k.data());
  FillSynthetic(seed, kV, spec.batch, spec.seqlen, spec.kv_heads(), spec.head_dim, spec.dtype,
                pr.v.data());
  if (with_grad_output) {
    pr.dout.resize(q_elems * es);
    FillSynthetic(seed, kDOut, spec.batch, spec.seqlen, spec.heads, spec.head_dim, spec.dtype,
                  pr.dout.data());
  }
  return pr;
}

// ---- Backward -----------------------------------------------------------------------------------

absl::StatusOr<BackwardRun> Implementation::Backward(const Problem&, int, const Repeats&) {
  return absl::UnimplementedError(absl::StrCat(std::string(name()), ": no backward in this build"));
}

absl::StatusOr<ReferenceGradients> ReferenceBackward(const Problem& problem) {
  if (problem.dout.empty()) return absl::FailedPreconditionError("the problem has no dout");
  AttentionBackwardParams p;
  p.fwd = problem.Params();
  p.dout = problem.dout.data();
  p.out_dtype = problem.spec.dtype;
  SetContiguousBackwardStrides(&p);
  RA_ASSIGN_OR_RETURN(ReferenceBackwardResult r, ringattn::ReferenceBackward(p));
  return ReferenceGradients{std::move(r.dq), std::move(r.dk), std::move(r.dv)};
}

// ---- Registry -----------------------------------------------------------------------------------

void ImplementationRegistry::Add(std::string name, Factory factory) {
  entries_.emplace_back(std::move(name), std::move(factory));
}

std::vector<std::string> ImplementationRegistry::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, factory] : entries_) names.push_back(name);
  return names;
}

absl::StatusOr<std::unique_ptr<Implementation>> ImplementationRegistry::Make(
    std::string_view name) const {
  for (const auto& [n, factory] : entries_) {
    if (n == name) return factory();
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown implementation '", std::string(name),
                                                 "'; expected one of ",
                                                 absl::StrJoin(Names(), ", ")));
}

std::string MachineDescription() {
  return absl::StrCat("host: ", std::thread::hardware_concurrency(), " hardware threads; ",
                      internal::GpuDescription());
}

ImplementationRegistry BuiltinImplementations() {
  ImplementationRegistry registry;
  registry.Add("single_cpu", [] { return std::make_unique<SingleCpu>(); });
  registry.Add("ring_cpu", [] { return std::make_unique<RingCpu>(); });
  internal::AddGpuImplementations(registry);
  return registry;
}

}  // namespace ringattn::compare
