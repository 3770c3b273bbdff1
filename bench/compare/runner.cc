#include "bench/compare/runner.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/error_metrics.h"
#include "bench/compare/implementations.h"
#include "bench/compare/metrics.h"
#include "kernels/cpu/reference_attention.h"

namespace ringattn::compare {
namespace {

using Clock = std::chrono::steady_clock;

// Backward FLOPs as the published FlashAttention figures count them: forward + backward = 3.5 forwards.
constexpr double kBackwardFlopsPerForward = 2.5;

std::vector<float> ToFloat(const std::vector<std::byte>& data, DType dtype) {
  const int64_t n = static_cast<int64_t>(data.size()) / DTypeSize(dtype);
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = LoadAsFloat(data.data(), i, dtype);
  return out;
}

template <typename Ref>
ErrorStats Compare(const std::vector<float>& got, const std::vector<Ref>& ref) {
  return CompareTensor(got.data(), DType::kF32, ref.data(), static_cast<int64_t>(ref.size()));
}
ErrorStats Compare(const std::vector<std::byte>& got, DType dtype, const std::vector<float>& ref) {
  return CompareTensor(got.data(), dtype, ref.data(), static_cast<int64_t>(ref.size()));
}
ErrorStats Compare(const std::vector<std::byte>& got, DType dtype, const std::vector<double>& ref) {
  return CompareTensor(got.data(), dtype, ref.data(), static_cast<int64_t>(ref.size()));
}

// max |x| over a reference tensor (the scale ScaledToReference takes).
template <typename T>
double MaxAbs(const std::vector<T>& x) {
  double m = 0;
  for (const T& v : x) m = std::max(m, std::abs(static_cast<double>(v)));
  return m;
}

// Appends a failure naming what broke to *failures when `e` breaks `bound`.
void Check(std::string_view what, const ErrorStats& e, const ErrorBound& bound,
           std::string_view bound_name, std::vector<std::string>* failures) {
  if (bound.Admits(e)) return;
  std::vector<std::string> why;
  if (e.nan_count > 0) why.push_back(absl::StrCat(e.nan_count, " NaN"));
  if (e.inf_mismatch > 0) why.push_back(absl::StrCat(e.inf_mismatch, " infinity mismatches"));
  if (e.max_abs > bound.max_abs) {
    why.push_back(absl::StrFormat("max_abs %.3g > %.3g", e.max_abs, bound.max_abs));
  }
  if (e.rel_l2 > bound.rel_l2) {
    why.push_back(absl::StrFormat("rel_l2 %.3g > %.3g", e.rel_l2, bound.rel_l2));
  }
  failures->push_back(absl::StrCat(std::string(what), " breaks the ", std::string(bound_name),
                                   " bound: ", absl::StrJoin(why, ", ")));
}

// What a progress line's errors are against.
std::string_view AgainstLabel(bool checked, bool fp64, bool is_baseline) {
  if (checked) return fp64 ? "vs fp64" : "vs baseline";
  return is_baseline ? "the baseline, no fp64" : "nothing to compare with";
}

std::string StatusMessage(const absl::Status& s) { return std::string(s.message()); }

// Throughput fields of a run row; per GPU as well when the run occupied GPUs.
void AddThroughput(const Throughput& tp, int gpus, JsonObject& row) {
  row.Add("tflops", tp.tflops).Add("tokens_per_s", tp.tokens_per_second).Add("gpus", gpus);
  if (gpus > 0) {
    row.Add("tflops_per_gpu", tp.tflops / gpus);
  } else {
    row.AddNull("tflops_per_gpu");
  }
}

// A run's memory: space and peak, and each GPU's figure for a ring over several.
JsonObject MemoryJson(const MemoryUse& m) {
  JsonObject o;
  o.Add("space", m.space).Add("peak_bytes", m.peak_bytes);
  if (!m.per_gpu_bytes.empty()) o.Add("per_gpu_bytes", m.per_gpu_bytes);
  return o;
}

// " (max/GPU 123.4 MiB)" for a ring over several GPUs, else empty.
std::string PerGpuLabel(const MemoryUse& m) {
  if (m.per_gpu_bytes.empty()) return "";
  const int64_t most = *std::max_element(m.per_gpu_bytes.begin(), m.per_gpu_bytes.end());
  return absl::StrFormat(" (max/GPU %.1f MiB)", most / 1048576.0);
}

// What one case keeps while its implementations run.
struct CaseState {
  std::optional<ReferenceResult> reference;  // fp64 forward, when affordable
  std::string reference_note;                // why it is missing
  // The baseline: the first single-device implementation that ran the case.
  std::string baseline;
  Placement baseline_placement = Placement::kHost;
  int64_t baseline_memory = -1;
  std::vector<float> baseline_out, baseline_lse;
  // Gradients.
  bool reference_grads_tried = false;
  absl::StatusOr<ReferenceGradients> reference_grads = absl::UnknownError("not computed");
  double reference_grads_seconds = 0;
  std::string grad_baseline;
  std::vector<float> baseline_dq, baseline_dk, baseline_dv;
};

class Runner {
 public:
  Runner(const ComparisonOptions& options, std::ostream& log, std::ostream& results)
      : options_(options), log_(log), results_(results) {}

  absl::Status Run(const std::vector<std::string>& names) {
    const ImplementationRegistry registry = BuiltinImplementations();
    std::vector<std::unique_ptr<Implementation>> impls;
    for (const std::string& name : names) {
      absl::StatusOr<std::unique_ptr<Implementation>> impl = registry.Make(name);
      if (!impl.ok()) return impl.status();
      impls.push_back(*std::move(impl));
    }
    // Single-device implementations first: the first that runs a case is its baseline.
    std::stable_partition(impls.begin(), impls.end(),
                          [](const auto& impl) { return !impl->is_ring(); });
    EmitMeta(impls);
    for (const ComparisonCase& c : options_.cases.cases) RunCase(c, impls);
    JsonObject s;
    s.Add("type", "summary").Add("runs", summary_.runs).Add("passed", summary_.passed);
    s.Add("failed", summary_.failed).Add("errors", summary_.errors);
    s.Add("unchecked", summary_.unchecked).Add("not_available", summary_.not_available);
    s.Add("unsupported", summary_.unsupported).Add("ok", summary_.ok());
    Emit(s);
    return absl::OkStatus();
  }

  const ComparisonSummary& summary() const { return summary_; }

 private:
  static Tolerances Scaled(Tolerances t, double scale) {
    for (ErrorBound* b : {&t.out, &t.lse, &t.grad}) {
      b->max_abs *= scale;
      b->rel_l2 *= scale;
    }
    return t;
  }
  Tolerances Tool(DType t) const { return Scaled(ToolTolerances(t), options_.tolerance_scale); }
  Tolerances Baseline(DType t) const {
    return Scaled(BaselineTolerances(t), options_.tolerance_scale);
  }

  void Emit(const JsonObject& o) { results_ << o.ToString() << "\n" << std::flush; }

  void EmitMeta(const std::vector<std::unique_ptr<Implementation>>& impls) {
    std::vector<JsonObject> impl_json;
    for (const auto& impl : impls) {
      const absl::Status available = impl->Available();
      JsonObject o;
      o.Add("name", impl->name()).Add("description", impl->description());
      o.Add("placement", PlacementName(impl->placement())).Add("ring", impl->is_ring());
      o.Add("available", available.ok()).Add("reason", StatusMessage(available));
      o.Add("backward", impl->has_backward());
      impl_json.push_back(o);
    }
    std::vector<JsonObject> tolerances;
    for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
      const Tolerances tool = Tool(t), base = Baseline(t);
      JsonObject o;
      o.Add("dtype", DTypeName(t));
      o.Add("out", ToJson(tool.out)).Add("lse", ToJson(tool.lse)).Add("grad", ToJson(tool.grad));
      o.Add("baseline_out", ToJson(base.out)).Add("baseline_lse", ToJson(base.lse));
      o.Add("baseline_grad", ToJson(base.grad));
      tolerances.push_back(o);
    }
    const Tolerances seed = SeedTolerances();
    JsonObject m;
    m.Add("type", "meta").Add("tool", "ringattn_compare").Add("case_set", options_.cases.name);
    m.Add("command", options_.command_line).Add("machine", MachineDescription());
    m.Add("seed", static_cast<int64_t>(options_.seed));
    m.Add("tolerance_scale", options_.tolerance_scale);
    m.Add("reference_flop_limit", options_.cases.reference_flop_limit);
    m.Add("implementations", impl_json).Add("tolerances", tolerances);
    m.Add("seed_tolerances",
          JsonObject().Add("out_max_abs", seed.out.max_abs).Add("grad_max_abs", seed.grad.max_abs));
    m.Add("memory_methods",
          std::vector<std::string>{std::string(kHostMemoryMethod), std::string(kDeviceMemoryMethod),
                                   std::string(kMultiGpuMemoryMethod)});
    m.Add("visible_gpus", VisibleGpuCount());
    m.Add("latency_method",
          "p50/p99 by nearest rank over the timed calls after the warm-up; a ring's latency is "
          "its slowest rank's ring time (scatter/gather of the whole sequence excluded, reported "
          "as wall_p50_s); GPU calls timed with CUDA events, CPU calls with steady_clock");
    m.Add("flops_method",
          "forward 4*b*h*s^2*d, halved when causal (windows not discounted); backward 2.5x the "
          "forward");
    Emit(m);
  }

  JsonObject CaseFields(const Problem& problem) const {
    const ComparisonCase& c = problem.spec;
    JsonObject o;
    o.Add("case", c.name).Add("shape", CaseShape(c)).Add("batch", c.batch);
    o.Add("seqlen", c.seqlen).Add("heads", c.heads).Add("heads_k", c.kv_heads());
    o.Add("head_dim", c.head_dim).Add("dtype", DTypeName(c.dtype)).Add("causal", c.causal);
    o.Add("window",
          std::vector<int>{static_cast<int>(c.window_left), static_cast<int>(c.window_right)});
    o.Add("softcap", static_cast<double>(c.softcap)).Add("alibi", c.alibi);
    o.Add("layout", LayoutName(problem.layout));
    return o;
  }

  void RunCase(const ComparisonCase& c, std::vector<std::unique_ptr<Implementation>>& impls) {
    bool any_backward = false;
    for (const auto& impl : impls) any_backward |= impl->has_backward();
    log_ << absl::StrFormat("== case %s: %s, layout %s, worlds %s\n", c.name, CaseShape(c),
                            c.layout, absl::StrJoin(c.worlds, ","));
    if (const int found = VisibleGpuCount(); c.gpus > found) {
      SkipCase(c, impls,
               absl::UnavailableError(
                   absl::StrCat("the case needs ", c.gpus, " GPUs, this machine has ", found)));
      return;
    }
    absl::StatusOr<Problem> problem = MakeProblem(c, options_.seed, c.backward && any_backward);
    if (!problem.ok()) {
      log_ << "   error: " << problem.status() << "\n";
      ++summary_.errors;
      return;
    }
    CaseState state;
    const double flops = problem->forward_flops();
    JsonObject case_json = CaseFields(*problem);
    case_json.Add("type", "case").Add("flops", flops).Add("worlds", c.worlds);
    if (flops <= options_.cases.reference_flop_limit) {
      const Clock::time_point t0 = Clock::now();
      // ReferenceForward validates o like any call but neither reads nor writes it.
      std::vector<std::byte> unused_out(problem->q.size());
      AttentionParams p = problem->Params();
      p.o = unused_out.data();
      absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
      const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      if (ref.ok()) {
        state.reference = *std::move(ref);
        case_json.Add("reference", "fp64").Add("reference_seconds", seconds);
      } else {
        state.reference_note = absl::StrCat("fp64 reference failed: ", ref.status().message());
        ++summary_.errors;
      }
    } else {
      state.reference_note = absl::StrFormat(
          "fp64 reference skipped: %.3g forward FLOPs over the limit %.3g; errors are against "
          "the baseline",
          flops, options_.cases.reference_flop_limit);
    }
    if (!state.reference) {
      case_json.Add("reference", "skipped").Add("reference_note", state.reference_note);
      log_ << "   " << state.reference_note << "\n";
    }
    Emit(case_json);

    for (const auto& impl : impls) {
      if (absl::Status a = impl->Available(); !a.ok()) {
        EmitStatusRow(*problem, *impl, "fwd", "not_available", a);
        continue;
      }
      if (absl::Status s = impl->Supports(*problem); !s.ok()) {
        EmitStatusRow(*problem, *impl, "fwd", "unsupported", s);
        // The backward needs the forward's output: refused with it (one row, so that the
        // gradients section names the reason too).
        if (c.backward && impl->has_backward()) {
          EmitStatusRow(*problem, *impl, "bwd", "unsupported", s);
        }
        continue;
      }
      const std::vector<int> worlds = impl->is_ring() ? c.worlds : std::vector<int>{1};
      for (int world : worlds) RunForward(*impl, *problem, world, state);
      if (!c.backward) continue;
      if (!impl->has_backward()) {
        EmitStatusRow(*problem, *impl, "bwd", "not_available",
                      absl::UnimplementedError(
                          absl::StrCat(std::string(impl->name()), ": no backward in this build")));
        continue;
      }
      if (absl::Status s = impl->SupportsBackward(*problem); !s.ok()) {
        EmitStatusRow(*problem, *impl, "bwd", "unsupported", s);
        continue;
      }
      for (int world : worlds) RunBackward(*impl, *problem, world, state);
    }
  }

  JsonObject RowStart(const Problem& problem, const Implementation& impl, std::string_view pass,
                      std::string_view status) const {
    JsonObject row = CaseFields(problem);
    row.Add("type", "run").Add("pass", pass).Add("impl", impl.name());
    row.Add("placement", PlacementName(impl.placement())).Add("ring", impl.is_ring());
    row.Add("status", status);
    return row;
  }

  // A row for a run that did not happen; `world` is the ring size it was for, or 0 for every
  // size (the implementation or the case as a whole).
  void EmitStatusRow(const Problem& problem, const Implementation& impl, std::string_view pass,
                     std::string_view status, const absl::Status& why, int world = 0) {
    if (status == "not_available") ++summary_.not_available;
    if (status == "unsupported") ++summary_.unsupported;
    JsonObject row = RowStart(problem, impl, pass, status);
    if (world > 0) {
      row.Add("world", world);
    } else {
      row.AddNull("world");
    }
    row.Add("message", StatusMessage(why));
    Emit(row);
    const std::string at = world > 0 ? absl::StrFormat(" W=%d", world) : "";
    log_ << absl::StrFormat("   %-15s %s%s %s: %s\n", std::string(impl.name()), pass, at, status,
                            StatusMessage(why));
  }

  // A case this machine cannot run (it needs more GPUs): a case line and, per implementation
  // and pass, a not_available row with the reason; no inputs are made.
  void SkipCase(const ComparisonCase& c, const std::vector<std::unique_ptr<Implementation>>& impls,
                const absl::Status& why) {
    log_ << "   skipped: " << why.message() << "\n";
    absl::StatusOr<Problem> shape = DescribeProblem(c);
    if (!shape.ok()) {
      log_ << "   error: " << shape.status() << "\n";
      ++summary_.errors;
      return;
    }
    JsonObject case_json = CaseFields(*shape);
    case_json.Add("type", "case").Add("flops", shape->forward_flops()).Add("worlds", c.worlds);
    case_json.Add("reference", "skipped").Add("reference_note", StatusMessage(why));
    Emit(case_json);
    for (const auto& impl : impls) {
      EmitStatusRow(*shape, *impl, "fwd", "not_available", why);
      if (c.backward && impl->has_backward()) {
        EmitStatusRow(*shape, *impl, "bwd", "not_available", why);
      }
    }
  }

  void EmitErrorRow(const Problem& problem, const Implementation& impl, std::string_view pass,
                    int world, const absl::Status& error) {
    if (absl::IsUnimplemented(error) || absl::IsUnavailable(error)) {
      EmitStatusRow(problem, impl, pass, "not_available", error, world);
      return;
    }
    ++summary_.errors;
    JsonObject row = RowStart(problem, impl, pass, "error");
    row.Add("world", world).Add("message", error.ToString()).Add("check", "fail");
    Emit(row);
    log_ << absl::StrFormat("   %-15s %s W=%d ERROR: %s\n", std::string(impl.name()), pass, world,
                            error.ToString());
  }

  // Records a check result and returns its name.
  std::string Tally(bool checked, const std::vector<std::string>& failures) {
    ++summary_.runs;
    if (!checked) {
      ++summary_.unchecked;
      return "unchecked";
    }
    if (failures.empty()) {
      ++summary_.passed;
      return "pass";
    }
    ++summary_.failed;
    return "fail";
  }

  void RunForward(Implementation& impl, const Problem& problem, int world, CaseState& st) {
    const ComparisonCase& c = problem.spec;
    absl::StatusOr<ForwardRun> run = impl.Forward(problem, world, Repeats{c.warmup, c.repeats});
    if (!run.ok()) {
      EmitErrorRow(problem, impl, "fwd", world, run.status());
      return;
    }
    const bool is_baseline = st.baseline.empty() && !impl.is_ring();
    if (is_baseline) {
      st.baseline = std::string(impl.name());
      st.baseline_placement = impl.placement();
      st.baseline_memory = run->memory.peak_bytes;
      st.baseline_out = ToFloat(run->out, c.dtype);
      st.baseline_lse = run->lse;
    }
    JsonObject row = RowStart(problem, impl, "fwd", "ok");
    row.Add("world", world);
    const double flops = problem.forward_flops();
    const LatencyStats latency = SummarizeLatency(run->seconds);
    const LatencyStats wall = SummarizeLatency(run->wall_seconds);
    const Throughput tp = ThroughputOf(flops, problem.tokens(), latency.p50);
    row.Add("flops", flops).Add("tokens", problem.tokens()).Add("timer", run->timer);
    row.Add("latency_s", ToJson(latency)).Add("wall_p50_s", wall.p50);
    AddThroughput(tp, impl.Gpus(world), row);

    JsonObject memory = MemoryJson(run->memory);
    const bool same_space = !st.baseline.empty() && impl.placement() == st.baseline_placement;
    if (same_space && st.baseline_memory > 0 && run->memory.peak_bytes >= 0) {
      memory.Add("baseline", st.baseline);
      memory.Add("overhead_vs_baseline",
                 static_cast<double>(run->memory.peak_bytes) / st.baseline_memory - 1.0);
    } else {
      memory.AddNull("overhead_vs_baseline");
    }
    row.Add("memory", memory);

    // Errors: against fp64 when computed, else against the baseline (not for the baseline).
    const Tolerances seed = SeedTolerances();
    std::vector<std::string> failures;
    bool checked = false;
    JsonObject errors;
    ErrorStats out_err, lse_err;
    if (st.reference) {
      out_err = Compare(run->out, c.dtype, st.reference->o);
      lse_err = Compare(run->lse, st.reference->lse);
      const Tolerances tol = Tool(c.dtype);
      Check("out vs fp64", out_err, tol.out, "tool", &failures);
      Check("out vs fp64", out_err, seed.out, "seed (SEED.md)", &failures);
      Check("lse vs fp64", lse_err, tol.lse, "tool", &failures);
      errors.Add("against", "fp64_reference").Add("tolerance_out", ToJson(tol.out));
      errors.Add("tolerance_lse", ToJson(tol.lse));
      checked = true;
    } else if (!is_baseline && !st.baseline.empty()) {
      out_err = Compare(run->out, c.dtype, st.baseline_out);
      lse_err = Compare(run->lse, st.baseline_lse);
      const Tolerances tol = Baseline(c.dtype);
      Check("out vs baseline", out_err, tol.out, "baseline", &failures);
      Check("out vs baseline", out_err, seed.out, "seed (SEED.md)", &failures);
      Check("lse vs baseline", lse_err, tol.lse, "baseline", &failures);
      errors.Add("against", absl::StrCat("baseline:", st.baseline));
      errors.Add("tolerance_out", ToJson(tol.out)).Add("tolerance_lse", ToJson(tol.lse));
      checked = true;
    } else {
      errors.Add("against", "none");
    }
    if (checked) errors.Add("out", ToJson(out_err)).Add("lse", ToJson(lse_err));
    // Against the baseline as well, for information, when fp64 was the check.
    if (st.reference && !is_baseline && !st.baseline.empty()) {
      errors.Add("baseline", st.baseline);
      errors.Add("out_vs_baseline", ToJson(Compare(run->out, c.dtype, st.baseline_out)));
    }
    row.Add("errors", errors);

    std::string hidden = "";
    if (impl.is_ring()) {
      const RingSummary ring = SummarizeRing(run->ring);
      row.Add("ring_steps", ToJson(ring));
      if (world > 1) hidden = absl::StrFormat(" hidden %4.1f%%", 100 * ring.hidden_share);
    }
    const std::string check = Tally(checked, failures);
    row.Add("check", check).Add("failures", failures).Add("is_baseline", is_baseline);
    Emit(row);

    log_ << absl::StrFormat(
        "   %-15s fwd W=%d p50 %9.3f ms  %8.3f TFLOP/s  mem %8.1f MiB%s%s  out max_abs %.2e "
        "rel_l2 %.2e (%s)  %s\n",
        std::string(impl.name()), world, latency.p50 * 1e3, tp.tflops,
        run->memory.peak_bytes / 1048576.0, PerGpuLabel(run->memory), hidden, out_err.max_abs,
        out_err.rel_l2, std::string(AgainstLabel(checked, st.reference.has_value(), is_baseline)),
        check);
    for (const std::string& f : failures) log_ << "      FAIL: " << f << "\n";
  }

  void RunBackward(Implementation& impl, const Problem& problem, int world, CaseState& st) {
    const ComparisonCase& c = problem.spec;
    absl::StatusOr<BackwardRun> run = impl.Backward(problem, world, Repeats{c.warmup, c.repeats});
    if (!run.ok()) {
      EmitErrorRow(problem, impl, "bwd", world, run.status());
      return;
    }
    const double flops = kBackwardFlopsPerForward * problem.forward_flops();
    if (!st.reference_grads_tried) {
      st.reference_grads_tried = true;
      if (flops <= options_.cases.reference_flop_limit) {
        const Clock::time_point t0 = Clock::now();
        st.reference_grads = ReferenceBackward(problem);
        st.reference_grads_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
        if (!st.reference_grads.ok() && !absl::IsUnimplemented(st.reference_grads.status())) {
          ++summary_.errors;
          log_ << "   fp64 reference backward failed: " << st.reference_grads.status() << "\n";
        }
      } else {
        st.reference_grads = absl::OutOfRangeError(absl::StrFormat(
            "fp64 reference backward skipped: %.3g backward FLOPs over the limit %.3g", flops,
            options_.cases.reference_flop_limit));
      }
    }
    const bool is_baseline = st.grad_baseline.empty() && !impl.is_ring();
    if (is_baseline) {
      st.grad_baseline = std::string(impl.name());
      st.baseline_dq = run->grads.dq;
      st.baseline_dk = run->grads.dk;
      st.baseline_dv = run->grads.dv;
    }
    JsonObject row = RowStart(problem, impl, "bwd", "ok");
    row.Add("world", world);
    const LatencyStats latency = SummarizeLatency(run->seconds);
    const Throughput tp = ThroughputOf(flops, problem.tokens(), latency.p50);
    row.Add("flops", flops).Add("tokens", problem.tokens()).Add("timer", run->timer);
    row.Add("latency_s", ToJson(latency));
    row.Add("wall_p50_s", SummarizeLatency(run->wall_seconds).p50);
    AddThroughput(tp, impl.Gpus(world), row);
    std::string hidden;
    if (impl.is_ring()) {
      const RingSummary ring = SummarizeRing(run->ring);
      row.Add("ring_steps", ToJson(ring));
      if (world > 1) hidden = absl::StrFormat(" hidden %4.1f%%", 100 * ring.hidden_share);
    }
    row.Add("memory", MemoryJson(run->memory));

    std::vector<std::string> failures;
    bool checked = false;
    JsonObject errors;
    const Tolerances seed = SeedTolerances();
    ErrorStats e[3];
    const std::vector<float>* got[3] = {&run->grads.dq, &run->grads.dk, &run->grads.dv};
    const char* names[3] = {"dq", "dk", "dv"};
    if (st.reference_grads_tried && st.reference_grads.ok()) {
      const std::vector<double>* ref[3] = {&st.reference_grads->dq, &st.reference_grads->dk,
                                           &st.reference_grads->dv};
      const Tolerances tol = Tool(c.dtype);
      for (int i = 0; i < 3; ++i) {
        e[i] = Compare(*got[i], *ref[i]);
        Check(absl::StrCat(names[i], " vs fp64"), e[i], ScaledToReference(tol.grad, MaxAbs(*ref[i])),
              "tool", &failures);
        Check(absl::StrCat(names[i], " vs fp64"), e[i], seed.grad, "seed (SEED.md)", &failures);
      }
      errors.Add("against", "fp64_reference").Add("tolerance_grad", ToJson(tol.grad));
      errors.Add("reference_seconds", st.reference_grads_seconds);
      checked = true;
    } else if (!is_baseline && !st.grad_baseline.empty()) {
      errors.Add("reference_note", StatusMessage(st.reference_grads.status()));
      const std::vector<float>* ref[3] = {&st.baseline_dq, &st.baseline_dk, &st.baseline_dv};
      const Tolerances tol = Baseline(c.dtype);
      for (int i = 0; i < 3; ++i) {
        e[i] = Compare(*got[i], *ref[i]);
        Check(absl::StrCat(names[i], " vs baseline"), e[i],
              ScaledToReference(tol.grad, MaxAbs(*ref[i])), "baseline", &failures);
        Check(absl::StrCat(names[i], " vs baseline"), e[i], seed.grad, "seed (SEED.md)", &failures);
      }
      errors.Add("against", absl::StrCat("baseline:", st.grad_baseline));
      errors.Add("tolerance_grad", ToJson(tol.grad));
      checked = true;
    } else {
      errors.Add("against", "none");
      errors.Add("reference_note", StatusMessage(st.reference_grads.status()));
    }
    if (checked) {
      for (int i = 0; i < 3; ++i) errors.Add(names[i], ToJson(e[i]));
    }
    const std::string_view errors_against =
        AgainstLabel(checked, st.reference_grads.ok(), is_baseline);
    row.Add("errors", errors);
    const std::string check = Tally(checked, failures);
    row.Add("check", check).Add("failures", failures).Add("is_baseline", is_baseline);
    Emit(row);
    log_ << absl::StrFormat(
        "   %-15s bwd W=%d p50 %9.3f ms  %8.3f TFLOP/s  mem %8.1f MiB%s%s  dq/dk/dv max_abs "
        "%.2e/%.2e/%.2e (%s)  %s\n",
        std::string(impl.name()), world, latency.p50 * 1e3, tp.tflops,
        run->memory.peak_bytes / 1048576.0, PerGpuLabel(run->memory), hidden, e[0].max_abs,
        e[1].max_abs, e[2].max_abs, std::string(errors_against), check);
    for (const std::string& f : failures) log_ << "      FAIL: " << f << "\n";
  }

  const ComparisonOptions& options_;
  std::ostream& log_;
  std::ostream& results_;
  ComparisonSummary summary_;
};

}  // namespace

absl::StatusOr<ComparisonSummary> RunComparison(const ComparisonOptions& options,
                                                std::ostream& log) {
  std::error_code ec;
  std::filesystem::create_directories(options.out_dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create output directory '", options.out_dir, "': ", ec.message()));
  }
  const std::string path = (std::filesystem::path(options.out_dir) / "results.jsonl").string();
  std::ofstream results(path, std::ios::trunc);
  if (!results) {
    return absl::FailedPreconditionError(absl::StrCat("cannot write '", path, "'"));
  }
  const std::vector<std::string>& names = options.implementations.empty()
                                              ? options.cases.default_implementations
                                              : options.implementations;
  Runner runner(options, log, results);
  if (absl::Status s = runner.Run(names); !s.ok()) return s;
  results.close();
  if (!results) return absl::DataLossError(absl::StrCat("writing '", path, "' failed"));
  ComparisonSummary summary = runner.summary();
  summary.results_path = path;
  return summary;
}

}  // namespace ringattn::compare
