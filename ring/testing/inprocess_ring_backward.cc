#include "ring/testing/inprocess_ring_backward.h"

#include <cstddef>
#include <thread>

#include "base/status_macros.h"
#include "ring/transport/inprocess.h"

namespace ringattn {
namespace {

// One rank's shard buffers, rows in the plan's local order.
struct RankShard {
  std::vector<std::byte> q, k, v, out, dout;  // [batch, rows, heads(_k), head_dim], dtype
  std::vector<float> lse;                     // [batch, heads, rows]
  std::vector<std::byte> dq, dk, dv;          // [batch, rows, heads(_k), head_dim], grad_dtype
};

// Bytes of one row of each kind of tensor.
struct RowBytes {
  size_t q, kv, dq, dkv;

  static RowBytes Of(const WholeAttentionBackward& w) {
    const size_t es = DTypeSize(w.dtype), gs = DTypeSize(w.grad_dtype);
    const size_t q_elems = static_cast<size_t>(w.heads) * w.head_dim;
    const size_t kv_elems = static_cast<size_t>(w.heads_k) * w.head_dim;
    return {q_elems * es, kv_elems * es, q_elems * gs, kv_elems * gs};
  }
};

RankShard ExtractRank(const WholeAttentionBackward& w, const ShardPlan& plan, int rank) {
  const int64_t rows = plan.shards[rank].rows;
  const RowBytes rb = RowBytes::Of(w);
  RankShard s;
  s.q.resize(w.batch * rows * rb.q);
  s.out.resize(s.q.size());
  s.dout.resize(s.q.size());
  s.k.resize(w.batch * rows * rb.kv);
  s.v.resize(s.k.size());
  s.lse.resize(static_cast<size_t>(w.batch) * w.heads * rows);
  s.dq.resize(w.batch * rows * rb.dq);
  s.dk.resize(w.batch * rows * rb.dkv);
  s.dv.resize(s.dk.size());
  ExtractShard(plan, rank, w.q, w.batch, rb.q, s.q.data());
  ExtractShard(plan, rank, w.k, w.batch, rb.kv, s.k.data());
  ExtractShard(plan, rank, w.v, w.batch, rb.kv, s.v.data());
  ExtractShard(plan, rank, w.out, w.batch, rb.q, s.out.data());
  ExtractShard(plan, rank, w.dout, w.batch, rb.q, s.dout.data());
  ExtractShard(plan, rank, w.lse, static_cast<int64_t>(w.batch) * w.heads, sizeof(float),
               s.lse.data());
  return s;
}

RingBackwardTensors ShardTensors(const WholeAttentionBackward& w, RankShard& s) {
  RingBackwardTensors t;
  t.dtype = w.dtype;
  t.grad_dtype = w.grad_dtype;
  t.batch = w.batch;
  t.heads = w.heads;
  t.heads_k = w.heads_k;
  t.head_dim = w.head_dim;
  t.q = s.q.data();
  t.k = s.k.data();
  t.v = s.v.data();
  t.out = s.out.data();
  t.lse = s.lse.data();
  t.dout = s.dout.data();
  t.dq = s.dq.data();
  t.dk = s.dk.data();
  t.dv = s.dv.data();
  return t;
}

}  // namespace

absl::StatusOr<std::vector<RingTimings>> RunRingBackwardInProcess(
    const WholeAttentionBackward& whole, int world, Layout layout,
    const RingAttentionOptions& options, const BackwardBackendFactory& make_backend,
    std::chrono::milliseconds timeout) {
  RA_ASSIGN_OR_RETURN(const ShardPlan plan, PlanShards(whole.seqlen, world, layout));
  std::vector<RankShard> shards;
  for (int r = 0; r < world; ++r) shards.push_back(ExtractRank(whole, plan, r));

  RA_ASSIGN_OR_RETURN(std::vector<std::unique_ptr<Communicator>> comms,
                      InProcessGroup::CreateCommunicators(world, timeout));
  std::vector<absl::StatusOr<RingTimings>> results(world, absl::UnknownError("rank did not run"));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      Communicator* comm = comms[r].get();
      absl::StatusOr<std::unique_ptr<AttentionBackwardBackend>> backend = make_backend();
      if (!backend.ok()) {
        comm->Abort(backend.status());
        results[r] = backend.status();
        return;
      }
      results[r] =
          RingFlashAttnBackward(*comm, **backend, plan, ShardTensors(whole, shards[r]), options);
    });
  }
  for (std::thread& t : threads) t.join();

  std::vector<RingTimings> timings;
  for (int r = 0; r < world; ++r) {
    if (!results[r].ok()) return results[r].status();
    timings.push_back(*std::move(results[r]));
  }
  const RowBytes rb = RowBytes::Of(whole);
  for (int r = 0; r < world; ++r) {
    InsertShard(plan, r, shards[r].dq.data(), whole.batch, rb.dq, whole.dq);
    InsertShard(plan, r, shards[r].dk.data(), whole.batch, rb.dkv, whole.dk);
    InsertShard(plan, r, shards[r].dv.data(), whole.batch, rb.dkv, whole.dv);
  }
  return timings;
}

}  // namespace ringattn
