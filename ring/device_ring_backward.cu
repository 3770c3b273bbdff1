#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "kernels/cuda/cuda_backward.h"
#include "kernels/dtype.h"
#include "ring/device_ring.h"  // LaunchConvertFromFloat
#include "ring/device_ring_backward.h"
#include "ring/device_ring_util.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;
using device_ring_internal::ElapsedSeconds;
using device_ring_internal::GrowEvents;
using device_ring_internal::GrowFloats;

constexpr int kThreads = 256;
// Grid-stride loops: enough blocks to fill an H100 (132 SMs x 2048 threads) several times
// over; more only adds scheduling (as device_ring.cu's kernels).
constexpr int64_t kMaxBlocks = 8192;

int BlocksFor(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
}

// ---- Kernels --------------------------------------------------------------------------------

// into[i] += from[i] for i < n, four floats per thread per iteration (16-byte loads and
// stores; the launcher checks the alignment), then the n % 4 tail one by one.
__global__ void AddFloatKernel(float* __restrict__ into,        // [n]
                               const float* __restrict__ from,  // [n]
                               int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t groups = n / 4;
  auto* into4 = reinterpret_cast<float4*>(into);
  const auto* from4 = reinterpret_cast<const float4*>(from);
  for (int64_t g = first; g < groups; g += stride) {
    float4 a = into4[g];
    const float4 b = from4[g];
    a.x += b.x;
    a.y += b.y;
    a.z += b.z;
    a.w += b.w;
    into4[g] = a;
  }
  for (int64_t i = groups * 4 + first; i < n; i += stride) into[i] += from[i];
}

// The same without alignment requirements, one float per thread per iteration.
__global__ void AddFloatScalarKernel(float* __restrict__ into,        // [n]
                                     const float* __restrict__ from,  // [n]
                                     int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    into[i] += from[i];
  }
}

// ---- The driver -----------------------------------------------------------------------------

void ReportIfError(cudaError_t e, const char* what) {
  device_ring_internal::ReportIfError("DeviceRingBackwardWorkspace", e, what);
}

// One rank's backward ring call: what every step needs, and the steps, the return hop and the
// rounding as separate enqueuing functions (device_ring_backward.h draws the schedule). The
// host only enqueues; Run waits once at the end.
class BackwardRingCall {
 public:
  BackwardRingCall(DeviceCommunicator& comm, AttentionBackwardBackend& backend,
                   const ShardPlan& plan, const RingBackwardTensors& t,
                   const RingAttentionOptions& options, DeviceRingBackwardWorkspace* ws)
      : comm_(comm),
        backend_(backend),
        plan_(plan),
        t_(t),
        options_(options),
        ws_(ws),
        world_(comm.world_size()),
        rank_(comm.rank()),
        g_(ShardGeometry::Of(ForwardView(t))),
        scale_(RingSoftmaxScale(options, t.head_dim)),
        // fp32 gradients: dQ accumulates in the caller's dq and the return hop lands in the
        // caller's dk and dv, so nothing is copied at the end.
        grads_in_place_(t.grad_dtype == DType::kF32) {}

  absl::StatusOr<RingTimings> Run();

 private:
  int64_t rows() const { return plan_.shards[rank_].rows; }
  int64_t RowsOf(int rank) const { return plan_.shards[rank].rows; }
  // Elements of this rank's dq and of each of its dk and dv.
  size_t DqElems() const { return static_cast<size_t>(t_.batch) * rows() * g_.q_row_elems; }
  size_t KvElems() const { return static_cast<size_t>(t_.batch) * rows() * g_.kv_row_elems; }
  cudaStream_t compute() const { return ws_->compute_stream(); }
  cudaStream_t transfer() const { return ws_->comm_stream(); }

  absl::Status Reserve();
  // One rank whose shard is one run of positions: one call writing the gradients.
  absl::Status EnqueueDirect(const Segment& whole_shard);
  // The ring: W steps, then the return hop.
  absl::Status EnqueueRing();
  // Posts step `step`'s transfers on the comm stream (nothing with one rank); sets *incoming
  // to where the next K/V block lands.
  absl::Status EnqueueTransfers(int step, const KvBlock& in_hand, KvBlock* incoming, bool* posted);
  // Step `step`'s kernels (its dK/dV accumulator zeroed first unless `write`: the first step,
  // BackwardStepWrites), then, after its transfers are enqueued, the merge of the received
  // accumulator.
  absl::Status EnqueueKernels(int step, const KvBlock& in_hand, bool write);
  absl::Status EnqueueMerge(int step, bool posted);
  // The complete accumulator of block rank + 1 to its owner, this rank's own from rank - 1
  // into `own`.
  absl::Status EnqueueReturnHop(const DkvBlock& own);
  // The fp32 gradients rounded once into the caller's (a copy for fp32; nothing when they are
  // the caller's already).
  absl::Status EnqueueStoreDq();
  absl::Status EnqueueStoreDkv(const DkvBlock& own);
  absl::Status ReadTimings(RingTimings* timings) const;

  DeviceCommunicator& comm_;
  AttentionBackwardBackend& backend_;
  const ShardPlan& plan_;
  const RingBackwardTensors& t_;
  const RingAttentionOptions& options_;
  DeviceRingBackwardWorkspace* const ws_;
  const int world_;
  const int rank_;
  const ShardGeometry g_;
  const float scale_;
  const bool grads_in_place_;
  const float* alibi_ = nullptr;  // device copy of options.alibi_slopes, or null
  float* dq_acc_ = nullptr;       // [batch, rows, heads, head_dim] fp32
  std::vector<int> kernel_calls_;
};

absl::Status BackwardRingCall::Reserve() {
  DeviceRingBackwardWorkspace::Needs needs;
  needs.steps = world_;
  needs.delta_elems = static_cast<size_t>(t_.batch) * t_.heads * rows();
  if (!grads_in_place_) needs.dq_elems = DqElems();
  if (world_ > 1) {
    needs.slot_bytes = 2 * g_.KvBytes(t_.batch, plan_.max_rows());
    needs.dkv_elems = DkvBlock::Floats(t_.batch, plan_.max_rows(), g_);
    needs.dkv_buffers = 3;
  } else {
    // One rank: the one accumulator is its own (in the direct call only for rounding).
    needs.dkv_elems = DkvBlock::Floats(t_.batch, rows(), g_);
    needs.dkv_buffers = 1;
  }
  RA_RETURN_IF_ERROR(ws_->Reserve(needs));
  RA_ASSIGN_OR_RETURN(alibi_, ws_->AlibiSlopes(options_.alibi_slopes));
  dq_acc_ = grads_in_place_ ? static_cast<float*>(t_.dq) : ws_->dq_acc();
  return absl::OkStatus();
}

absl::Status BackwardRingCall::EnqueueDirect(const Segment& whole_shard) {
  RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws_->start_event(0), compute()));
  const KvBlock kv{static_cast<const std::byte*>(t_.k), static_cast<const std::byte*>(t_.v)};
  const DkvBlock grads =
      grads_in_place_ ? DkvBlock{static_cast<float*>(t_.dk), static_cast<float*>(t_.dv), KvElems()}
                      : DkvBlock::At(ws_->dkv(0), t_.batch, rows(), g_);
  AttentionBackwardParams bp =
      SegmentPairBackwardParams(t_, g_, rows(), whole_shard, kv, rows(), whole_shard, dq_acc_,
                                ws_->delta(), grads, options_, alibi_, scale_);
  // Written, not added: every element of dq, dk and dv (zeros where nothing contributes), so
  // the call is not skipped even if it were wholly masked.
  bp.accumulate = false;
  RA_RETURN_IF_ERROR(backend_.Backward(bp));
  kernel_calls_[0] = 1;
  // The step's other events, so that timings read the same on every path.
  for (cudaEvent_t e :
       {ws_->kernels_done_event(0), ws_->comm_waited_event(0), ws_->step_done_event(0)}) {
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(e, compute()));
  }
  RA_RETURN_IF_ERROR(EnqueueStoreDq());
  return EnqueueStoreDkv(grads);
}

absl::Status BackwardRingCall::EnqueueTransfers(int step, const KvBlock& in_hand, KvBlock* incoming,
                                                bool* posted) {
  *posted = false;
  if (world_ == 1) return absl::OkStatus();
  const int next = RingNextRank(rank_, world_);
  const int prev = RingPrevRank(rank_, world_);
  const int src = RingSourceRank(rank_, step, world_);
  SendOp sends[3] = {};
  RecvOp recvs[3] = {};
  int n_sends = 0, n_recvs = 0;
  if (step + 1 < world_) {
    const int incoming_src = RingSourceRank(rank_, step + 1, world_);
    const size_t send_bytes = g_.KvBytes(t_.batch, RowsOf(src));
    const size_t recv_bytes = g_.KvBytes(t_.batch, RowsOf(incoming_src));
    const size_t slot_kv_bytes = g_.KvBytes(t_.batch, plan_.max_rows());
    std::byte* slot = ws_->slot(step % 2);
    *incoming = {slot, slot + slot_kv_bytes};
    sends[n_sends++] = {next, in_hand.k, send_bytes};
    sends[n_sends++] = {next, in_hand.v, send_bytes};
    recvs[n_recvs++] = {prev, slot, recv_bytes};
    recvs[n_recvs++] = {prev, slot + slot_kv_bytes, recv_bytes};
  }
  if (step >= 1) {
    const int finished_src = RingSourceRank(rank_, step - 1, world_);
    const DkvBlock finished =
        DkvBlock::At(ws_->dkv((step - 1) % 2), t_.batch, RowsOf(finished_src), g_);
    const DkvBlock received = DkvBlock::At(ws_->dkv(2), t_.batch, RowsOf(src), g_);
    sends[n_sends++] = {next, finished.dk, finished.Bytes()};
    recvs[n_recvs++] = {prev, received.dk, received.Bytes()};
    // The slot received into was in hand at step - 1, `finished` is complete only after step
    // - 1's add, and `received`'s buffer was read by that add: all before step_done[step - 1].
    // (At step 0 every buffer is idle: the previous call drained the streams.)
    RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(transfer(), ws_->step_done_event(step - 1), 0));
  }
  RA_RETURN_IF_ERROR(comm_.Enqueue(absl::MakeConstSpan(sends, n_sends),
                                   absl::MakeConstSpan(recvs, n_recvs), transfer()));
  RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws_->comm_done_event(step), transfer()));
  *posted = true;
  return absl::OkStatus();
}

absl::Status BackwardRingCall::EnqueueKernels(int step, const KvBlock& in_hand, bool write) {
  const int src = RingSourceRank(rank_, step, world_);
  const DkvBlock mine = DkvBlock::At(ws_->dkv(step % 2), t_.batch, RowsOf(src), g_);
  RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws_->start_event(step), compute()));
  // This rank's contribution to the block only; the others' arrive in `recv`.
  if (mine.elems > 0 && !write) {
    RA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(mine.dk, 0, mine.Bytes(), compute()));
  }
  RA_RETURN_IF_ERROR(ComputeBackwardStep(backend_, plan_, rank_, src, t_, g_, in_hand, dq_acc_,
                                         ws_->delta(), mine, options_, alibi_, scale_, write,
                                         &kernel_calls_[step]));
  RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws_->kernels_done_event(step), compute()));
  return absl::OkStatus();
}

absl::Status BackwardRingCall::EnqueueMerge(int step, bool posted) {
  // The next K/V block and the received accumulator: the compute stream idles here until
  // this step's transfers are done.
  if (posted) {
    RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(compute(), ws_->comm_done_event(step), 0));
  }
  RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws_->comm_waited_event(step), compute()));
  if (step >= 1) {
    // Ranks src .. rank - 1 in `received`, this rank's in `mine`: the host ring's order.
    const int src = RingSourceRank(rank_, step, world_);
    const DkvBlock mine = DkvBlock::At(ws_->dkv(step % 2), t_.batch, RowsOf(src), g_);
    const DkvBlock received = DkvBlock::At(ws_->dkv(2), t_.batch, RowsOf(src), g_);
    RA_RETURN_IF_ERROR(
        LaunchAddFloat(mine.dk, received.dk, static_cast<int64_t>(2 * mine.elems), compute()));
  }
  RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws_->step_done_event(step), compute()));
  return absl::OkStatus();
}

absl::Status BackwardRingCall::EnqueueReturnHop(const DkvBlock& own) {
  const int last_src = RingSourceRank(rank_, world_ - 1, world_);
  const DkvBlock finished =
      DkvBlock::At(ws_->dkv((world_ - 1) % 2), t_.batch, RowsOf(last_src), g_);
  const int next = RingNextRank(rank_, world_);
  const int prev = RingPrevRank(rank_, world_);
  // dk and dv as two transfers: `own` may be the caller's two separate buffers.
  const size_t sent_bytes = finished.elems * sizeof(float);
  const size_t own_bytes = own.elems * sizeof(float);
  const SendOp sends[] = {{next, finished.dk, sent_bytes}, {next, finished.dv, sent_bytes}};
  const RecvOp recvs[] = {{prev, own.dk, own_bytes}, {prev, own.dv, own_bytes}};
  RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(transfer(), ws_->step_done_event(world_ - 1), 0));
  RA_RETURN_IF_ERROR(comm_.Enqueue(sends, recvs, transfer()));
  RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws_->return_done_event(), transfer()));
  RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(compute(), ws_->return_done_event(), 0));
  RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws_->return_waited_event(), compute()));
  return absl::OkStatus();
}

absl::Status BackwardRingCall::EnqueueStoreDq() {
  if (grads_in_place_) return absl::OkStatus();
  return LaunchConvertFromFloat(dq_acc_, t_.dq, t_.grad_dtype, static_cast<int64_t>(DqElems()),
                                compute());
}

absl::Status BackwardRingCall::EnqueueStoreDkv(const DkvBlock& own) {
  if (own.dk == t_.dk && own.dv == t_.dv) return absl::OkStatus();  // written in place
  const int64_t n = static_cast<int64_t>(own.elems);
  RA_RETURN_IF_ERROR(LaunchConvertFromFloat(own.dk, t_.dk, t_.grad_dtype, n, compute()));
  return LaunchConvertFromFloat(own.dv, t_.dv, t_.grad_dtype, n, compute());
}

absl::Status BackwardRingCall::EnqueueRing() {
  // The first step (the rank's own block) writes dq and its dK/dV whole where it is one call
  // over both shards (every layout with the cuda kernels): no zeroing passes.
  const bool first_writes = BackwardStepWrites(plan_, rank_, rank_, backend_);
  if (DqElems() > 0 && !first_writes) {
    RA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dq_acc_, 0, DqElems() * sizeof(float), compute()));
  }
  // Step 0 computes and sends straight from the caller's K/V. Each step's kernels are
  // enqueued before its transfers, as in the forward (device_ring.cu): NCCL's host-side group
  // launch then overlaps them instead of delaying them.
  KvBlock in_hand{static_cast<const std::byte*>(t_.k), static_cast<const std::byte*>(t_.v)};
  for (int step = 0; step < world_; ++step) {
    RA_RETURN_IF_ERROR(EnqueueKernels(step, in_hand, step == 0 && first_writes));
    KvBlock incoming;
    bool posted = false;
    RA_RETURN_IF_ERROR(EnqueueTransfers(step, in_hand, &incoming, &posted));
    RA_RETURN_IF_ERROR(EnqueueMerge(step, posted));
    if (step + 1 < world_) in_hand = incoming;
  }
  // dq is final once the last step's calls are done: rounded while the return hop travels.
  RA_RETURN_IF_ERROR(EnqueueStoreDq());
  if (world_ == 1) return EnqueueStoreDkv(DkvBlock::At(ws_->dkv(0), t_.batch, rows(), g_));
  const DkvBlock own =
      grads_in_place_ ? DkvBlock{static_cast<float*>(t_.dk), static_cast<float*>(t_.dv), KvElems()}
                      : DkvBlock::At(ws_->dkv(2), t_.batch, rows(), g_);
  RA_RETURN_IF_ERROR(EnqueueReturnHop(own));
  return EnqueueStoreDkv(own);
}

absl::Status BackwardRingCall::ReadTimings(RingTimings* timings) const {
  timings->steps.resize(world_);
  for (int step = 0; step < world_; ++step) {
    RingStepTiming& st = timings->steps[step];
    st.source_rank = RingSourceRank(rank_, step, world_);
    st.kernel_calls = kernel_calls_[step];
    RA_ASSIGN_OR_RETURN(const double kernels,
                        ElapsedSeconds(ws_->start_event(step), ws_->kernels_done_event(step)));
    RA_ASSIGN_OR_RETURN(const double wait, ElapsedSeconds(ws_->kernels_done_event(step),
                                                          ws_->comm_waited_event(step)));
    RA_ASSIGN_OR_RETURN(const double add,
                        ElapsedSeconds(ws_->comm_waited_event(step), ws_->step_done_event(step)));
    // Events of one stream complete in order; max() only guards the timer's resolution.
    st.compute_seconds = std::max(0.0, kernels) + std::max(0.0, add);
    st.comm_wait_seconds = std::max(0.0, wait);
  }
  if (world_ > 1) {
    RA_ASSIGN_OR_RETURN(const double hop, ElapsedSeconds(ws_->step_done_event(world_ - 1),
                                                         ws_->return_waited_event()));
    timings->steps.back().comm_wait_seconds += std::max(0.0, hop);
  }
  return absl::OkStatus();
}

absl::StatusOr<RingTimings> BackwardRingCall::Run() {
  const auto t0 = Clock::now();
  RA_RETURN_IF_ERROR(ValidateRingBackward(options_, t_));
  RA_RETURN_IF_ERROR(CheckPlanMatchesGroup(plan_, rank_, world_));
  RA_RETURN_IF_ERROR(CheckPackedSequences(options_, plan_, backend_.supports_packed_sequences(),
                                          backend_.name()));
  CudaBackwardBackend* cuda = AsCudaBackwardBackend(&backend_);
  if (backend_.memory_space() != MemorySpace::kDevice || cuda == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("the device ring backward needs a CUDA backward backend (cuda, cudnn), "
                     "got '",
                     std::string(backend_.name()), "'"));
  }
  if (ws_ == nullptr) {
    return absl::InvalidArgumentError("the device ring backward needs a workspace");
  }
  RA_RETURN_IF_ERROR(CheckShardTensorsSet(t_, rank_, rows()));
  RA_RETURN_IF_ERROR(Reserve());
  device_ring_internal::ScopedBackendStream<CudaBackwardBackend> stream_scope(cuda, compute());
  kernel_calls_.assign(world_, 0);

  // D once per rank for every step (the direct call too: the backend then needs no scratch).
  RA_RETURN_IF_ERROR(ComputeShardDelta(backend_, t_, rows(), ws_->delta()));
  // One rank whose shard is one run of positions (every layout with one rank): one call.
  const std::optional<Segment> single =
      world_ == 1 ? AsSingleSegment(plan_.shards[rank_]) : std::nullopt;
  if (single.has_value()) {
    RA_RETURN_IF_ERROR(EnqueueDirect(*single));
  } else {
    // Also one rank with no rows (no segment): one step of no calls, zero-sized stores.
    RA_RETURN_IF_ERROR(EnqueueRing());
  }

  // The compute stream waited for every comm_done and for the return hop, so it finishes
  // last; the comm stream's wait returns at once and only guards against a transport that
  // enqueued more. (One rank enqueued nothing there.)
  RA_RETURN_IF_ERROR(comm_.WaitStream(compute(), comm_.timeout()));
  if (world_ > 1) RA_RETURN_IF_ERROR(comm_.WaitStream(transfer(), comm_.timeout()));
  RingTimings timings;
  RA_RETURN_IF_ERROR(ReadTimings(&timings));
  timings.total_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return timings;
}

}  // namespace

// ---- DeviceRingBackwardWorkspace ------------------------------------------------------------

DeviceRingBackwardWorkspace::~DeviceRingBackwardWorkspace() {
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
  for (std::vector<cudaEvent_t>* events :
       {&start_, &kernels_done_, &comm_done_, &comm_waited_, &step_done_}) {
    for (cudaEvent_t e : *events) ReportIfError(cudaEventDestroy(e), "cudaEventDestroy");
  }
  for (cudaEvent_t e : {return_done_, return_waited_}) {
    if (e != nullptr) ReportIfError(cudaEventDestroy(e), "cudaEventDestroy");
  }
  for (void* p :
       {static_cast<void*>(slots_), static_cast<void*>(dq_acc_), static_cast<void*>(delta_),
        static_cast<void*>(dkv_), static_cast<void*>(alibi_)}) {
    if (p != nullptr) ReportIfError(cudaFree(p), "cudaFree");
  }
  if (current >= 0 && current != device_) ReportIfError(cudaSetDevice(current), "cudaSetDevice");
}

size_t DeviceRingBackwardWorkspace::bytes_reserved() const {
  return 2 * slot_bytes_ +
         (dq_capacity_ + delta_capacity_ + dkv_stride_ * dkv_buffers_ + alibi_capacity_) *
             sizeof(float);
}

absl::Status DeviceRingBackwardWorkspace::Reserve(const Needs& needs) {
  int device = -1;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (device_ >= 0 && device != device_) {
    return absl::FailedPreconditionError(
        absl::StrCat("ring backward workspace belongs to CUDA device ", device_, " but device ",
                     device, " is current"));
  }
  device_ = device;
  if (compute_stream_ == nullptr) {
    RA_RETURN_IF_ERROR(device_ring_internal::CreateRingStreams(&compute_stream_, &comm_stream_));
  }
  const size_t steps = static_cast<size_t>(std::max(needs.steps, 1));
  for (std::vector<cudaEvent_t>* events :
       {&start_, &kernels_done_, &comm_done_, &comm_waited_, &step_done_}) {
    RA_RETURN_IF_ERROR(GrowEvents(events, steps));
  }
  RA_RETURN_IF_ERROR(device_ring_internal::EnsureEvent(&return_done_));
  RA_RETURN_IF_ERROR(device_ring_internal::EnsureEvent(&return_waited_));
  if (needs.slot_bytes > slot_bytes_) {
    if (slots_ != nullptr) RA_CUDA_RETURN_IF_ERROR(cudaFree(slots_));
    slots_ = nullptr;
    slot_bytes_ = 0;
    // cudaMalloc aligns to 256 bytes; slot 1 starts at 2 * KvBytes, a multiple of
    // heads_k * head_dim * 2 >= 128 bytes, which keeps the kernels' 16-byte loads aligned.
    RA_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&slots_), 2 * needs.slot_bytes));
    slot_bytes_ = needs.slot_bytes;
  }
  RA_RETURN_IF_ERROR(GrowFloats(&dq_acc_, &dq_capacity_, needs.dq_elems));
  RA_RETURN_IF_ERROR(GrowFloats(&delta_, &delta_capacity_, needs.delta_elems));
  // The accumulators keep their stride (and so their offsets) until a call needs more of
  // either; each starts at a multiple of heads_k * head_dim floats (>= 256 bytes) from the
  // 256-byte aligned base, so the add kernel's 16-byte path applies.
  if (needs.dkv_elems > dkv_stride_ || needs.dkv_buffers > dkv_buffers_) {
    const size_t stride = std::max(needs.dkv_elems, dkv_stride_);
    const int buffers = std::max(needs.dkv_buffers, dkv_buffers_);
    size_t capacity = 0;
    if (dkv_ != nullptr) RA_CUDA_RETURN_IF_ERROR(cudaFree(dkv_));
    dkv_ = nullptr;
    dkv_stride_ = 0;
    dkv_buffers_ = 0;
    RA_RETURN_IF_ERROR(GrowFloats(&dkv_, &capacity, stride * buffers));
    dkv_stride_ = stride;
    dkv_buffers_ = buffers;
  }
  return absl::OkStatus();
}

absl::StatusOr<const float*> DeviceRingBackwardWorkspace::AlibiSlopes(
    const std::vector<float>& slopes) {
  return device_ring_internal::UploadAlibiSlopes(slopes, &alibi_, &alibi_capacity_, &alibi_host_,
                                                 compute_stream_);
}

// ---- Kernel launcher and driver -------------------------------------------------------------

absl::Status LaunchAddFloat(float* into, const float* from, int64_t n, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  const bool aligned =
      reinterpret_cast<uintptr_t>(into) % 16 == 0 && reinterpret_cast<uintptr_t>(from) % 16 == 0;
  if (aligned) {
    AddFloatKernel<<<BlocksFor(std::max<int64_t>(n / 4, 1)), kThreads, 0, stream>>>(into, from, n);
  } else {
    AddFloatScalarKernel<<<BlocksFor(n), kThreads, 0, stream>>>(into, from, n);
  }
  RA_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::StatusOr<RingTimings> RingFlashAttnBackwardDevice(DeviceCommunicator& comm,
                                                        AttentionBackwardBackend& backend,
                                                        const ShardPlan& plan,
                                                        const RingBackwardTensors& t,
                                                        const RingAttentionOptions& options,
                                                        DeviceRingBackwardWorkspace* ws) {
  absl::StatusOr<RingTimings> result = BackwardRingCall(comm, backend, plan, t, options, ws).Run();
  if (result.ok()) return result;
  return device_ring_internal::AbortAndDrain(comm, result.status(),
                                             ws != nullptr ? ws->compute_stream() : nullptr,
                                             ws != nullptr ? ws->comm_stream() : nullptr);
}

}  // namespace ringattn
