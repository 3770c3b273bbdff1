// The GPU implementations of the comparison (implementations.h lists them): one kernel on the
// whole sequence (single_*), the device ring with W in-process ranks on one GPU (ring_*), and
// the device ring over NCCL with a GPU per rank (ring_nccl_*), each with the "cuda" (ours) or
// the "cudnn" kernel, forward and backward.
//
// Timing: a single-device call between CUDA events on its stream; a ring call by the slowest
// rank's host wall time of the call (each rank waits for its streams before returning), its
// per-step compute and communication wait from the ring's own CUDA events. The backward of each
// runs after one untimed forward of the same implementation, for its out and LSE.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "bench/compare/implementations.h"
#include "bench/compare/implementations_internal.h"
#include "bench/compare/metrics.h"
#include "kernels/attention_backward_params.h"
#include "ring/layout.h"
#include "ring/ring_step.h"
#include "ring/testing/inprocess_ranks.h"  // BackendFactory
#include "ringattn_config.h"

#if RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "base/cuda_check.h"
#include "kernels/backend_registry.h"
#include "kernels/cuda/flash_bwd.h"
#include "ring/device_ring.h"
#if RINGATTN_HAVE_CUDNN
#include "kernels/cudnn/cudnn_backend.h"
#include "kernels/cudnn/cudnn_backward.h"
#endif
#if RINGATTN_HAVE_NCCL
#include "ring/transport/transport_registry.h"
#endif
#endif  // RINGATTN_HAVE_CUDA

namespace ringattn::compare {
namespace internal {
namespace {

constexpr std::string_view kSingleCudnnDescription =
    "cuDNN's fused flash attention (backend \"cudnn\", forward and backward) on the whole "
    "sequence; the baseline on a GPU";
constexpr std::string_view kSingleCudaDescription =
    "our CUDA kernels (backend \"cuda\": FlashAttention-2 schedule, mma.sync; forward and "
    "backward) on the whole sequence";
constexpr std::string_view kRingCudnnDescription =
    "the device ring with the \"cudnn\" backend on every rank: W ranks in-process on one GPU, "
    "K/V (and in the backward dK/dV) by device-to-device copies on separate streams";
constexpr std::string_view kRingCudaDescription =
    "the device ring with the \"cuda\" backend on every rank: W ranks in-process on one GPU, "
    "K/V (and in the backward dK/dV) by device-to-device copies on separate streams";
constexpr std::string_view kRingNcclCudnnDescription =
    "the device ring over NCCL with the \"cudnn\" backend: W ranks as threads of one process, "
    "rank r on GPU r, K/V (and dK/dV) by NCCL send/recv; needs W GPUs";
constexpr std::string_view kRingNcclCudaDescription =
    "the device ring over NCCL with the \"cuda\" backend: W ranks as threads of one process, "
    "rank r on GPU r, K/V (and dK/dV) by NCCL send/recv; needs W GPUs";

// One kernel as the GPU implementations use it: the registered backend that runs it (forward
// and, where its capabilities say so, backward) and what it computes.
struct GpuKernel {
  std::string backend;  // registered name (backend_registry.h)
  // InvalidArgument naming what the forward does not compute (checked on the whole problem).
  std::function<absl::Status(const AttentionParams&)> supports;
  std::function<absl::Status(const AttentionBackwardParams&)> backward_supports;
};

#if RINGATTN_HAVE_CUDA

// ---- Devices and buffers --------------------------------------------------------------------

int CountGpus() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" error; no device is an answer
    return 0;
  }
  return count;
}

absl::Status CudaDevicePresent() {
  if (CountGpus() == 0) return absl::UnavailableError("no CUDA device on this machine");
  return absl::OkStatus();
}

// For destructors, which cannot return a status.
void ReportCudaError(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "ringattn_compare: %s failed: %s\n", what, cudaGetErrorString(e));
  }
}

// Device memory owned for one run; freed on destruction, on the device that allocated it (a
// ring over several GPUs frees every rank's shard from one thread).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ == nullptr) return;
    int current = -1;
    ReportCudaError(cudaGetDevice(&current), "cudaGetDevice");
    if (current != device_) ReportCudaError(cudaSetDevice(device_), "cudaSetDevice");
    ReportCudaError(cudaFree(ptr_), "cudaFree");
    if (current >= 0 && current != device_) {
      ReportCudaError(cudaSetDevice(current), "cudaSetDevice");
    }
  }
  // On the current device; once per buffer.
  absl::Status Allocate(size_t bytes) {
    RA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device_));
    RA_CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr_, bytes == 0 ? 1 : bytes));
    return absl::OkStatus();
  }
  absl::Status Upload(const void* host, size_t bytes) {
    RA_RETURN_IF_ERROR(Allocate(bytes));
    RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice));
    return absl::OkStatus();
  }
  void* get() const { return ptr_; }
  float* floats() const { return static_cast<float*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  int device_ = -1;
};

// A stream and a pair of timing events; destroyed with the run.
class TimedStream {
 public:
  TimedStream() = default;
  TimedStream(const TimedStream&) = delete;
  TimedStream& operator=(const TimedStream&) = delete;
  ~TimedStream() {
    if (start_ != nullptr) ReportCudaError(cudaEventDestroy(start_), "cudaEventDestroy");
    if (stop_ != nullptr) ReportCudaError(cudaEventDestroy(stop_), "cudaEventDestroy");
    if (stream_ != nullptr) ReportCudaError(cudaStreamDestroy(stream_), "cudaStreamDestroy");
  }
  absl::Status Create() {
    RA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    RA_CUDA_RETURN_IF_ERROR(cudaEventCreate(&start_));
    RA_CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop_));
    return absl::OkStatus();
  }
  cudaStream_t stream() const { return stream_; }
  cudaEvent_t start() const { return start_; }
  cudaEvent_t stop() const { return stop_; }

 private:
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// Used memory of GPUs 0 .. gpus-1, each after a device synchronise (so that what finished work
// freed counts as free); the context is made first, so that it is not counted as the run's.
absl::StatusOr<std::vector<int64_t>> UsedBytesPerGpu(int gpus) {
  std::vector<int64_t> used;
  for (int g = 0; g < gpus; ++g) {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(g));
    RA_CUDA_RETURN_IF_ERROR(cudaFree(nullptr));
    RA_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    size_t free_bytes = 0, total_bytes = 0;
    RA_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
    used.push_back(static_cast<int64_t>(total_bytes - free_bytes));
  }
  return used;
}

// A run's memory: the growth of used memory on each GPU since `before` (UsedBytesPerGpu of the
// same GPUs), buffers still held. Leaves GPU 0 current.
absl::StatusOr<MemoryUse> MemoryGrowthSince(const std::vector<int64_t>& before) {
  const int gpus = static_cast<int>(before.size());
  RA_ASSIGN_OR_RETURN(const std::vector<int64_t> after, UsedBytesPerGpu(gpus));
  RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  MemoryUse m{"device", std::string(kDeviceMemoryMethod), 0, {}};
  for (int g = 0; g < gpus; ++g) m.peak_bytes += after[g] - before[g];
  if (gpus > 1) {
    m.method = std::string(kMultiGpuMemoryMethod);
    for (int g = 0; g < gpus; ++g) m.per_gpu_bytes.push_back(after[g] - before[g]);
  }
  return m;
}

// ---- Shards on the device -------------------------------------------------------------------

// One rank's shard on its device, rows in the plan's local order (for a single-device run, the
// whole sequence: a one-rank contiguous plan).
struct DeviceShard {
  int64_t rows = 0;
  DeviceBuffer q, out, dout;  // [batch, rows, heads, head_dim], dtype
  DeviceBuffer k, v;          // [batch, rows, heads_k, head_dim], dtype
  DeviceBuffer lse;           // [batch, heads, rows] fp32
  DeviceBuffer dq;            // [batch, rows, heads, head_dim] fp32; backward only
  DeviceBuffer dk, dv;        // [batch, rows, heads_k, head_dim] fp32; backward only
};

// Bytes of one sequence row of q (out, dout) and of k (v), and of their fp32 gradients.
struct RowBytes {
  size_t q, kv, dq, dkv;

  static RowBytes Of(const ComparisonCase& c) {
    const size_t q_elems = static_cast<size_t>(c.heads) * c.head_dim;
    const size_t kv_elems = static_cast<size_t>(c.kv_heads()) * c.head_dim;
    const size_t es = DTypeSize(c.dtype);
    return {q_elems * es, kv_elems * es, q_elems * sizeof(float), kv_elems * sizeof(float)};
  }
};

// Allocates rank's shard on the current device and uploads q, k and v (with `backward` also
// dout, and the gradients allocated); out and lse are allocated, not written.
absl::Status UploadShard(const Problem& problem, const ShardPlan& plan, int rank, bool backward,
                         DeviceShard* d) {
  const ComparisonCase& c = problem.spec;
  const RowBytes rb = RowBytes::Of(c);
  const int64_t rows = plan.shards[rank].rows;
  d->rows = rows;
  std::vector<std::byte> staging;
  const auto upload = [&](const std::vector<std::byte>& whole, size_t row_bytes,
                          DeviceBuffer* dst) {
    staging.resize(static_cast<size_t>(c.batch) * rows * row_bytes);
    ExtractShard(plan, rank, whole.data(), c.batch, row_bytes, staging.data());
    return dst->Upload(staging.data(), staging.size());
  };
  RA_RETURN_IF_ERROR(upload(problem.q, rb.q, &d->q));
  RA_RETURN_IF_ERROR(upload(problem.k, rb.kv, &d->k));
  RA_RETURN_IF_ERROR(upload(problem.v, rb.kv, &d->v));
  RA_RETURN_IF_ERROR(d->out.Allocate(static_cast<size_t>(c.batch) * rows * rb.q));
  RA_RETURN_IF_ERROR(d->lse.Allocate(static_cast<size_t>(c.batch) * c.heads * rows * 4));
  if (!backward) return absl::OkStatus();
  if (problem.dout.empty()) return absl::FailedPreconditionError("the problem has no dout");
  RA_RETURN_IF_ERROR(upload(problem.dout, rb.q, &d->dout));
  RA_RETURN_IF_ERROR(d->dq.Allocate(static_cast<size_t>(c.batch) * rows * rb.dq));
  RA_RETURN_IF_ERROR(d->dk.Allocate(static_cast<size_t>(c.batch) * rows * rb.dkv));
  RA_RETURN_IF_ERROR(d->dv.Allocate(static_cast<size_t>(c.batch) * rows * rb.dkv));
  return absl::OkStatus();
}

// Every rank's shard: on GPU 0 (in-process ranks) or rank r's on GPU r (`gpu_per_rank`).
absl::Status UploadShards(const Problem& problem, const ShardPlan& plan, bool backward,
                          bool gpu_per_rank, std::vector<DeviceShard>* shards) {
  for (int r = 0; r < plan.world; ++r) {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(gpu_per_rank ? r : 0));
    RA_RETURN_IF_ERROR(UploadShard(problem, plan, r, backward, &(*shards)[r]));
  }
  return absl::OkStatus();
}

// Copies `bytes` of `src` (device) to host and writes them as rank's rows of `whole`, viewed as
// [outer, seqlen, row_bytes].
absl::Status DownloadRows(const ShardPlan& plan, int rank, const DeviceBuffer& src, size_t bytes,
                          int64_t outer, size_t row_bytes, void* whole) {
  std::vector<std::byte> host(bytes);
  RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(host.data(), src.get(), bytes, cudaMemcpyDeviceToHost));
  InsertShard(plan, rank, host.data(), outer, row_bytes, whole);
  return absl::OkStatus();
}

// Every rank's out and lse into the whole-sequence run.out and run.lse (sized here); the
// shards are on GPU 0 or, with `gpu_per_rank`, rank r's on GPU r.
absl::Status DownloadOutputs(const Problem& problem, const ShardPlan& plan,
                             const std::vector<DeviceShard>& shards, bool gpu_per_rank,
                             ForwardRun* run) {
  const ComparisonCase& c = problem.spec;
  const RowBytes rb = RowBytes::Of(c);
  const int64_t lse_outer = static_cast<int64_t>(c.batch) * c.heads;
  run->out.resize(problem.q.size());
  run->lse.resize(problem.lse_elements());
  for (int r = 0; r < plan.world; ++r) {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(gpu_per_rank ? r : 0));
    const int64_t rows = shards[r].rows;
    RA_RETURN_IF_ERROR(DownloadRows(plan, r, shards[r].out, c.batch * rows * rb.q, c.batch, rb.q,
                                    run->out.data()));
    RA_RETURN_IF_ERROR(DownloadRows(plan, r, shards[r].lse, lse_outer * rows * sizeof(float),
                                    lse_outer, sizeof(float), run->lse.data()));
  }
  return absl::OkStatus();
}

// Every rank's fp32 dq, dk and dv into the whole-sequence gradients (sized here); shards placed
// as for DownloadOutputs.
absl::Status DownloadGradients(const Problem& problem, const ShardPlan& plan,
                               const std::vector<DeviceShard>& shards, bool gpu_per_rank,
                               Gradients* grads) {
  const ComparisonCase& c = problem.spec;
  const RowBytes rb = RowBytes::Of(c);
  grads->dq.resize(problem.out_elements());
  grads->dk.resize(problem.k.size() / DTypeSize(c.dtype));
  grads->dv.resize(grads->dk.size());
  for (int r = 0; r < plan.world; ++r) {
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(gpu_per_rank ? r : 0));
    const int64_t rows = shards[r].rows;
    RA_RETURN_IF_ERROR(DownloadRows(plan, r, shards[r].dq, c.batch * rows * rb.dq, c.batch, rb.dq,
                                    grads->dq.data()));
    RA_RETURN_IF_ERROR(DownloadRows(plan, r, shards[r].dk, c.batch * rows * rb.dkv, c.batch, rb.dkv,
                                    grads->dk.data()));
    RA_RETURN_IF_ERROR(DownloadRows(plan, r, shards[r].dv, c.batch * rows * rb.dkv, c.batch, rb.dkv,
                                    grads->dv.data()));
  }
  return absl::OkStatus();
}

// The ring's view of a shard: forward (q, k, v in; out, lse out).
RingShardTensors ForwardView(const Problem& problem, const DeviceShard& d) {
  const ComparisonCase& c = problem.spec;
  RingShardTensors t;
  t.dtype = c.dtype;
  t.batch = c.batch;
  t.heads = c.heads;
  t.heads_k = c.kv_heads();
  t.head_dim = c.head_dim;
  t.q = d.q.get();
  t.k = d.k.get();
  t.v = d.v.get();
  t.out = d.out.get();
  t.lse = d.lse.floats();
  return t;
}

// view(problem, shard) of every shard, [world]: ForwardView or BackwardView.
template <typename ViewOf>
auto Views(const Problem& problem, const std::vector<DeviceShard>& shards, ViewOf view) {
  std::vector<decltype(view(problem, shards.front()))> views;
  for (const DeviceShard& d : shards) views.push_back(view(problem, d));
  return views;
}

std::vector<RingShardTensors> ForwardViews(const Problem& problem,
                                           const std::vector<DeviceShard>& shards) {
  return Views(problem, shards, ForwardView);
}

// ---- Params and timing ----------------------------------------------------------------------

// The whole problem's params for a backend's support check, which validates them as a call:
// o must be non-null there, so it points at q (same shape and dtype), never read or written.
AttentionParams ParamsForValidation(const Problem& problem) {
  AttentionParams p = problem.Params();
  p.o = const_cast<void*>(p.q);
  return p;
}

// The same for the backward (host only, no tensor read): out and dout stand at q (same shape and
// dtype); lse and the fp32 gradients at a stand-in aligned as a device allocation is.
AttentionBackwardParams BackwardParamsForValidation(const Problem& problem) {
  alignas(256) static float stand_in[1];
  AttentionBackwardParams p;
  p.fwd = ParamsForValidation(problem);
  p.out = p.fwd.q;
  p.dout = p.fwd.q;
  p.out_dtype = problem.spec.dtype;
  p.lse = stand_in;
  p.dq = p.dk = p.dv = stand_in;
  SetContiguousBackwardStrides(&p);
  return p;
}

// `warmup` untimed calls of `call`, then `repeats` calls each between two CUDA events on ts's
// stream: the event time into run->seconds, the host time around it (launch and synchronisation
// included) into run->wall_seconds. Run: ForwardRun or BackwardRun.
template <typename Run>
absl::Status TimeOnStream(const TimedStream& ts, const Repeats& repeats,
                          const std::function<absl::Status()>& call, Run* run) {
  for (int i = 0; i < repeats.warmup; ++i) RA_RETURN_IF_ERROR(call());
  RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ts.stream()));
  for (int i = 0; i < repeats.repeats; ++i) {
    const Clock::time_point t0 = Clock::now();
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ts.start(), ts.stream()));
    RA_RETURN_IF_ERROR(call());
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ts.stop(), ts.stream()));
    RA_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ts.stop()));
    run->wall_seconds.push_back(SecondsSince(t0));
    float ms = 0;
    RA_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, ts.start(), ts.stop()));
    run->seconds.push_back(ms * 1e-3);
  }
  return absl::OkStatus();
}

// The ring's view of a shard: backward (q, k, v, out, lse, dout in; fp32 dq, dk, dv out).
RingBackwardTensors BackwardView(const Problem& problem, const DeviceShard& d) {
  const RingShardTensors f = ForwardView(problem, d);
  RingBackwardTensors t;
  t.dtype = f.dtype;
  t.grad_dtype = DType::kF32;
  t.batch = f.batch;
  t.heads = f.heads;
  t.heads_k = f.heads_k;
  t.head_dim = f.head_dim;
  t.q = f.q;
  t.k = f.k;
  t.v = f.v;
  t.out = f.out;
  t.lse = f.lse;
  t.dout = d.dout.get();
  t.dq = d.dq.get();
  t.dk = d.dk.get();
  t.dv = d.dv.get();
  return t;
}

std::vector<RingBackwardTensors> BackwardViews(const Problem& problem,
                                               const std::vector<DeviceShard>& shards) {
  return Views(problem, shards, BackwardView);
}

// A backend of `kernel`, from the registry.
absl::StatusOr<std::unique_ptr<AttentionBackend>> MakeKernelBackend(const GpuKernel& kernel) {
  return MakeBackend(kernel.backend);
}

// The same as the rings take it.
BackendFactory FactoryOf(const GpuKernel& kernel) {
  return [backend = kernel.backend] { return MakeBackend(backend); };
}

// What every GPU implementation shares: its name and description, the kernel it runs (forward
// and, where the backend has one, backward), and the support checks that come from it.
class GpuImplementation : public Implementation {
 public:
  GpuImplementation(std::string name, std::string_view description, GpuKernel kernel)
      : name_(std::move(name)), description_(description), kernel_(std::move(kernel)) {
    absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeKernelBackend(kernel_);
    has_backward_ = backend.ok() && (*backend)->capabilities().backward;
  }

  std::string_view name() const override { return name_; }
  std::string_view description() const override { return description_; }
  Placement placement() const override { return Placement::kDevice; }
  absl::Status Available() const override { return CudaDevicePresent(); }
  absl::Status Supports(const Problem& problem) const override {
    return kernel_.supports(ParamsForValidation(problem));
  }
  bool has_backward() const override { return has_backward_; }
  absl::Status SupportsBackward(const Problem& problem) const override {
    return kernel_.backward_supports(BackwardParamsForValidation(problem));
  }

 protected:
  const std::string name_;
  const std::string_view description_;
  const GpuKernel kernel_;
  bool has_backward_ = false;
};

// ---- Single device --------------------------------------------------------------------------

// One kernel on the whole sequence on GPU 0, timed with CUDA events around each call.
class SingleDevice final : public GpuImplementation {
 public:
  using GpuImplementation::GpuImplementation;

  bool is_ring() const override { return false; }

  absl::StatusOr<ForwardRun> Forward(const Problem& problem, int world,
                                     const Repeats& repeats) override {
    RA_RETURN_IF_ERROR(CheckWorld(world));
    RA_ASSIGN_OR_RETURN(const std::vector<int64_t> before, UsedBytesPerGpu(1));
    ForwardRun run;
    run.timer = "cuda_event";
    Whole w;
    RA_RETURN_IF_ERROR(w.Upload(problem, /*backward=*/false));
    TimedStream ts;
    RA_RETURN_IF_ERROR(ts.Create());
    RA_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackend> backend, MakeKernelBackend(kernel_));
    const ExecutionContext on_stream{ts.stream()};
    RA_RETURN_IF_ERROR(TimeOnStream(
        ts, repeats, [&] { return backend->Forward(w.params, on_stream); }, &run));
    RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ts.stream()));
    RA_ASSIGN_OR_RETURN(run.memory, MemoryGrowthSince(before));
    RA_RETURN_IF_ERROR(DownloadOutputs(problem, w.plan, w.shard, /*gpu_per_rank=*/false, &run));
    return run;
  }

  // The backend's backward on the whole sequence (D = rowsum(dO * O) computed inside each
  // call), after one untimed forward for its out and LSE (by an instance of its own, so that
  // the memory measured includes both, as two backends hold it in a training step).
  absl::StatusOr<BackwardRun> Backward(const Problem& problem, int world,
                                       const Repeats& repeats) override {
    RA_RETURN_IF_ERROR(CheckWorld(world));
    if (!has_backward_) return Implementation::Backward(problem, world, repeats);
    RA_ASSIGN_OR_RETURN(const std::vector<int64_t> before, UsedBytesPerGpu(1));
    BackwardRun run;
    run.timer = "cuda_event";
    Whole w;
    RA_RETURN_IF_ERROR(w.Upload(problem, /*backward=*/true));
    TimedStream ts;
    RA_RETURN_IF_ERROR(ts.Create());
    const ExecutionContext on_stream{ts.stream()};
    RA_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackend> forward, MakeKernelBackend(kernel_));
    RA_RETURN_IF_ERROR(forward->Forward(w.params, on_stream));
    RA_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackend> backward, MakeKernelBackend(kernel_));
    const AttentionBackwardParams bp = w.BackwardParams(problem);
    RA_RETURN_IF_ERROR(TimeOnStream(
        ts, repeats, [&] { return backward->Backward(bp, on_stream); }, &run));
    RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ts.stream()));
    RA_ASSIGN_OR_RETURN(run.memory, MemoryGrowthSince(before));
    RA_RETURN_IF_ERROR(
        DownloadGradients(problem, w.plan, w.shard, /*gpu_per_rank=*/false, &run.grads));
    return run;
  }

 private:
  // The whole problem on GPU 0 as a one-rank contiguous shard, and its params.
  struct Whole {
    ShardPlan plan;
    std::vector<DeviceShard> shard = std::vector<DeviceShard>(1);
    DeviceBuffer alibi;      // [heads] fp32, or unallocated
    AttentionParams params;  // problem.Params() over the device tensors, o and lse included

    absl::Status Upload(const Problem& problem, bool backward) {
      RA_ASSIGN_OR_RETURN(plan, PlanShards(problem.spec.seqlen, 1, Layout::kContiguous));
      RA_RETURN_IF_ERROR(UploadShards(problem, plan, backward, /*gpu_per_rank=*/false, &shard));
      params = problem.Params();
      if (!problem.alibi_slopes.empty()) {
        RA_RETURN_IF_ERROR(
            alibi.Upload(problem.alibi_slopes.data(), problem.alibi_slopes.size() * sizeof(float)));
        params.alibi_slopes = alibi.floats();
      }
      const DeviceShard& d = shard[0];
      params.q = d.q.get();
      params.k = d.k.get();
      params.v = d.v.get();
      params.o = d.out.get();
      params.lse = d.lse.floats();
      return absl::OkStatus();
    }
    // The backward of `params`: out, lse and dout in, fp32 gradients out (overwritten).
    AttentionBackwardParams BackwardParams(const Problem& problem) const {
      const DeviceShard& d = shard[0];
      AttentionBackwardParams p;
      p.fwd = params;
      p.out = d.out.get();
      p.dout = d.dout.get();
      p.out_dtype = problem.spec.dtype;
      p.lse = d.lse.floats();
      p.dq = d.dq.floats();
      p.dk = d.dk.floats();
      p.dv = d.dv.floats();
      SetContiguousBackwardStrides(&p);
      return p;
    }
  };

  absl::Status CheckWorld(int world) const {
    if (world != 1) {
      return absl::InvalidArgumentError(absl::StrCat(name_, " runs at world size 1 only"));
    }
    return absl::OkStatus();
  }
};

// ---- In-process ring on one GPU -------------------------------------------------------------

// The device ring over W in-process ranks on GPU 0 (DeviceInProcessRing, kept across the calls
// of a run; DeviceInProcessRingBackward for the backward): every rank's shard is uploaded once,
// then warmup + repeats ring calls.
class RingDevice final : public GpuImplementation {
 public:
  using GpuImplementation::GpuImplementation;

  bool is_ring() const override { return true; }

  absl::StatusOr<ForwardRun> Forward(const Problem& problem, int world,
                                     const Repeats& repeats) override {
    RA_ASSIGN_OR_RETURN(const ShardPlan plan,
                        PlanShards(problem.spec.seqlen, world, problem.layout));
    RA_ASSIGN_OR_RETURN(const std::vector<int64_t> before, UsedBytesPerGpu(1));
    ForwardRun run;
    run.timer = "steady_clock";
    std::vector<DeviceShard> shards(world);
    RA_RETURN_IF_ERROR(
        UploadShards(problem, plan, /*backward=*/false, /*gpu_per_rank=*/false, &shards));
    RA_ASSIGN_OR_RETURN(std::unique_ptr<DeviceInProcessRing> ring,
                        DeviceInProcessRing::Create(world, FactoryOf(kernel_)));
    const std::vector<RingShardTensors> views = ForwardViews(problem, shards);
    const RingAttentionOptions options = problem.RingOptions();
    RA_RETURN_IF_ERROR(TimeRingCalls(
        repeats, [&] { return ring->Run(plan, views, options); }, &run));
    RA_ASSIGN_OR_RETURN(run.memory, MemoryGrowthSince(before));
    RA_RETURN_IF_ERROR(DownloadOutputs(problem, plan, shards, /*gpu_per_rank=*/false, &run));
    return run;
  }

  // The device ring backward (DeviceInProcessRingBackward) after one untimed ring forward of
  // the same size for its out and LSE (that ring is gone before the memory is read).
  absl::StatusOr<BackwardRun> Backward(const Problem& problem, int world,
                                       const Repeats& repeats) override {
    if (!has_backward_) return Implementation::Backward(problem, world, repeats);
    RA_ASSIGN_OR_RETURN(const ShardPlan plan,
                        PlanShards(problem.spec.seqlen, world, problem.layout));
    RA_ASSIGN_OR_RETURN(const std::vector<int64_t> before, UsedBytesPerGpu(1));
    BackwardRun run;
    run.timer = "steady_clock";
    std::vector<DeviceShard> shards(world);
    RA_RETURN_IF_ERROR(
        UploadShards(problem, plan, /*backward=*/true, /*gpu_per_rank=*/false, &shards));
    const RingAttentionOptions options = problem.RingOptions();
    {
      RA_ASSIGN_OR_RETURN(std::unique_ptr<DeviceInProcessRing> forward,
                          DeviceInProcessRing::Create(world, FactoryOf(kernel_)));
      RA_RETURN_IF_ERROR(forward->Run(plan, ForwardViews(problem, shards), options).status());
    }
    RA_ASSIGN_OR_RETURN(std::unique_ptr<DeviceInProcessRingBackward> ring,
                        DeviceInProcessRingBackward::Create(world, FactoryOf(kernel_)));
    const std::vector<RingBackwardTensors> views = BackwardViews(problem, shards);
    RA_RETURN_IF_ERROR(TimeRingCalls(
        repeats, [&] { return ring->Run(plan, views, options); }, &run));
    RA_ASSIGN_OR_RETURN(run.memory, MemoryGrowthSince(before));
    RA_RETURN_IF_ERROR(
        DownloadGradients(problem, plan, shards, /*gpu_per_rank=*/false, &run.grads));
    return run;
  }
};

// ---- Ring over NCCL, a GPU per rank ---------------------------------------------------------

#if RINGATTN_HAVE_CUDA && RINGATTN_HAVE_NCCL
// How long a ring may take to form (every rank joins) and any transfer or end-of-call wait
// after (the drivers' WaitStream); a 128k-token ring call takes well under a second.
constexpr std::chrono::seconds kNcclTimeout(120);

// Unavailable unless this process sees at least `world` GPUs: NCCL refuses two ranks on one.
absl::Status EnoughGpus(int world) {
  const int found = CountGpus();
  if (found >= world) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat("needs ", world, " GPUs (one rank per GPU), found ", found));
}

// Runs fn(rank) for every rank in a thread of its own with GPU `rank` current (the current
// device is per thread); returns every rank's status, [world].
std::vector<absl::Status> RunOnEachGpu(int world, const std::function<absl::Status(int)>& fn) {
  std::vector<absl::Status> status(world);
  std::vector<std::thread> threads;
  threads.reserve(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      const cudaError_t e = cudaSetDevice(r);
      status[r] =
          e == cudaSuccess ? fn(r) : CudaErrorStatus(e, "cudaSetDevice(rank)", __FILE__, __LINE__);
    });
  }
  for (std::thread& t : threads) t.join();
  return status;
}

absl::Status FirstError(const std::vector<absl::Status>& statuses) {
  for (const absl::Status& s : statuses) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

// W NCCL communicators of one ring, rank r's on GPU r, made together (the "nccl" transport's
// local group) and kept for every later run at this W: forming a ring (bootstrap, topology
// search) takes about a second, far more than a call.
class NcclRing {
 public:
  using RankCall = std::function<absl::StatusOr<RingTimings>(int rank, DeviceCommunicator& comm)>;

  static absl::StatusOr<std::unique_ptr<NcclRing>> Create(int world) {
    std::unique_ptr<NcclRing> ring(new NcclRing());
    RA_ASSIGN_OR_RETURN(ring->comms_,
                        DeviceTransports().MakeLocalGroup("nccl", world, kNcclTimeout));
    return ring;
  }

  // Each communicator in its rank's thread on its GPU, all at once: a healthy one is finalized,
  // which may wait for its peers.
  ~NcclRing() {
    (void)RunOnEachGpu(world(), [&](int r) {
      comms_[r].reset();
      return absl::OkStatus();
    });
  }

  NcclRing(const NcclRing&) = delete;
  NcclRing& operator=(const NcclRing&) = delete;

  int world() const { return static_cast<int>(comms_.size()); }

  // Every communicator is there and reports no error.
  bool Healthy() {
    for (const std::unique_ptr<DeviceCommunicator>& c : comms_) {
      if (c == nullptr || !c->CheckHealth().ok()) return false;
    }
    return true;
  }

  // One ring call: call(r, comm) for every rank in its thread on GPU r; every rank's timings,
  // [world]. A failing rank aborts every communicator, so that the others fail at once rather
  // than wait out the timeout for its blocks (an NCCL abort reaches no peer by itself); the
  // first error by rank order is returned and the ring stays unhealthy.
  absl::StatusOr<std::vector<RingTimings>> Run(const RankCall& call) {
    std::vector<RingTimings> timings(world());
    const std::vector<absl::Status> status = RunOnEachGpu(world(), [&](int r) -> absl::Status {
      absl::StatusOr<RingTimings> t = call(r, *comms_[r]);
      if (!t.ok()) {
        for (const std::unique_ptr<DeviceCommunicator>& c : comms_) c->Abort(t.status());
        return t.status();
      }
      timings[r] = *std::move(t);
      return absl::OkStatus();
    });
    RA_RETURN_IF_ERROR(FirstError(status));
    return timings;
  }

 private:
  NcclRing() = default;
  std::vector<std::unique_ptr<DeviceCommunicator>> comms_;  // [world], comms_[r] on GPU r
};

// What one rank keeps across the calls of one run: its backends and ring workspaces, made in
// the rank's thread at its first call (a backend binds to the device current then).
struct NcclRankState {
  std::unique_ptr<AttentionBackend> forward;
  std::unique_ptr<DeviceRingWorkspace> forward_ws;
  std::unique_ptr<AttentionBackend> backward;
  std::unique_ptr<DeviceRingWorkspace> backward_ws;
};

// Every rank's state, [world], released rank by rank with the rank's GPU current (the cudnn
// backends free their handle and workspace on the current device; the workspaces set theirs).
class NcclRankStates {
 public:
  explicit NcclRankStates(int world) : states_(world) {}
  ~NcclRankStates() {
    int current = -1;
    ReportCudaError(cudaGetDevice(&current), "cudaGetDevice");
    for (int r = 0; r < static_cast<int>(states_.size()); ++r) {
      ReportCudaError(cudaSetDevice(r), "cudaSetDevice");
      states_[r] = NcclRankState();
    }
    if (current >= 0) ReportCudaError(cudaSetDevice(current), "cudaSetDevice");
  }
  NcclRankStates(const NcclRankStates&) = delete;
  NcclRankStates& operator=(const NcclRankStates&) = delete;
  NcclRankState& operator[](int r) { return states_[r]; }

 private:
  std::vector<NcclRankState> states_;
};

// The device ring over NCCL: W ranks as threads of this process, rank r on GPU r. The
// communicators are made once per W and kept across cases and repeats (NcclRing); every run
// uploads the shards (rank r's to GPU r), makes each rank's backends and workspaces in its
// thread, and runs warmup + repeats ring calls, every call a thread per rank.
class RingNccl final : public GpuImplementation {
 public:
  using GpuImplementation::GpuImplementation;

  bool is_ring() const override { return true; }
  int Gpus(int world) const override { return world; }

  absl::StatusOr<ForwardRun> Forward(const Problem& problem, int world,
                                     const Repeats& repeats) override {
    RA_RETURN_IF_ERROR(EnoughGpus(world));
    RA_ASSIGN_OR_RETURN(const ShardPlan plan,
                        PlanShards(problem.spec.seqlen, world, problem.layout));
    RA_ASSIGN_OR_RETURN(NcclRing * ring, RingOf(world));
    RA_ASSIGN_OR_RETURN(const std::vector<int64_t> before, UsedBytesPerGpu(world));
    ForwardRun run;
    run.timer = "steady_clock";
    std::vector<DeviceShard> shards(world);
    RA_RETURN_IF_ERROR(
        UploadShards(problem, plan, /*backward=*/false, /*gpu_per_rank=*/true, &shards));
    NcclRankStates states(world);
    const std::vector<RingShardTensors> views = ForwardViews(problem, shards);
    const RingAttentionOptions options = problem.RingOptions();
    const NcclRing::RankCall forward = ForwardCall(plan, views, options, states);
    RA_RETURN_IF_ERROR(TimeRingCalls(
        repeats, [&] { return ring->Run(forward); }, &run));
    RA_ASSIGN_OR_RETURN(run.memory, MemoryGrowthSince(before));
    RA_RETURN_IF_ERROR(DownloadOutputs(problem, plan, shards, /*gpu_per_rank=*/true, &run));
    return run;
  }

  // RingFlashAttnBackwardDevice on every rank after one untimed ring forward (same ranks, same
  // communicators) for its out and LSE.
  absl::StatusOr<BackwardRun> Backward(const Problem& problem, int world,
                                       const Repeats& repeats) override {
    if (!has_backward_) return Implementation::Backward(problem, world, repeats);
    RA_RETURN_IF_ERROR(EnoughGpus(world));
    RA_ASSIGN_OR_RETURN(const ShardPlan plan,
                        PlanShards(problem.spec.seqlen, world, problem.layout));
    RA_ASSIGN_OR_RETURN(NcclRing * ring, RingOf(world));
    RA_ASSIGN_OR_RETURN(const std::vector<int64_t> before, UsedBytesPerGpu(world));
    BackwardRun run;
    run.timer = "steady_clock";
    std::vector<DeviceShard> shards(world);
    RA_RETURN_IF_ERROR(
        UploadShards(problem, plan, /*backward=*/true, /*gpu_per_rank=*/true, &shards));
    NcclRankStates states(world);
    const RingAttentionOptions options = problem.RingOptions();
    RA_RETURN_IF_ERROR(
        ring->Run(ForwardCall(plan, ForwardViews(problem, shards), options, states)).status());
    const std::vector<RingBackwardTensors> views = BackwardViews(problem, shards);
    const NcclRing::RankCall backward =
        [&](int r, DeviceCommunicator& comm) -> absl::StatusOr<RingTimings> {
      NcclRankState& s = states[r];
      if (s.backward == nullptr) {
        RA_ASSIGN_OR_RETURN(s.backward, MakeKernelBackend(kernel_));
        s.backward_ws = std::make_unique<DeviceRingWorkspace>();
      }
      return RingFlashAttnBackwardDevice(comm, *s.backward, plan, views[r], options,
                                         s.backward_ws.get());
    };
    RA_RETURN_IF_ERROR(TimeRingCalls(
        repeats, [&] { return ring->Run(backward); }, &run));
    RA_ASSIGN_OR_RETURN(run.memory, MemoryGrowthSince(before));
    RA_RETURN_IF_ERROR(DownloadGradients(problem, plan, shards, /*gpu_per_rank=*/true, &run.grads));
    return run;
  }

 private:
  // The forward ring call of rank r, making its backend and workspace at its first call. The
  // views, options and states must outlive the call.
  NcclRing::RankCall ForwardCall(const ShardPlan& plan, std::vector<RingShardTensors> views,
                                 const RingAttentionOptions& options,
                                 NcclRankStates& states) const {
    return [this, &plan, views = std::move(views), &options, &states](
               int r, DeviceCommunicator& comm) -> absl::StatusOr<RingTimings> {
      NcclRankState& s = states[r];
      if (s.forward == nullptr) {
        RA_ASSIGN_OR_RETURN(s.forward, MakeKernelBackend(kernel_));
        s.forward_ws = std::make_unique<DeviceRingWorkspace>();
      }
      return RingFlashAttnForwardDevice(comm, *s.forward, plan, views[r], options,
                                        s.forward_ws.get());
    };
  }

  // The communicators of a W-rank ring: the kept ones while healthy, else new ones.
  absl::StatusOr<NcclRing*> RingOf(int world) {
    std::unique_ptr<NcclRing>& ring = rings_[world];
    if (ring != nullptr && !ring->Healthy()) ring.reset();
    if (ring == nullptr) {
      RA_ASSIGN_OR_RETURN(ring, NcclRing::Create(world));
    }
    return ring.get();
  }

  std::map<int, std::unique_ptr<NcclRing>> rings_;  // by world size
};
#endif  // RINGATTN_HAVE_CUDA && RINGATTN_HAVE_NCCL

// ---- Kernels --------------------------------------------------------------------------------

// The fast "cuda" kernel takes bf16 and fp16 (backend header); other limits are its own errors.
absl::Status CudaKernelSupports(const AttentionParams& p) {
  if (p.dtype != DType::kBF16 && p.dtype != DType::kF16) {
    return absl::InvalidArgumentError(absl::StrCat("dtype ", std::string(DTypeName(p.dtype)),
                                                   ": the cuda kernel takes bf16 or fp16"));
  }
  return absl::OkStatus();
}

#endif  // RINGATTN_HAVE_CUDA

// The kernels compared, by their registered backend names, and the descriptions of their
// single-device, in-process ring and NCCL ring implementations (registered in this order).
struct KernelNames {
  std::string_view backend;
  std::string_view single, ring, ring_nccl;
};
constexpr KernelNames kKernels[] = {
    {"cudnn", kSingleCudnnDescription, kRingCudnnDescription, kRingNcclCudnnDescription},
    {"cuda", kSingleCudaDescription, kRingCudaDescription, kRingNcclCudaDescription},
};

std::string ImplementationName(std::string_view kind, std::string_view backend) {
  return absl::StrCat(std::string(kind), "_", std::string(backend));
}

// Adds `name` as a registered implementation that reports `why` on every call.
void AddNotAvailable(ImplementationRegistry& registry, std::string name,
                     std::string_view description, bool is_ring, absl::Status why) {
  registry.Add(name, [name, description, is_ring, why] {
    return std::make_unique<NotAvailable>(name, std::string(description), Placement::kDevice,
                                          is_ring, why);
  });
}

#if RINGATTN_HAVE_CUDA

// The kernel of `backend` with its support checks, or why this build lacks it.
absl::StatusOr<GpuKernel> KernelOf(std::string_view backend) {
  if (backend == "cuda") {
    return GpuKernel{"cuda", CudaKernelSupports,
                     [](const AttentionBackwardParams& p) -> absl::Status {
                       RA_RETURN_IF_ERROR(ValidateBackwardParams(p));
                       return CheckFlashBackwardSupport(p);
                     }};
  }
#if RINGATTN_HAVE_CUDNN
  return GpuKernel{"cudnn", CudnnSupports, CudnnBackwardSupports};
#else
  return absl::UnimplementedError(
      "the cudnn backend (kernels/cudnn, CMake target ra_kernels_cudnn) is not in this build");
#endif
}

// Adds `name` as an Impl (SingleDevice, RingDevice, RingNccl) running `kernel`, or as not
// available where this build lacks the kernel.
template <typename Impl>
void AddImplementation(ImplementationRegistry& registry, std::string name,
                       std::string_view description, bool is_ring,
                       const absl::StatusOr<GpuKernel>& kernel) {
  if (!kernel.ok()) return AddNotAvailable(registry, name, description, is_ring, kernel.status());
  registry.Add(name, [name, description, kernel = *kernel] {
    return std::make_unique<Impl>(name, description, kernel);
  });
}

#endif  // RINGATTN_HAVE_CUDA

}  // namespace

void AddGpuImplementations(ImplementationRegistry& registry) {
#if RINGATTN_HAVE_CUDA
  for (const KernelNames& k : kKernels) {
    AddImplementation<SingleDevice>(registry, ImplementationName("single", k.backend), k.single,
                                    false, KernelOf(k.backend));
  }
  for (const KernelNames& k : kKernels) {
    AddImplementation<RingDevice>(registry, ImplementationName("ring", k.backend), k.ring, true,
                                  KernelOf(k.backend));
  }
  for (const KernelNames& k : kKernels) {
    const std::string name = ImplementationName("ring_nccl", k.backend);
#if RINGATTN_HAVE_NCCL
    AddImplementation<RingNccl>(registry, name, k.ring_nccl, true, KernelOf(k.backend));
#else
    AddNotAvailable(registry, name, k.ring_nccl, true,
                    absl::UnimplementedError(absl::StrCat(
                        name,
                        ": the NCCL device ring (NCCL found at configure time) (CMake target "
                        "ra_ring_cuda with RINGATTN_WITH_NCCL) is not in this build")));
#endif
  }
#else  // !RINGATTN_HAVE_CUDA
  const absl::Status no_cuda = absl::UnavailableError(
      "built without CUDA (RINGATTN_WITH_CUDA off or no nvcc at configure time)");
  for (const KernelNames& k : kKernels) {
    AddNotAvailable(registry, ImplementationName("single", k.backend), k.single, false, no_cuda);
  }
  for (const KernelNames& k : kKernels) {
    AddNotAvailable(registry, ImplementationName("ring", k.backend), k.ring, true, no_cuda);
  }
  for (const KernelNames& k : kKernels) {
    AddNotAvailable(registry, ImplementationName("ring_nccl", k.backend), k.ring_nccl, true,
                    no_cuda);
  }
#endif
}

std::string GpuDescription() {
#if RINGATTN_HAVE_CUDA
  const int count = CountGpus();
  if (count == 0) return "GPU: none (no CUDA device on this machine)";
  cudaDeviceProp prop;
  if (const cudaError_t e = cudaGetDeviceProperties(&prop, 0); e != cudaSuccess) {
    return absl::StrCat("GPUs: ", count, "; device 0 properties unavailable (",
                        cudaGetErrorString(e), ")");
  }
  return absl::StrCat("GPUs: ", count, "; GPU 0: ", prop.name, " (", prop.multiProcessorCount,
                      " SMs, ", prop.totalGlobalMem >> 20, " MiB, sm_", prop.major, prop.minor,
                      ")");
#else
  return "GPU: not used (built without CUDA)";
#endif
}

}  // namespace internal

int VisibleGpuCount() {
#if RINGATTN_HAVE_CUDA
  return internal::CountGpus();
#else
  return 0;
#endif
}

}  // namespace ringattn::compare
