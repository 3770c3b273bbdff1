#include "ring/testing/device_inprocess_ring_backward.h"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "ring/device_ring_util.h"
#include "ring/testing/device_inprocess_ring.h"  // device_ring_internal::RunRanksInThreads

namespace ringattn {
namespace {

using device_ring_internal::DeviceAllocation;

// Bytes of one row of each kind of tensor of a whole problem.
struct RowBytes {
  size_t q, kv, dq, dkv;

  static RowBytes Of(const WholeAttentionBackward& w) {
    const size_t es = DTypeSize(w.dtype), gs = DTypeSize(w.grad_dtype);
    const size_t q_elems = static_cast<size_t>(w.heads) * w.head_dim;
    const size_t kv_elems = static_cast<size_t>(w.heads_k) * w.head_dim;
    return {q_elems * es, kv_elems * es, q_elems * gs, kv_elems * gs};
  }
};

// One rank's shard on the device, rows in the plan's local order.
struct DeviceShard {
  DeviceAllocation q, out, dout;  // [batch, rows, heads, head_dim], dtype
  DeviceAllocation k, v;          // [batch, rows, heads_k, head_dim], dtype
  DeviceAllocation lse;           // [batch, heads, rows] fp32
  DeviceAllocation dq;            // [batch, rows, heads, head_dim], grad_dtype
  DeviceAllocation dk, dv;        // [batch, rows, heads_k, head_dim], grad_dtype
};

// Copies host tensors to and from the device on one stream of its own, synchronously per
// tensor: the host staging buffer is reused, and an async copy from pageable memory is only
// staged, not done, when it returns.
class Staging {
 public:
  ~Staging() {
    if (stream_ != nullptr) {
      device_ring_internal::ReportIfError("RunDeviceRingBackwardInProcess",
                                          cudaStreamDestroy(stream_), "cudaStreamDestroy");
    }
  }
  absl::Status Init() {
    RA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    return absl::OkStatus();
  }
  // dst <- rank's rows of `whole` [outer, seqlen, row_bytes].
  absl::Status Upload(const ShardPlan& plan, int rank, const void* whole, int64_t outer,
                      size_t row_bytes, const DeviceAllocation& dst) {
    if (dst.bytes() == 0) return absl::OkStatus();
    host_.resize(dst.bytes());
    ExtractShard(plan, rank, whole, outer, row_bytes, host_.data());
    RA_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst.get(), host_.data(), dst.bytes(), cudaMemcpyHostToDevice, stream_));
    RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }
  // rank's rows of `whole` <- src.
  absl::Status Download(const ShardPlan& plan, int rank, const DeviceAllocation& src, int64_t outer,
                        size_t row_bytes, void* whole) {
    if (src.bytes() == 0) return absl::OkStatus();
    host_.resize(src.bytes());
    RA_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host_.data(), src.get(), src.bytes(), cudaMemcpyDeviceToHost, stream_));
    RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    InsertShard(plan, rank, host_.data(), outer, row_bytes, whole);
    return absl::OkStatus();
  }
  // All bytes 0xff: NaN in fp32, fp16 and bf16.
  absl::Status Poison(const DeviceAllocation& d) {
    if (d.bytes() == 0) return absl::OkStatus();
    RA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d.get(), 0xff, d.bytes(), stream_));
    RA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

 private:
  cudaStream_t stream_ = nullptr;
  std::vector<std::byte> host_;
};

// Allocates rank's shard, uploads its inputs, poisons its gradients; returns its view.
absl::StatusOr<RingBackwardTensors> UploadRank(const WholeAttentionBackward& w,
                                               const ShardPlan& plan, int rank, Staging& staging,
                                               DeviceShard& d) {
  const int64_t rows = plan.shards[rank].rows;
  const RowBytes rb = RowBytes::Of(w);
  const int64_t lse_outer = static_cast<int64_t>(w.batch) * w.heads;
  const size_t q_bytes = w.batch * rows * rb.q, kv_bytes = w.batch * rows * rb.kv;
  const size_t dq_bytes = w.batch * rows * rb.dq, dkv_bytes = w.batch * rows * rb.dkv;
  for (DeviceAllocation* a : {&d.q, &d.out, &d.dout}) RA_RETURN_IF_ERROR(a->Allocate(q_bytes));
  for (DeviceAllocation* a : {&d.k, &d.v}) RA_RETURN_IF_ERROR(a->Allocate(kv_bytes));
  RA_RETURN_IF_ERROR(d.lse.Allocate(lse_outer * rows * sizeof(float)));
  RA_RETURN_IF_ERROR(d.dq.Allocate(dq_bytes));
  for (DeviceAllocation* a : {&d.dk, &d.dv}) RA_RETURN_IF_ERROR(a->Allocate(dkv_bytes));

  RA_RETURN_IF_ERROR(staging.Upload(plan, rank, w.q, w.batch, rb.q, d.q));
  RA_RETURN_IF_ERROR(staging.Upload(plan, rank, w.k, w.batch, rb.kv, d.k));
  RA_RETURN_IF_ERROR(staging.Upload(plan, rank, w.v, w.batch, rb.kv, d.v));
  RA_RETURN_IF_ERROR(staging.Upload(plan, rank, w.out, w.batch, rb.q, d.out));
  RA_RETURN_IF_ERROR(staging.Upload(plan, rank, w.dout, w.batch, rb.q, d.dout));
  RA_RETURN_IF_ERROR(staging.Upload(plan, rank, w.lse, lse_outer, sizeof(float), d.lse));
  for (DeviceAllocation* a : {&d.dq, &d.dk, &d.dv}) RA_RETURN_IF_ERROR(staging.Poison(*a));

  RingBackwardTensors t;
  t.dtype = w.dtype;
  t.grad_dtype = w.grad_dtype;
  t.batch = w.batch;
  t.heads = w.heads;
  t.heads_k = w.heads_k;
  t.head_dim = w.head_dim;
  t.q = d.q.get();
  t.k = d.k.get();
  t.v = d.v.get();
  t.out = d.out.get();
  t.lse = static_cast<const float*>(d.lse.get());
  t.dout = d.dout.get();
  t.dq = d.dq.get();
  t.dk = d.dk.get();
  t.dv = d.dv.get();
  return t;
}

}  // namespace

// ---- DeviceInProcessRingBackward ------------------------------------------------------------

DeviceInProcessRingBackward::DeviceInProcessRingBackward(int world,
                                                         BackwardBackendFactory make_backend,
                                                         std::chrono::milliseconds timeout,
                                                         int device)
    : world_(world),
      make_backend_(std::move(make_backend)),
      timeout_(timeout),
      device_(device),
      backends_(world) {
  for (int r = 0; r < world; ++r) {
    workspaces_.push_back(std::make_unique<DeviceRingBackwardWorkspace>());
  }
}

DeviceInProcessRingBackward::~DeviceInProcessRingBackward() = default;

absl::StatusOr<std::unique_ptr<DeviceInProcessRingBackward>> DeviceInProcessRingBackward::Create(
    int world, BackwardBackendFactory make_backend, std::chrono::milliseconds timeout) {
  if (world < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world size must be >= 1, got ", world));
  }
  if (!make_backend) return absl::InvalidArgumentError("no backward backend factory");
  int device = -1;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  std::unique_ptr<DeviceInProcessRingBackward> ring(
      new DeviceInProcessRingBackward(world, std::move(make_backend), timeout, device));
  RA_RETURN_IF_ERROR(device_ring_internal::EnsureHealthyGroup(world, timeout, &ring->comms_));
  return ring;
}

size_t DeviceInProcessRingBackward::workspace_bytes() const {
  size_t bytes = 0;
  for (const auto& ws : workspaces_) bytes += ws->bytes_reserved();
  return bytes;
}

absl::StatusOr<std::vector<RingTimings>> DeviceInProcessRingBackward::Run(
    const ShardPlan& plan, absl::Span<const RingBackwardTensors> shards,
    const RingAttentionOptions& options) {
  if (plan.world != world_ || shards.size() != static_cast<size_t>(world_)) {
    return absl::InvalidArgumentError(absl::StrCat("a ring of ", world_, " ranks got a plan for ",
                                                   plan.world, " and ", shards.size(), " shards"));
  }
  RA_RETURN_IF_ERROR(device_ring_internal::EnsureHealthyGroup(world_, timeout_, &comms_));
  return device_ring_internal::RunRanksInThreads(
      device_, comms_, [&](int r, DeviceCommunicator& comm) -> absl::StatusOr<RingTimings> {
        if (backends_[r] == nullptr) {
          RA_ASSIGN_OR_RETURN(backends_[r], make_backend_());
        }
        return RingFlashAttnBackwardDevice(comm, *backends_[r], plan, shards[r], options,
                                           workspaces_[r].get());
      });
}

// ---- RunDeviceRingBackwardInProcess ---------------------------------------------------------

absl::StatusOr<std::vector<RingTimings>> RunDeviceRingBackwardInProcess(
    const WholeAttentionBackward& whole, int world, Layout layout,
    const RingAttentionOptions& options, const BackwardBackendFactory& make_backend,
    std::chrono::milliseconds timeout) {
  RA_ASSIGN_OR_RETURN(const ShardPlan plan, PlanShards(whole.seqlen, world, layout));
  Staging staging;
  RA_RETURN_IF_ERROR(staging.Init());
  std::vector<DeviceShard> shards(world);
  std::vector<RingBackwardTensors> views(world);
  for (int r = 0; r < world; ++r) {
    RA_ASSIGN_OR_RETURN(views[r], UploadRank(whole, plan, r, staging, shards[r]));
  }

  RA_ASSIGN_OR_RETURN(std::unique_ptr<DeviceInProcessRingBackward> ring,
                      DeviceInProcessRingBackward::Create(world, make_backend, timeout));
  RA_ASSIGN_OR_RETURN(std::vector<RingTimings> timings, ring->Run(plan, views, options));

  const RowBytes rb = RowBytes::Of(whole);
  for (int r = 0; r < world; ++r) {
    const DeviceShard& d = shards[r];
    RA_RETURN_IF_ERROR(staging.Download(plan, r, d.dq, whole.batch, rb.dq, whole.dq));
    RA_RETURN_IF_ERROR(staging.Download(plan, r, d.dk, whole.batch, rb.dkv, whole.dk));
    RA_RETURN_IF_ERROR(staging.Download(plan, r, d.dv, whole.batch, rb.dkv, whole.dv));
  }
  return timings;
}

}  // namespace ringattn
