#include "ring/testing/inprocess_ranks.h"

#include <cstddef>
#include <utility>

#include "base/status_macros.h"
#include "ring/transport/inprocess.h"

namespace ringattn {
namespace inprocess_internal {
namespace {

// Bytes of one row of q, k, v, out, dout in `dtype`.
struct RowBytes {
  size_t q, kv;
  RowBytes(int heads, int heads_k, int head_dim, DType dtype)
      : q(static_cast<size_t>(heads) * head_dim * DTypeSize(dtype)),
        kv(static_cast<size_t>(heads_k) * head_dim * DTypeSize(dtype)) {}
};

// What both passes' tensors start with: q, k, v in; then out, each given as (data, rows' shape).
template <typename Whole>
std::vector<WholeTensor> QkvAndOut(const Whole& w, WholeTensor out) {
  const RowBytes rb(w.heads, w.heads_k, w.head_dim, w.dtype);
  out.outer = w.batch;
  out.row_bytes = rb.q;
  return {{.in = w.q, .outer = w.batch, .row_bytes = rb.q},
          {.in = w.k, .outer = w.batch, .row_bytes = rb.kv},
          {.in = w.v, .outer = w.batch, .row_bytes = rb.kv},
          out};
}

// A shard view of either pass with the sizes and q, k, v set.
template <typename Tensors, typename Whole>
Tensors QkvView(const Whole& w, absl::Span<void* const> buffers) {
  Tensors t;
  t.dtype = w.dtype;
  t.batch = w.batch;
  t.heads = w.heads;
  t.heads_k = w.heads_k;
  t.head_dim = w.head_dim;
  t.q = buffers[0];
  t.k = buffers[1];
  t.v = buffers[2];
  return t;
}

// [batch, heads, seqlen] fp32.
WholeTensor Lse(const void* in, float* out, int batch, int heads) {
  return {.in = in,
          .out = out,
          .outer = static_cast<int64_t>(batch) * heads,
          .row_bytes = sizeof(float)};
}

}  // namespace

std::vector<WholeTensor> TensorsOf(const WholeAttention& w) {
  std::vector<WholeTensor> tensors = QkvAndOut(w, {.out = w.out});
  tensors.push_back(Lse(nullptr, w.lse, w.batch, w.heads));
  return tensors;
}

RingShardTensors ShardOf(const WholeAttention& w, absl::Span<void* const> buffers) {
  RingShardTensors t = QkvView<RingShardTensors>(w, buffers);
  t.out = buffers[3];
  t.lse = w.lse != nullptr ? static_cast<float*>(buffers[4]) : nullptr;
  return t;
}

std::vector<WholeTensor> TensorsOf(const WholeAttentionBackward& w) {
  std::vector<WholeTensor> tensors = QkvAndOut(w, {.in = w.out});
  const RowBytes rb(w.heads, w.heads_k, w.head_dim, w.dtype);
  const RowBytes grad(w.heads, w.heads_k, w.head_dim, w.grad_dtype);
  tensors.push_back({.in = w.dout, .outer = w.batch, .row_bytes = rb.q});
  tensors.push_back(Lse(w.lse, nullptr, w.batch, w.heads));
  tensors.push_back({.out = w.dq, .outer = w.batch, .row_bytes = grad.q});
  tensors.push_back({.out = w.dk, .outer = w.batch, .row_bytes = grad.kv});
  tensors.push_back({.out = w.dv, .outer = w.batch, .row_bytes = grad.kv});
  return tensors;
}

RingBackwardTensors ShardOf(const WholeAttentionBackward& w, absl::Span<void* const> buffers) {
  RingBackwardTensors t = QkvView<RingBackwardTensors>(w, buffers);
  t.grad_dtype = w.grad_dtype;
  t.out = buffers[3];
  t.dout = buffers[4];
  t.lse = static_cast<const float*>(buffers[5]);
  t.dq = buffers[6];
  t.dk = buffers[7];
  t.dv = buffers[8];
  return t;
}

namespace {

// The host driver of each pass.
absl::StatusOr<RingTimings> RunDriver(Communicator& comm, AttentionBackend& backend,
                                      const ShardPlan& plan, const RingShardTensors& t,
                                      const RingAttentionOptions& options) {
  return RingFlashAttnForward(comm, backend, plan, t, options);
}
absl::StatusOr<RingTimings> RunDriver(Communicator& comm, AttentionBackend& backend,
                                      const ShardPlan& plan, const RingBackwardTensors& t,
                                      const RingAttentionOptions& options) {
  return RingFlashAttnBackward(comm, backend, plan, t, options);
}

// The host run of either pass: shards the whole problem by the layout into zeroed host
// buffers, runs the ranks over a new InProcessGroup (each with a backend of its own), and
// gathers the wanted outputs.
template <typename Whole>
absl::StatusOr<std::vector<RingTimings>> RunOnHost(const Whole& whole, int world, Layout layout,
                                                   const RingAttentionOptions& options,
                                                   const BackendFactory& make_backend,
                                                   std::chrono::milliseconds timeout) {
  RA_ASSIGN_OR_RETURN(const ShardPlan plan, PlanShards(whole.seqlen, world, layout));
  const std::vector<WholeTensor> tensors = TensorsOf(whole);
  std::vector<std::vector<std::vector<std::byte>>> buffers(world);  // [rank][tensor]
  std::vector<std::vector<void*>> shards(world);                    // [rank][tensor]
  for (int r = 0; r < world; ++r) {
    const int64_t rows = plan.shards[r].rows;
    for (const WholeTensor& x : tensors) {
      std::vector<std::byte>& b = buffers[r].emplace_back(x.outer * rows * x.row_bytes);
      if (x.in != nullptr) ExtractShard(plan, r, x.in, x.outer, x.row_bytes, b.data());
      shards[r].push_back(b.data());
    }
  }
  RA_ASSIGN_OR_RETURN(std::vector<std::unique_ptr<Communicator>> comms,
                      InProcessGroup::CreateCommunicators(world, timeout));
  RA_ASSIGN_OR_RETURN(std::vector<RingTimings> timings,
                      RunRanksInThreads<Communicator>(
                          comms, [&](int r, Communicator& comm) -> absl::StatusOr<RingTimings> {
                            RA_ASSIGN_OR_RETURN(auto backend, make_backend());
                            return RunDriver(comm, *backend, plan, ShardOf(whole, shards[r]),
                                             options);
                          }));
  for (int r = 0; r < world; ++r) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const WholeTensor& x = tensors[i];
      if (x.out != nullptr) InsertShard(plan, r, shards[r][i], x.outer, x.row_bytes, x.out);
    }
  }
  return timings;
}

}  // namespace
}  // namespace inprocess_internal

absl::StatusOr<std::vector<RingTimings>> RunRingInProcess(const WholeAttention& whole, int world,
                                                          Layout layout,
                                                          const RingAttentionOptions& options,
                                                          const BackendFactory& make_backend,
                                                          std::chrono::milliseconds timeout) {
  return inprocess_internal::RunOnHost(whole, world, layout, options, make_backend, timeout);
}

absl::StatusOr<std::vector<RingTimings>> RunRingBackwardInProcess(
    const WholeAttentionBackward& whole, int world, Layout layout,
    const RingAttentionOptions& options, const BackendFactory& make_backend,
    std::chrono::milliseconds timeout) {
  return inprocess_internal::RunOnHost(whole, world, layout, options, make_backend, timeout);
}

}  // namespace ringattn
