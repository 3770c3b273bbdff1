// The implementations the comparison puts side by side, behind one interface, and the registry
// that makes them by name.
//
// An Implementation computes the forward (and, where it has one, the backward) of a whole-sequence
// problem held in host memory, at a given world size, and times it; it hands back the whole
// output in host memory so that the comparison can take its error against the fp64 reference.
// Where it runs (host or device), how it shards and how it times are its own business.
//
// Built in (BuiltinImplementations):
//   single_cpu    the fast CPU kernel ("cpu" backend) on the whole sequence; the baseline
//                 without a GPU. Backward: the fast CPU backward.
//   ring_cpu      the ring forward (RunRingInProcess) with the "cpu" backend, W ranks as
//                 threads. Backward: the ring backward (RunRingBackwardInProcess).
//   single_cudnn  cuDNN's fused attention ("cudnn" backend) on the whole sequence; the baseline
//                 on a GPU
//   single_cuda   our CUDA kernel ("cuda" backend) on the whole sequence
//   ring_cudnn    the device ring (DeviceInProcessRing) with the "cudnn" backend, W ranks
//                 in-process on one GPU
//   ring_cuda     the device ring with the "cuda" backend, W ranks in-process on one GPU
//   ring_nccl_cudnn  the device ring over NCCL with the "cudnn" backend: W ranks as threads of
//                 this process, rank r on GPU r (needs W GPUs; with fewer a run reports
//                 "not available: needs W GPUs, found N")
//   ring_nccl_cuda   the same with the "cuda" backend
// Backward: the single-device GPU ones run the "cuda" / "cudnn" backward backend, the rings
// the device ring backward (in-process, or over NCCL), each after one untimed forward.
// The GPU implementations live in gpu_implementations.cc. Each piece is compiled in when its
// CMake target is in the build (ringattn_config.h says which); an
// implementation whose piece is missing is still registered and reports "not available" with
// the reason, as do the backwards without their libraries.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bench/compare/cases.h"
#include "bench/compare/metrics.h"
#include "kernels/attention_params.h"
#include "ring/layout.h"
#include "ring/ring_step.h"

namespace ringattn::compare {

enum class Placement { kHost, kDevice };
std::string_view PlacementName(Placement placement);

// One case's inputs, whole sequence, host memory, made once and read by every implementation.
// Inputs are synthetic (worker/ring/synthetic_inputs.h): values in [-1, 1) rounded to the dtype.
struct Problem {
  ComparisonCase spec;
  Layout layout = Layout::kContiguous;  // "auto" resolved
  std::vector<float> alibi_slopes;      // [heads], or empty
  std::vector<std::byte> q;             // [batch, seqlen, heads, head_dim], spec.dtype
  std::vector<std::byte> k;             // [batch, seqlen, heads_k, head_dim], spec.dtype
  std::vector<std::byte> v;             // [batch, seqlen, heads_k, head_dim], spec.dtype
  std::vector<std::byte> dout;  // [batch, seqlen, heads, head_dim], spec.dtype; empty unless
                                // a backward is measured (the loss is sum(out * dout))

  // Whole-sequence params over the host tensors above (contiguous strides, default softmax
  // scale, the case's options); o and lse are null.
  AttentionParams Params() const;
  // The ring's options for the same problem.
  RingAttentionOptions RingOptions() const;
  double forward_flops() const;  // ForwardFlops (kernels/params_check.h)
  int64_t tokens() const { return static_cast<int64_t>(spec.batch) * spec.seqlen; }
  int64_t out_elements() const;  // batch * seqlen * heads * head_dim
  int64_t lse_elements() const;  // batch * heads * seqlen
  int64_t input_bytes() const { return static_cast<int64_t>(q.size() + k.size() + v.size()); }
};

// Makes the inputs of `spec` (validated) from `seed`; the upstream gradient only with
// `with_grad_output`.
absl::StatusOr<Problem> MakeProblem(const ComparisonCase& spec, uint64_t seed,
                                    bool with_grad_output);
// The problem of `spec` (validated, layout resolved, ALiBi slopes made) without its tensors:
// enough to describe a case that is not run.
absl::StatusOr<Problem> DescribeProblem(const ComparisonCase& spec);

struct Repeats {
  int warmup = 1;   // untimed calls first (graph builds, caches, page faults)
  int repeats = 5;  // timed calls
};

struct ForwardRun {
  std::vector<std::byte> out;  // [batch, seqlen, heads, head_dim], spec.dtype, host
  std::vector<float> lse;      // [batch, heads, seqlen], host
  // Per timed call, the latency the comparison quotes: for a single-device run the call, for a
  // ring the slowest rank's ring time (scatter and gather of the whole sequence excluded).
  std::vector<double> seconds;
  // Per timed call, host wall time around the call, synchronised: the CPU ring's includes its
  // scatter to shards and gather; a device run's includes launch and synchronisation (the
  // device ring's inputs are on the device already).
  std::vector<double> wall_seconds;
  std::string timer;  // what measured `seconds`: "steady_clock" or "cuda_event"
  std::vector<std::vector<RingTimings>> ring;  // [timed call][rank]; rings only
  MemoryUse memory;
};

// Gradients of sum(out * dout) with respect to q, k and v, whole sequence, host memory, fp32 as
// the backward kernels produce them.
struct Gradients {
  std::vector<float> dq;  // [batch, seqlen, heads, head_dim]
  std::vector<float> dk;  // [batch, seqlen, heads_k, head_dim]
  std::vector<float> dv;  // [batch, seqlen, heads_k, head_dim]
};

struct BackwardRun {
  Gradients grads;
  // Per timed call of the backward (the forward it needs runs once, untimed), as ForwardRun.
  std::vector<double> seconds;
  std::vector<double> wall_seconds;
  std::string timer;
  std::vector<std::vector<RingTimings>> ring;  // [timed call][rank]; rings only
  MemoryUse memory;
};

class Implementation {
 public:
  virtual ~Implementation() = default;

  virtual std::string_view name() const = 0;
  virtual std::string_view description() const = 0;
  virtual Placement placement() const = 0;
  // A ring runs at every world size of a case; anything else at world size 1 only.
  virtual bool is_ring() const = 0;
  // OK when it can run in this build on this machine; otherwise Unavailable or Unimplemented
  // saying why (reported as "not available", not a failure).
  virtual absl::Status Available() const = 0;
  // OK when it computes `problem`'s options; otherwise InvalidArgument naming what it does not
  // (reported as "unsupported", not a failure). Anything Forward refuses beyond this is an error.
  virtual absl::Status Supports(const Problem& /*problem*/) const { return absl::OkStatus(); }
  // The same for Backward (asked only when Supports is OK and has_backward()).
  virtual absl::Status SupportsBackward(const Problem& /*problem*/) const {
    return absl::OkStatus();
  }
  // GPUs a run at `world` occupies: 0 on the host, 1 on one GPU (single device, or a ring of
  // in-process ranks sharing it), `world` for a ring with a GPU per rank. The report divides
  // throughput by it (TFLOP/s per GPU).
  virtual int Gpus(int /*world*/) const { return placement() == Placement::kDevice ? 1 : 0; }

  // warmup + repeats calls on `problem` with `world` ranks (1 for a single-device run); returns
  // the last call's output.
  virtual absl::StatusOr<ForwardRun> Forward(const Problem& problem, int world,
                                             const Repeats& repeats) = 0;

  // Whether Backward computes gradients in this build.
  virtual bool has_backward() const { return false; }
  // Gradients of sum(out * problem.dout); Unimplemented unless has_backward().
  virtual absl::StatusOr<BackwardRun> Backward(const Problem& problem, int world,
                                               const Repeats& repeats);
};

// The fp64 reference gradients the backward errors are taken against.
struct ReferenceGradients {
  std::vector<double> dq, dk, dv;  // contiguous, shaped like Gradients
};
// The fp64 reference backward (kernels/cpu/reference_backward.h) of the whole problem;
// Unimplemented in a build without the CPU backward library (gradient errors are then taken
// against the baseline implementation's gradients).
absl::StatusOr<ReferenceGradients> ReferenceBackward(const Problem& problem);

// Implementations by name, in registration order.
class ImplementationRegistry {
 public:
  using Factory = std::function<std::unique_ptr<Implementation>()>;

  void Add(std::string name, Factory factory);
  std::vector<std::string> Names() const;
  // InvalidArgument listing the registered names for an unknown one.
  absl::StatusOr<std::unique_ptr<Implementation>> Make(std::string_view name) const;

 private:
  std::vector<std::pair<std::string, Factory>> entries_;
};

// The eight implementations listed at the top of this file.
ImplementationRegistry BuiltinImplementations();

// This machine as the report names it: hardware threads, and the CUDA devices (count; name,
// SMs and memory of device 0) or why there is none.
std::string MachineDescription();

// CUDA devices this process sees; 0 without CUDA in the build or without a device (never an
// error: the comparison only counts them, e.g. to skip a case that needs more GPUs).
int VisibleGpuCount();

}  // namespace ringattn::compare
