#include "bench/compare/implementations.h"

#include <chrono>
#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/attention_backend.h"
#include "kernels/params_check.h"
#include "kernels/status_macros.h"
#include "worker/ring/inprocess_ring.h"
#include "worker/ring/synthetic_inputs.h"

#if RINGATTN_HAVE_CPU_BACKWARD
#include "kernels/attention_backward_params.h"
#include "kernels/cpu/reference_backward.h"
#endif
#if RINGATTN_HAVE_CPU_BACKWARD && RINGATTN_HAVE_RING_BACKWARD
#include "worker/ring/inprocess_ring_backward.h"
#endif

#if RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"
#if RINGATTN_HAVE_CUDNN
#include "kernels/cudnn/cudnn_backend.h"
#endif
#if RINGATTN_HAVE_DEVICE_RING
#include "worker/ring/device_inprocess_ring.h"
#endif
#endif

namespace ringattn::compare {
namespace {

using Clock = std::chrono::steady_clock;

// Synthetic tensor ids (as the command line's ring uses them).
constexpr uint32_t kQ = 0, kK = 1, kV = 2, kDOut = 3;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Peak host bytes of a run: the problem's inputs plus the heap's growth since `live_at_start`.
MemoryUse HostMemorySince(const Problem& problem, int64_t live_at_start) {
  return {"host", std::string(kHostMemoryMethod),
          problem.input_bytes() + (HostHeap::PeakBytes() - live_at_start)};
}

#if RINGATTN_HAVE_CPU_BACKWARD
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
#endif

// A ring call's latency: its slowest rank's time.
double SlowestRank(const std::vector<RingTimings>& timings) {
  double slowest = 0;
  for (const RingTimings& t : timings) slowest = std::max(slowest, t.total_seconds);
  return slowest;
}

// A registered implementation that cannot run in this build: every call says why.
class NotAvailable final : public Implementation {
 public:
  NotAvailable(std::string name, std::string description, Placement placement, bool is_ring,
               absl::Status reason)
      : name_(std::move(name)),
        description_(std::move(description)),
        placement_(placement),
        is_ring_(is_ring),
        reason_(std::move(reason)) {}

  std::string_view name() const override { return name_; }
  std::string_view description() const override { return description_; }
  Placement placement() const override { return placement_; }
  bool is_ring() const override { return is_ring_; }
  absl::Status Available() const override { return reason_; }
  absl::StatusOr<ForwardRun> Forward(const Problem&, int, const Repeats&) override {
    return reason_;
  }

 private:
  std::string name_, description_;
  Placement placement_;
  bool is_ring_;
  absl::Status reason_;
};

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
    RA_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackend> backend, MakeCpuBackend("cpu"));
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

#if RINGATTN_HAVE_CPU_BACKWARD
  bool has_backward() const override { return true; }

  // The fast CPU backward ("cpu" backward backend) on the whole sequence, after one untimed
  // forward for its out and LSE.
  absl::StatusOr<BackwardRun> Backward(const Problem& problem, int world,
                                       const Repeats& repeats) override {
    if (world != 1) return absl::InvalidArgumentError("single_cpu runs at world size 1 only");
    if (problem.dout.empty()) return absl::FailedPreconditionError("the problem has no dout");
    RA_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackend> forward, MakeCpuBackend("cpu"));
    RA_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackwardBackend> backward,
                        MakeCpuBackwardBackend("cpu"));
    HostHeap::ResetPeak();
    const int64_t live_at_start = HostHeap::LiveBytes();
    std::vector<std::byte> out(problem.q.size());
    std::vector<float> lse(problem.lse_elements());
    AttentionParams fp = problem.Params();
    fp.o = out.data();
    fp.lse = lse.data();
    RA_RETURN_IF_ERROR(forward->Forward(fp));

    BackwardRun run;
    run.timer = "steady_clock";
    run.grads.dq.resize(problem.out_elements());
    run.grads.dk.resize(problem.k.size() / DTypeSize(problem.spec.dtype));
    run.grads.dv.resize(run.grads.dk.size());
    const AttentionBackwardParams bp =
        WholeBackwardParams(problem, out.data(), lse.data(), &run.grads);
    for (int i = 0; i < repeats.warmup; ++i) RA_RETURN_IF_ERROR(backward->Backward(bp));
    for (int i = 0; i < repeats.repeats; ++i) {
      const Clock::time_point t0 = Clock::now();
      RA_RETURN_IF_ERROR(backward->Backward(bp));
      run.seconds.push_back(SecondsSince(t0));
    }
    run.wall_seconds = run.seconds;
    run.memory = HostMemorySince(problem, live_at_start);
    run.memory.peak_bytes += static_cast<int64_t>(problem.dout.size());
    return run;
  }
#endif
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
    const BackendFactory factory = [] { return MakeCpuBackend("cpu"); };
    for (int i = 0; i < repeats.warmup + repeats.repeats; ++i) {
      const Clock::time_point t0 = Clock::now();
      RA_ASSIGN_OR_RETURN(std::vector<RingTimings> timings,
                          RunRingInProcess(whole, world, problem.layout, options, factory));
      const double wall = SecondsSince(t0);
      if (i < repeats.warmup) continue;
      run.seconds.push_back(SlowestRank(timings));
      run.wall_seconds.push_back(wall);
      run.ring.push_back(std::move(timings));
    }
    run.memory = HostMemorySince(problem, live_at_start);
    return run;
  }

#if RINGATTN_HAVE_CPU_BACKWARD && RINGATTN_HAVE_RING_BACKWARD
  bool has_backward() const override { return true; }

  // The ring backward (RunRingBackwardInProcess) with the "cpu" backward backend, after one
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
    RA_RETURN_IF_ERROR(RunRingInProcess(whole, world, problem.layout, options, [] {
                         return MakeCpuBackend("cpu");
                       }).status());

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
    const BackwardBackendFactory factory = [] { return MakeCpuBackwardBackend("cpu"); };
    for (int i = 0; i < repeats.warmup + repeats.repeats; ++i) {
      const Clock::time_point t0 = Clock::now();
      RA_ASSIGN_OR_RETURN(std::vector<RingTimings> timings,
                          RunRingBackwardInProcess(wb, world, problem.layout, options, factory));
      const double wall = SecondsSince(t0);
      if (i < repeats.warmup) continue;
      run.seconds.push_back(SlowestRank(timings));
      run.wall_seconds.push_back(wall);
      run.ring.push_back(std::move(timings));
    }
    run.memory = HostMemorySince(problem, live_at_start);
    run.memory.peak_bytes += static_cast<int64_t>(problem.dout.size());
    return run;
  }
#endif

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

// ---- GPU ----------------------------------------------------------------------------------------

constexpr std::string_view kSingleCudnnDescription =
    "cuDNN's fused flash attention (backend \"cudnn\") on the whole sequence; the baseline on a "
    "GPU";
constexpr std::string_view kSingleCudaDescription =
    "our CUDA forward kernel (backend \"cuda\": FlashAttention-2 schedule, mma.sync) on the "
    "whole sequence";
constexpr std::string_view kRingCudnnDescription =
    "the device ring with the \"cudnn\" backend on every rank: W ranks in-process on one GPU, "
    "K/V by device-to-device copies on separate streams";
constexpr std::string_view kRingCudaDescription =
    "the device ring with the \"cuda\" backend on every rank: W ranks in-process on one GPU, "
    "K/V by device-to-device copies on separate streams";

#if RINGATTN_HAVE_CUDA && !RINGATTN_HAVE_DEVICE_RING
// The device ring (worker/ring/device_inprocess_ring.h, CMake target ra_ring_cuda) is not built.
absl::Status DeviceRingMissing(std::string_view name) {
  return absl::UnimplementedError(
      absl::StrCat(std::string(name),
                   ": the device ring (worker/ring/device_inprocess_ring.h, CMake target "
                   "ra_ring_cuda) is not in this build"));
}
#endif

#if RINGATTN_HAVE_CUDA

absl::Status CudaDevicePresent() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    return absl::UnavailableError("no CUDA device on this machine");
  }
  return absl::OkStatus();
}

// Device memory owned for one run; freed on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  absl::Status Allocate(size_t bytes) {
    RA_CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr_, bytes == 0 ? 1 : bytes));
    return absl::OkStatus();
  }
  absl::Status Upload(const void* host, size_t bytes) {
    RA_RETURN_IF_ERROR(Allocate(bytes));
    RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice));
    return absl::OkStatus();
  }
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
};

// A stream and a pair of timing events; destroyed with the run.
class TimedStream {
 public:
  TimedStream() = default;
  TimedStream(const TimedStream&) = delete;
  TimedStream& operator=(const TimedStream&) = delete;
  ~TimedStream() {
    if (start_ != nullptr) cudaEventDestroy(start_);
    if (stop_ != nullptr) cudaEventDestroy(stop_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
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

absl::StatusOr<int64_t> DeviceUsedBytes() {
  size_t free_bytes = 0, total_bytes = 0;
  RA_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  return static_cast<int64_t>(total_bytes - free_bytes);
}

// The whole problem's params for a backend's support check, which validates them as a call:
// o must be non-null there, so it points at q (same shape and dtype), never read or written.
AttentionParams ParamsForValidation(const Problem& problem) {
  AttentionParams p = problem.Params();
  p.o = const_cast<void*>(p.q);
  return p;
}

using DeviceBackendFactory = std::function<absl::StatusOr<std::unique_ptr<AttentionBackend>>()>;

// One kernel backend on the whole sequence on device 0, timed with CUDA events around each call.
class SingleDevice final : public Implementation {
 public:
  SingleDevice(std::string name, std::string_view description, DeviceBackendFactory factory,
               std::function<absl::Status(const AttentionParams&)> supports)
      : name_(std::move(name)),
        description_(description),
        factory_(std::move(factory)),
        supports_(std::move(supports)) {}

  std::string_view name() const override { return name_; }
  std::string_view description() const override { return description_; }
  Placement placement() const override { return Placement::kDevice; }
  bool is_ring() const override { return false; }
  absl::Status Available() const override { return CudaDevicePresent(); }
  absl::Status Supports(const Problem& problem) const override {
    return supports_(ParamsForValidation(problem));
  }

  absl::StatusOr<ForwardRun> Forward(const Problem& problem, int world,
                                     const Repeats& repeats) override {
    if (world != 1) {
      return absl::InvalidArgumentError(absl::StrCat(name_, " runs at world size 1 only"));
    }
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
    RA_CUDA_RETURN_IF_ERROR(cudaFree(nullptr));  // the context exists before the first sample
    RA_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    RA_ASSIGN_OR_RETURN(const int64_t used_before, DeviceUsedBytes());
    ForwardRun run;
    run.timer = "cuda_event";
    {
      DeviceBuffer q, k, v, o, lse, alibi;
      RA_RETURN_IF_ERROR(q.Upload(problem.q.data(), problem.q.size()));
      RA_RETURN_IF_ERROR(k.Upload(problem.k.data(), problem.k.size()));
      RA_RETURN_IF_ERROR(v.Upload(problem.v.data(), problem.v.size()));
      RA_RETURN_IF_ERROR(o.Allocate(problem.q.size()));
      RA_RETURN_IF_ERROR(lse.Allocate(problem.lse_elements() * sizeof(float)));
      AttentionParams p = problem.Params();
      if (!problem.alibi_slopes.empty()) {
        RA_RETURN_IF_ERROR(
            alibi.Upload(problem.alibi_slopes.data(), problem.alibi_slopes.size() * sizeof(float)));
        p.alibi_slopes = static_cast<const float*>(alibi.get());
      }
      p.q = q.get();
      p.k = k.get();
      p.v = v.get();
      p.o = o.get();
      p.lse = static_cast<float*>(lse.get());

      TimedStream ts;
      RA_RETURN_IF_ERROR(ts.Create());
      RA_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackend> backend, factory_());
      CudaBackend* cuda = AsCudaBackend(backend.get());
      if (cuda == nullptr) {
        return absl::InternalError(absl::StrCat(name_, ": backend is not a CUDA backend"));
      }
      cuda->SetStream(ts.stream());
      for (int i = 0; i < repeats.warmup; ++i) RA_RETURN_IF_ERROR(backend->Forward(p));
      RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ts.stream()));
      for (int i = 0; i < repeats.repeats; ++i) {
        const Clock::time_point t0 = Clock::now();
        RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ts.start(), ts.stream()));
        RA_RETURN_IF_ERROR(backend->Forward(p));
        RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ts.stop(), ts.stream()));
        RA_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ts.stop()));
        run.wall_seconds.push_back(SecondsSince(t0));
        float ms = 0;
        RA_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, ts.start(), ts.stop()));
        run.seconds.push_back(ms * 1e-3);
      }
      RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ts.stream()));
      RA_ASSIGN_OR_RETURN(const int64_t used_after, DeviceUsedBytes());
      run.memory = {"device", std::string(kDeviceMemoryMethod), used_after - used_before};

      run.out.resize(problem.q.size());
      run.lse.resize(problem.lse_elements());
      RA_CUDA_RETURN_IF_ERROR(
          cudaMemcpy(run.out.data(), o.get(), run.out.size(), cudaMemcpyDeviceToHost));
      RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(run.lse.data(), lse.get(), run.lse.size() * sizeof(float),
                                         cudaMemcpyDeviceToHost));
    }
    return run;
  }

 private:
  std::string name_;
  std::string_view description_;
  DeviceBackendFactory factory_;
  std::function<absl::Status(const AttentionParams&)> supports_;
};

#if RINGATTN_HAVE_DEVICE_RING
// The device ring over W in-process ranks on device 0 (DeviceInProcessRing, kept across the
// calls of a run): every rank's shard is uploaded once, then warmup + repeats ring calls. The
// latency is the slowest rank's host wall time of the call (each rank waits for its streams
// before returning); per-step compute and communication wait come from the ring's CUDA events.
class RingDevice final : public Implementation {
 public:
  RingDevice(std::string name, std::string_view description, BackendFactory factory,
             std::function<absl::Status(const AttentionParams&)> supports)
      : name_(std::move(name)),
        description_(description),
        factory_(std::move(factory)),
        supports_(std::move(supports)) {}

  std::string_view name() const override { return name_; }
  std::string_view description() const override { return description_; }
  Placement placement() const override { return Placement::kDevice; }
  bool is_ring() const override { return true; }
  absl::Status Available() const override { return CudaDevicePresent(); }
  absl::Status Supports(const Problem& problem) const override {
    return supports_(ParamsForValidation(problem));
  }

  absl::StatusOr<ForwardRun> Forward(const Problem& problem, int world,
                                     const Repeats& repeats) override {
    const ComparisonCase& c = problem.spec;
    RA_ASSIGN_OR_RETURN(const ShardPlan plan, PlanShards(c.seqlen, world, problem.layout));
    RA_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
    RA_CUDA_RETURN_IF_ERROR(cudaFree(nullptr));
    RA_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    RA_ASSIGN_OR_RETURN(const int64_t used_before, DeviceUsedBytes());
    const size_t es = DTypeSize(c.dtype);
    const size_t q_row = static_cast<size_t>(c.heads) * c.head_dim * es;
    const size_t kv_row = static_cast<size_t>(c.kv_heads()) * c.head_dim * es;
    ForwardRun run;
    run.timer = "steady_clock";
    run.out.resize(problem.q.size());
    run.lse.resize(problem.lse_elements());
    {
      // Per rank: q, k, v, out [batch, rows, heads(_k), head_dim] and lse [batch, heads, rows].
      std::vector<DeviceBuffer> buffers(5 * static_cast<size_t>(world));
      std::vector<RingShardTensors> shards(world);
      for (int r = 0; r < world; ++r) {
        const int64_t rows = plan.shards[r].rows;
        DeviceBuffer* b = &buffers[5 * static_cast<size_t>(r)];
        std::vector<std::byte> staging(c.batch * rows * q_row);
        ExtractShard(plan, r, problem.q.data(), c.batch, q_row, staging.data());
        RA_RETURN_IF_ERROR(b[0].Upload(staging.data(), c.batch * rows * q_row));
        staging.resize(c.batch * rows * kv_row);
        ExtractShard(plan, r, problem.k.data(), c.batch, kv_row, staging.data());
        RA_RETURN_IF_ERROR(b[1].Upload(staging.data(), c.batch * rows * kv_row));
        ExtractShard(plan, r, problem.v.data(), c.batch, kv_row, staging.data());
        RA_RETURN_IF_ERROR(b[2].Upload(staging.data(), c.batch * rows * kv_row));
        RA_RETURN_IF_ERROR(b[3].Allocate(c.batch * rows * q_row));
        RA_RETURN_IF_ERROR(b[4].Allocate(static_cast<size_t>(c.batch) * c.heads * rows * 4));
        RingShardTensors& t = shards[r];
        t.dtype = c.dtype;
        t.batch = c.batch;
        t.heads = c.heads;
        t.heads_k = c.kv_heads();
        t.head_dim = c.head_dim;
        t.q = b[0].get();
        t.k = b[1].get();
        t.v = b[2].get();
        t.out = b[3].get();
        t.lse = static_cast<float*>(b[4].get());
      }
      RA_ASSIGN_OR_RETURN(std::unique_ptr<DeviceInProcessRing> ring,
                          DeviceInProcessRing::Create(world, factory_));
      const RingAttentionOptions options = problem.RingOptions();
      for (int i = 0; i < repeats.warmup + repeats.repeats; ++i) {
        const Clock::time_point t0 = Clock::now();
        RA_ASSIGN_OR_RETURN(std::vector<RingTimings> timings, ring->Run(plan, shards, options));
        const double wall = SecondsSince(t0);
        if (i < repeats.warmup) continue;
        double slowest = 0;
        for (const RingTimings& t : timings) slowest = std::max(slowest, t.total_seconds);
        run.seconds.push_back(slowest);
        run.wall_seconds.push_back(wall);
        run.ring.push_back(std::move(timings));
      }
      RA_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
      RA_ASSIGN_OR_RETURN(const int64_t used_after, DeviceUsedBytes());
      run.memory = {"device", std::string(kDeviceMemoryMethod), used_after - used_before};
      for (int r = 0; r < world; ++r) {
        const int64_t rows = plan.shards[r].rows;
        std::vector<std::byte> out(c.batch * rows * q_row);
        std::vector<float> lse(static_cast<size_t>(c.batch) * c.heads * rows);
        RA_CUDA_RETURN_IF_ERROR(
            cudaMemcpy(out.data(), shards[r].out, out.size(), cudaMemcpyDeviceToHost));
        RA_CUDA_RETURN_IF_ERROR(cudaMemcpy(lse.data(), shards[r].lse, lse.size() * sizeof(float),
                                           cudaMemcpyDeviceToHost));
        InsertShard(plan, r, out.data(), c.batch, q_row, run.out.data());
        InsertShard(plan, r, lse.data(), static_cast<int64_t>(c.batch) * c.heads, sizeof(float),
                    run.lse.data());
      }
    }
    return run;
  }

 private:
  std::string name_;
  std::string_view description_;
  BackendFactory factory_;
  std::function<absl::Status(const AttentionParams&)> supports_;
};
#endif  // RINGATTN_HAVE_DEVICE_RING

// The fast "cuda" kernel takes bf16 and fp16 (backend header); other limits are its own errors.
absl::Status CudaKernelSupports(const AttentionParams& p) {
  if (p.dtype != DType::kBF16 && p.dtype != DType::kF16) {
    return absl::InvalidArgumentError(absl::StrCat("dtype ", std::string(DTypeName(p.dtype)),
                                                   ": the cuda kernel takes bf16 or fp16"));
  }
  return absl::OkStatus();
}

#endif  // RINGATTN_HAVE_CUDA

#if RINGATTN_HAVE_CUDA && RINGATTN_HAVE_CUDNN
absl::StatusOr<std::unique_ptr<AttentionBackend>> MakeCudnn() { return MakeCudnnBackend(); }
#endif

// Registers single_cudnn, single_cuda, ring_cudnn and ring_cuda: the real ones where their
// pieces are in the build, otherwise NotAvailable with the reason.
void AddGpuImplementations(ImplementationRegistry& registry) {
  [[maybe_unused]] auto not_available = [&registry](std::string name, std::string_view description,
                                                    bool is_ring, absl::Status why) {
    registry.Add(name, [name, description, is_ring, why] {
      return std::make_unique<NotAvailable>(name, std::string(description), Placement::kDevice,
                                            is_ring, why);
    });
  };
#if RINGATTN_HAVE_CUDA
  [[maybe_unused]] const auto cudnn_supports = [](const AttentionParams& p) -> absl::Status {
#if RINGATTN_HAVE_CUDNN
    return CudnnSupports(p);
#else
    return absl::OkStatus();
#endif
  };
#if RINGATTN_HAVE_CUDNN
  registry.Add("single_cudnn", [cudnn_supports] {
    return std::make_unique<SingleDevice>("single_cudnn", kSingleCudnnDescription, MakeCudnn,
                                          cudnn_supports);
  });
#else
  not_available("single_cudnn", kSingleCudnnDescription, false,
                absl::UnimplementedError("single_cudnn: the cudnn backend (kernels/cudnn, CMake "
                                         "target ra_kernels_cudnn) is not in this build"));
#endif
  registry.Add("single_cuda", [] {
    return std::make_unique<SingleDevice>(
        "single_cuda", kSingleCudaDescription, [] { return MakeCudaBackend("cuda"); },
        CudaKernelSupports);
  });
#if RINGATTN_HAVE_DEVICE_RING && RINGATTN_HAVE_CUDNN
  registry.Add("ring_cudnn", [cudnn_supports] {
    return std::make_unique<RingDevice>("ring_cudnn", kRingCudnnDescription, MakeCudnn,
                                        cudnn_supports);
  });
#elif RINGATTN_HAVE_DEVICE_RING
  not_available("ring_cudnn", kRingCudnnDescription, true,
                absl::UnimplementedError("ring_cudnn: the cudnn backend (kernels/cudnn, CMake "
                                         "target ra_kernels_cudnn) is not in this build"));
#else
  not_available("ring_cudnn", kRingCudnnDescription, true, DeviceRingMissing("ring_cudnn"));
#endif
#if RINGATTN_HAVE_DEVICE_RING
  registry.Add("ring_cuda", [] {
    return std::make_unique<RingDevice>(
        "ring_cuda", kRingCudaDescription, [] { return MakeCudaBackend("cuda"); },
        CudaKernelSupports);
  });
#else
  not_available("ring_cuda", kRingCudaDescription, true, DeviceRingMissing("ring_cuda"));
#endif
#else  // !RINGATTN_HAVE_CUDA
  const absl::Status no_cuda = absl::UnavailableError(
      "built without CUDA (RINGATTN_WITH_CUDA off or no nvcc at configure time)");
  not_available("single_cudnn", kSingleCudnnDescription, false, no_cuda);
  not_available("single_cuda", kSingleCudaDescription, false, no_cuda);
  not_available("ring_cudnn", kRingCudnnDescription, true, no_cuda);
  not_available("ring_cuda", kRingCudaDescription, true, no_cuda);
#endif
}

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
  SetContiguousStrides(&p);
  return p;
}

RingAttentionOptions Problem::RingOptions() const {
  RingAttentionOptions o;
  o.causal = spec.causal;
  o.window_size = {spec.window_left, spec.window_right};
  o.alibi_slopes = alibi_slopes;
  o.softcap = spec.softcap;
  return o;
}

double Problem::forward_flops() const { return ForwardFlops(Params()); }

int64_t Problem::out_elements() const {
  return static_cast<int64_t>(spec.batch) * spec.seqlen * spec.heads * spec.head_dim;
}

int64_t Problem::lse_elements() const {
  return static_cast<int64_t>(spec.batch) * spec.heads * spec.seqlen;
}

absl::StatusOr<Problem> MakeProblem(const ComparisonCase& spec, uint64_t seed,
                                    bool with_grad_output) {
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
#if RINGATTN_HAVE_CPU_BACKWARD
  if (problem.dout.empty()) return absl::FailedPreconditionError("the problem has no dout");
  AttentionBackwardParams p;
  p.fwd = problem.Params();
  p.dout = problem.dout.data();
  p.out_dtype = problem.spec.dtype;
  SetContiguousBackwardStrides(&p);
  RA_ASSIGN_OR_RETURN(ReferenceBackwardResult r, ringattn::ReferenceBackward(p));
  return ReferenceGradients{std::move(r.dq), std::move(r.dk), std::move(r.dv)};
#else
  return absl::UnimplementedError(
      "the fp64 reference backward (kernels/cpu/reference_backward.h, CMake target "
      "ra_kernels_cpu_backward) is not in this build");
#endif
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
  std::string s =
      absl::StrCat("host: ", std::thread::hardware_concurrency(), " hardware threads; ");
#if RINGATTN_HAVE_CUDA
  if (absl::Status present = CudaDevicePresent(); !present.ok()) {
    absl::StrAppend(&s, "GPU: none (", present.message(), ")");
    return s;
  }
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    absl::StrAppend(&s, "GPU: properties unavailable");
    return s;
  }
  absl::StrAppend(&s, "GPU 0: ", prop.name, " (", prop.multiProcessorCount, " SMs, ",
                  prop.totalGlobalMem >> 20, " MiB, sm_", prop.major, prop.minor, ")");
#else
  absl::StrAppend(&s, "GPU: not used (built without CUDA)");
#endif
  return s;
}

ImplementationRegistry BuiltinImplementations() {
  ImplementationRegistry registry;
  registry.Add("single_cpu", [] { return std::make_unique<SingleCpu>(); });
  registry.Add("ring_cpu", [] { return std::make_unique<RingCpu>(); });
  AddGpuImplementations(registry);
  return registry;
}

}  // namespace ringattn::compare
