#include "ring/testing/inprocess_ranks.h"

#include <cstddef>
#include <thread>

#include "base/status_macros.h"
#include "ring/transport/inprocess.h"

namespace ringattn {
namespace {

// One rank's shard buffers, rows in the plan's local order.
struct RankShard {
  std::vector<std::byte> q, k, v, out;  // [batch, rows, heads(_k), head_dim]
  std::vector<float> lse;               // [batch, heads, rows]
};

RankShard ExtractRank(const WholeAttention& w, const ShardPlan& plan, int rank) {
  const int64_t rows = plan.shards[rank].rows;
  const size_t es = DTypeSize(w.dtype);
  const size_t q_row = static_cast<size_t>(w.heads) * w.head_dim * es;
  const size_t kv_row = static_cast<size_t>(w.heads_k) * w.head_dim * es;
  RankShard s;
  s.q.resize(w.batch * rows * q_row);
  s.k.resize(w.batch * rows * kv_row);
  s.v.resize(s.k.size());
  s.out.resize(s.q.size());
  s.lse.resize(static_cast<size_t>(w.batch) * w.heads * rows);
  ExtractShard(plan, rank, w.q, w.batch, q_row, s.q.data());
  ExtractShard(plan, rank, w.k, w.batch, kv_row, s.k.data());
  ExtractShard(plan, rank, w.v, w.batch, kv_row, s.v.data());
  return s;
}

}  // namespace

absl::StatusOr<std::vector<RingTimings>> RunRingInProcess(
    const WholeAttention& whole, int world, Layout layout, const RingAttentionOptions& options,
    const BackendFactory& make_backend, std::chrono::milliseconds timeout) {
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
      absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = make_backend();
      if (!backend.ok()) {
        comm->Abort(backend.status());
        results[r] = backend.status();
        return;
      }
      RingShardTensors t;
      t.dtype = whole.dtype;
      t.batch = whole.batch;
      t.heads = whole.heads;
      t.heads_k = whole.heads_k;
      t.head_dim = whole.head_dim;
      t.q = shards[r].q.data();
      t.k = shards[r].k.data();
      t.v = shards[r].v.data();
      t.out = shards[r].out.data();
      t.lse = shards[r].lse.data();
      results[r] = RingFlashAttnForward(*comm, **backend, plan, t, options);
    });
  }
  for (std::thread& t : threads) t.join();

  std::vector<RingTimings> timings;
  for (int r = 0; r < world; ++r) {
    if (!results[r].ok()) return results[r].status();
    timings.push_back(*std::move(results[r]));
  }
  const size_t q_row = static_cast<size_t>(whole.heads) * whole.head_dim * DTypeSize(whole.dtype);
  for (int r = 0; r < world; ++r) {
    InsertShard(plan, r, shards[r].out.data(), whole.batch, q_row, whole.out);
    if (whole.lse != nullptr) {
      InsertShard(plan, r, shards[r].lse.data(), static_cast<int64_t>(whole.batch) * whole.heads,
                  sizeof(float), whole.lse);
    }
  }
  return timings;
}

}  // namespace ringattn
