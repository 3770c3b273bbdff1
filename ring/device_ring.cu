#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/dtype.h"
#include "ring/device_ring.h"
#include "ring/device_ring_util.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kThreads = 256;
// Grid-stride loops: enough blocks to fill an H100 (132 SMs x 2048 threads) several times
// over; more only adds scheduling.
constexpr int64_t kMaxBlocks = 8192;

int BlocksFor(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
}

// ---- Kernels --------------------------------------------------------------------------------

__global__ void FillFloatKernel(float* __restrict__ x, int64_t n, float value) {  // x: [n]
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    x[i] = value;
  }
}

template <DType kOut>
__device__ __forceinline__ uint16_t To16(float x) {
  static_assert(kOut == DType::kBF16 || kOut == DType::kF16, "16-bit output types only");
  if constexpr (kOut == DType::kBF16) {
    return FloatToBf16(x);
  } else {
    return FloatToF16(x);
  }
}

// dst[i] = round(src[i]) for i < n, four elements per thread per iteration: one 16-byte load,
// one 8-byte store (the launcher checks the alignment), then the n % 4 tail one by one. The
// rounding is dtype.h's, the same code as the host ring's Finalize.
template <DType kOut>
__global__ void ConvertFromFloatKernel(const float* __restrict__ src,  // [n] fp32
                                       uint16_t* __restrict__ dst,     // [n] kOut
                                       int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t groups = n / 4;
  const auto* src4 = reinterpret_cast<const float4*>(src);
  auto* dst4 = reinterpret_cast<uint2*>(dst);
  for (int64_t g = first; g < groups; g += stride) {
    const float4 v = src4[g];
    uint2 packed;  // little-endian: element 4g in the low half of .x
    packed.x =
        static_cast<uint32_t>(To16<kOut>(v.x)) | (static_cast<uint32_t>(To16<kOut>(v.y)) << 16);
    packed.y =
        static_cast<uint32_t>(To16<kOut>(v.z)) | (static_cast<uint32_t>(To16<kOut>(v.w)) << 16);
    dst4[g] = packed;
  }
  for (int64_t i = groups * 4 + first; i < n; i += stride) dst[i] = To16<kOut>(src[i]);
}

// The same without alignment requirements, one element per thread per iteration.
template <DType kOut>
__global__ void ConvertFromFloatScalarKernel(const float* __restrict__ src,  // [n] fp32
                                             uint16_t* __restrict__ dst,     // [n] kOut
                                             int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    dst[i] = To16<kOut>(src[i]);
  }
}

template <DType kOut>
absl::Status LaunchConvert16(const float* src, void* dst, int64_t n, cudaStream_t stream) {
  auto* out = static_cast<uint16_t*>(dst);
  const bool aligned =
      reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 8 == 0;
  if (aligned) {
    ConvertFromFloatKernel<kOut>
        <<<BlocksFor(std::max<int64_t>(n / 4, 1)), kThreads, 0, stream>>>(src, out, n);
  } else {
    ConvertFromFloatScalarKernel<kOut><<<BlocksFor(n), kThreads, 0, stream>>>(src, out, n);
  }
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

// ---- Helpers --------------------------------------------------------------------------------

using device_ring_internal::ElapsedSeconds;
using device_ring_internal::GrowEvents;
using device_ring_internal::GrowFloats;

void ReportIfError(cudaError_t e, const char* what) {
  device_ring_internal::ReportIfError("DeviceRingWorkspace", e, what);
}

// The one kernel call of a one-rank ring whose shard is one run of positions `s`: straight
// into the caller's output, in its dtype, and its lse (may be null), as a single-device call
// on the whole shard would be.
AttentionParams DirectParams(const RingShardTensors& t, const ShardGeometry& g, int64_t rows,
                             const Segment& s, const RingAttentionOptions& options,
                             const float* alibi, float scale) {
  const KvBlock kv{static_cast<const std::byte*>(t.k), static_cast<const std::byte*>(t.v)};
  // Sizes, strides, positions and options as every ring step has them; only the output differs.
  AttentionParams p = SegmentPairParams(t, g, rows, s, kv, rows, s, /*o_acc=*/nullptr,
                                        /*lse_acc=*/nullptr, options, alibi, scale);
  p.o = t.out;
  p.o_dtype = t.dtype;
  p.lse = t.lse;
  p.merge_into_output = false;
  return p;
}

absl::StatusOr<RingTimings> RunDeviceRing(DeviceCommunicator& comm, AttentionBackend& backend,
                                          const ShardPlan& plan, const RingShardTensors& t,
                                          const RingAttentionOptions& options,
                                          DeviceRingWorkspace* ws) {
  const auto t0 = Clock::now();
  RA_RETURN_IF_ERROR(ValidateRingOptions(options, t));
  const int world = comm.world_size();
  const int rank = comm.rank();
  RA_RETURN_IF_ERROR(CheckPlanMatchesGroup(plan, rank, world));
  RA_RETURN_IF_ERROR(
      CheckPackedSequences(options, plan, backend.supports_packed_sequences(), backend.name()));
  CudaBackend* cuda = AsCudaBackend(&backend);
  if (backend.memory_space() != MemorySpace::kDevice || cuda == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("the device ring driver needs a CUDA backend "
                     "(cuda, cuda_reference), got '",
                     std::string(backend.name()), "'"));
  }
  if (ws == nullptr) return absl::InvalidArgumentError("the device ring driver needs a workspace");
  const ShardGeometry g = ShardGeometry::Of(t);
  const int64_t rows = plan.shards[rank].rows;
  const float scale = RingSoftmaxScale(options, t.head_dim);

  // One rank whose shard is one run of positions (every layout with one rank): one call.
  const std::optional<Segment> single =
      world == 1 ? AsSingleSegment(plan.shards[rank]) : std::nullopt;
  const bool direct = world == 1 && (rows == 0 || single.has_value());

  DeviceRingWorkspace::Needs needs;
  needs.steps = world;
  const size_t slot_kv_bytes = g.KvBytes(t.batch, plan.max_rows());  // K or V of one slot
  if (!direct) {
    needs.o_elems = static_cast<size_t>(t.batch) * rows * g.q_row_elems;
    needs.lse_elems = static_cast<size_t>(t.batch) * t.heads * rows;
    if (world > 1) needs.slot_bytes = 2 * slot_kv_bytes;
  }
  RA_RETURN_IF_ERROR(ws->Reserve(needs));
  RA_ASSIGN_OR_RETURN(const float* alibi, ws->AlibiSlopes(options.alibi_slopes));
  const cudaStream_t compute = ws->compute_stream();
  const cudaStream_t transfer = ws->comm_stream();
  device_ring_internal::ScopedBackendStream<CudaBackend> stream_scope(cuda, compute);

  RingTimings timings;
  timings.steps.resize(world);
  if (direct) {
    RingStepTiming& st = timings.steps[0];
    st.source_rank = rank;
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->start_event(0), compute));
    if (rows > 0) {
      RA_RETURN_IF_ERROR(backend.Forward(DirectParams(t, g, rows, *single, options, alibi, scale)));
      st.kernel_calls = 1;
    }
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->compute_done_event(0), compute));
  } else {
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->begin_event(), compute));
    // Accumulators: o = 0 and lse = -inf, the empty partial every merge replaces, unless the
    // first step writes them (and the last finalizes). Dropping the set-up and rounding passes
    // took the 2 x H100 ring at 8k tokens per GPU from 0.81 to 0.90 of the bare kernel's
    // per-GPU throughput (docs/performance_notes.md, "The ring's fixed cost per call").
    const RingOutputPlan output = PlanRingOutput(plan, rank, world, backend);
    if (!output.first_writes) {
      if (needs.o_elems > 0) {
        RA_CUDA_RETURN_IF_ERROR(
            cudaMemsetAsync(ws->o_acc(), 0, needs.o_elems * sizeof(float), compute));
      }
      RA_RETURN_IF_ERROR(LaunchFillFloat(ws->lse_acc(), static_cast<int64_t>(needs.lse_elems),
                                         -std::numeric_limits<float>::infinity(), compute));
    }

    // Step 0 computes and sends straight from the caller's K/V.
    KvBlock in_hand{static_cast<const std::byte*>(t.k), static_cast<const std::byte*>(t.v)};
    const int next = RingNextRank(rank, world);
    const int prev = RingPrevRank(rank, world);
    for (int step = 0; step < world; ++step) {
      RingStepTiming& st = timings.steps[step];
      const int src = RingSourceRank(rank, step, world);  // owner of the block in hand
      st.source_rank = src;
      // The step's kernels are enqueued before its transfer, so that NCCL's host-side launch
      // of a group (a thread of its own for a non-blocking communicator) overlaps them rather
      // than delaying them: with the transfer first, on 2 x H100 at 8k tokens per GPU, the
      // call's device time exceeded its steps' compute by 0.2-0.4 ms.
      RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->start_event(step), compute));
      const StepTarget target{output.ModeOf(step, world), ws->o_acc(), ws->lse_acc()};
      RA_RETURN_IF_ERROR(ComputeRingStep(backend, plan, rank, src, t, g, in_hand, target, options,
                                         alibi, scale, &st.kernel_calls));
      RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->compute_done_event(step), compute));
      if (step + 1 == world) break;
      const int incoming_src = RingSourceRank(rank, step + 1, world);
      const size_t send_bytes = g.KvBytes(t.batch, plan.shards[src].rows);
      const size_t recv_bytes = g.KvBytes(t.batch, plan.shards[incoming_src].rows);
      std::byte* slot = ws->slot(step % 2);
      // The slot was in hand at step - 1: its compute must be done before it is overwritten.
      // (At step 0 both slots are idle: the previous call drained the streams.)
      if (step > 0) {
        RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(transfer, ws->compute_done_event(step - 1), 0));
      }
      const SendOp sends[] = {{next, in_hand.k, send_bytes}, {next, in_hand.v, send_bytes}};
      const RecvOp recvs[] = {{prev, slot, recv_bytes}, {prev, slot + slot_kv_bytes, recv_bytes}};
      RA_RETURN_IF_ERROR(comm.Enqueue(sends, recvs, transfer));
      RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->comm_done_event(step), transfer));
      // The next block in hand: the compute stream idles here until it has arrived.
      RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(compute, ws->comm_done_event(step), 0));
      in_hand = {slot, slot + slot_kv_bytes};
    }
    // Finalize, unless the last step did: the fp32 accumulators rounded once into the caller's
    // dtype, and the lse.
    if (!output.last_finalizes) {
      RA_RETURN_IF_ERROR(LaunchConvertFromFloat(ws->o_acc(), t.out, t.dtype,
                                                static_cast<int64_t>(needs.o_elems), compute));
      if (t.lse != nullptr && needs.lse_elems > 0) {
        RA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(t.lse, ws->lse_acc(),
                                                needs.lse_elems * sizeof(float),
                                                cudaMemcpyDeviceToDevice, compute));
      }
    }
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws->end_event(), compute));
  }
  const double launch_seconds = std::chrono::duration<double>(Clock::now() - t0).count();

  // The compute stream waited for every comm_done, so it finishes last; the comm stream's
  // wait returns at once and only guards against a transport that enqueued more. (A one-rank
  // call enqueued nothing there.)
  RA_RETURN_IF_ERROR(comm.WaitStream(compute, comm.timeout()));
  if (!direct) RA_RETURN_IF_ERROR(comm.WaitStream(transfer, comm.timeout()));
  for (int step = 0; step < world; ++step) {
    RingStepTiming& st = timings.steps[step];
    RA_ASSIGN_OR_RETURN(st.compute_seconds,
                        ElapsedSeconds(ws->start_event(step), ws->compute_done_event(step)));
    if (!direct && step + 1 < world) {
      RA_ASSIGN_OR_RETURN(const double wait,
                          ElapsedSeconds(ws->compute_done_event(step), ws->comm_done_event(step)));
      st.comm_wait_seconds = std::max(0.0, wait);
    }
  }
  if (direct) {
    timings.device_seconds = timings.steps[0].compute_seconds;
  } else {
    RA_ASSIGN_OR_RETURN(timings.device_seconds,
                        ElapsedSeconds(ws->begin_event(), ws->end_event()));
  }
  timings.launch_seconds = launch_seconds;
  timings.total_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return timings;
}

}  // namespace

// ---- DeviceRingWorkspace --------------------------------------------------------------------

DeviceRingWorkspace::~DeviceRingWorkspace() {
  if (device_ < 0) return;  // never used
  // The destructor may run on another thread than the calls, with another device current.
  int current = -1;
  ReportIfError(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device_) ReportIfError(cudaSetDevice(device_), "cudaSetDevice");
  for (cudaStream_t s : {compute_stream_, comm_stream_}) {
    if (s == nullptr) continue;
    ReportIfError(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    ReportIfError(cudaStreamDestroy(s), "cudaStreamDestroy");
  }
  for (std::vector<cudaEvent_t>* events : {&start_, &compute_done_, &comm_done_}) {
    for (cudaEvent_t e : *events) ReportIfError(cudaEventDestroy(e), "cudaEventDestroy");
  }
  for (cudaEvent_t e : {begin_, end_}) {
    if (e != nullptr) ReportIfError(cudaEventDestroy(e), "cudaEventDestroy");
  }
  for (void* p : {static_cast<void*>(slots_), static_cast<void*>(o_acc_),
                  static_cast<void*>(lse_acc_), static_cast<void*>(alibi_)}) {
    if (p != nullptr) ReportIfError(cudaFree(p), "cudaFree");
  }
  if (current >= 0 && current != device_) ReportIfError(cudaSetDevice(current), "cudaSetDevice");
}

size_t DeviceRingWorkspace::bytes_reserved() const {
  return 2 * slot_bytes_ + (o_capacity_ + lse_capacity_ + alibi_capacity_) * sizeof(float);
}

absl::Status DeviceRingWorkspace::Reserve(const Needs& needs) {
  int device = -1;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (device_ >= 0 && device != device_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "ring workspace belongs to CUDA device ", device_, " but device ", device, " is current"));
  }
  device_ = device;
  if (compute_stream_ == nullptr) {
    RA_RETURN_IF_ERROR(device_ring_internal::CreateRingStreams(&compute_stream_, &comm_stream_));
  }
  const size_t steps = static_cast<size_t>(std::max(needs.steps, 1));
  RA_RETURN_IF_ERROR(GrowEvents(&start_, steps));
  RA_RETURN_IF_ERROR(GrowEvents(&compute_done_, steps));
  RA_RETURN_IF_ERROR(GrowEvents(&comm_done_, steps));
  RA_RETURN_IF_ERROR(device_ring_internal::EnsureEvent(&begin_));
  RA_RETURN_IF_ERROR(device_ring_internal::EnsureEvent(&end_));
  if (needs.slot_bytes > slot_bytes_) {
    if (slots_ != nullptr) RA_CUDA_RETURN_IF_ERROR(cudaFree(slots_));
    slots_ = nullptr;
    slot_bytes_ = 0;
    // cudaMalloc aligns to 256 bytes; slot 1 starts at 2 * KvBytes, a multiple of
    // heads_k * head_dim * 2 >= 128 bytes, which keeps the kernel's 16-byte loads aligned.
    RA_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&slots_), 2 * needs.slot_bytes));
    slot_bytes_ = needs.slot_bytes;
  }
  RA_RETURN_IF_ERROR(GrowFloats(&o_acc_, &o_capacity_, needs.o_elems));
  RA_RETURN_IF_ERROR(GrowFloats(&lse_acc_, &lse_capacity_, needs.lse_elems));
  return absl::OkStatus();
}

absl::StatusOr<const float*> DeviceRingWorkspace::AlibiSlopes(const std::vector<float>& slopes) {
  return device_ring_internal::UploadAlibiSlopes(slopes, &alibi_, &alibi_capacity_, &alibi_host_,
                                                 compute_stream_);
}

// ---- Kernels' launchers ---------------------------------------------------------------------

absl::Status LaunchFillFloat(float* x, int64_t n, float value, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  FillFloatKernel<<<BlocksFor(n), kThreads, 0, stream>>>(x, n, value);
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchConvertFromFloat(const float* src, void* dst, DType dtype, int64_t n,
                                    cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  switch (dtype) {
    case DType::kF32:
      RA_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream));
      return absl::OkStatus();
    case DType::kBF16:
      return LaunchConvert16<DType::kBF16>(src, dst, n, stream);
    case DType::kF16:
      return LaunchConvert16<DType::kF16>(src, dst, n, stream);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("no conversion from fp32 to dtype ", static_cast<int>(dtype)));
}

// ---- The driver -----------------------------------------------------------------------------

absl::StatusOr<RingTimings> RingFlashAttnForwardDevice(
    DeviceCommunicator& comm, AttentionBackend& backend, const ShardPlan& plan,
    const RingShardTensors& t, const RingAttentionOptions& options, DeviceRingWorkspace* ws) {
  absl::StatusOr<RingTimings> result = RunDeviceRing(comm, backend, plan, t, options, ws);
  if (result.ok()) return result;
  return device_ring_internal::AbortAndDrain(comm, result.status(),
                                             ws != nullptr ? ws->compute_stream() : nullptr,
                                             ws != nullptr ? ws->comm_stream() : nullptr);
}

}  // namespace ringattn
