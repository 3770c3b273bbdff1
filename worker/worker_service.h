// The worker's side of the internal API (ringattn.v1.WorkerService): joins the ring the
// coordinator forms and runs this rank's shard of each request through it.
//
// One ring at a time. JoinRing drops the previous ring (aborting its communicator, which fails
// a shard still running on it), then rendezvouses with the other ranks through the
// coordinator's store (CoordinatorStore) and connects its transport. The compute calls
// (RunShard, RunShardBackward: one shard header, then the tensors proto/compute_rpcs.h lists)
// run one request at a time; a stale generation is refused with FAILED_PRECONDITION. A
// cancelled call or a passed deadline aborts the communicator, so the ring stops at once on
// every rank instead of waiting for its transport timeout. After any failed compute call the
// ring is dead: the worker drops it, Ping reports generation 0, and the coordinator forms a new
// one.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <set>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "kernels/attention_shape.h"
#include "proto/compute_rpcs.h"
#include "ringattn/v1/worker.grpc.pb.h"
#include "worker/coordinator_store.h"
#include "base/shared_memory.h"
#include "proto/cluster_auth.h"
#include "worker/ring_engine.h"
#include "worker/worker_metrics.h"

namespace ringattn {

// This rank's part of a compute call, from its shard header: the whole problem, the plan, and
// the shard's own shape (this rank's rows of the sequence).
struct ShardSpec {
  AttentionShape shape;  // of the whole problem
  ShardPlan plan;
  int rank = 0;
  AttentionShape shard;  // shape.WithRows(rows, rows)
  RingAttentionOptions options;
};

class WorkerServiceImpl final : public v1::WorkerService::Service {
 public:
  // `coordinator` serves the rendezvous store; `engine` (kernel backend and transport) connects
  // the rings and computes every ring step. Every call must carry `secret` (UNAUTHENTICATED
  // otherwise, before anything else is looked at). Compute calls are recorded in `metrics`
  // when given (it must outlive the service). `staging_sets` (>= 1) calls of consecutive turns
  // may hold staging at once (the coordinator's pipeline depth: more wait for their set).
  WorkerServiceImpl(std::shared_ptr<v1::CoordinatorService::StubInterface> coordinator,
                    std::unique_ptr<RingEngine> engine, ClusterSecret secret,
                    WorkerMetrics* metrics = nullptr, int staging_sets = 3);
  ~WorkerServiceImpl() override;

  grpc::Status JoinRing(grpc::ServerContext* context, const v1::JoinRingRequest* request,
                        v1::JoinRingResponse* response) override;
  grpc::Status RunShard(grpc::ServerContext* context, const v1::RunShardRequest* request,
                        v1::RunShardResponse* response) override;
  // The backward of one request, with RunShard's generation, cancellation and abort handling.
  // UNIMPLEMENTED on an engine without a backward (the cuda_reference kernel).
  grpc::Status RunShardBackward(grpc::ServerContext* context,
                                const v1::RunShardBackwardRequest* request,
                                v1::RunShardBackwardResponse* response) override;
  grpc::Status Ping(grpc::ServerContext* context, const v1::PingRequest* request,
                    v1::PingResponse* response) override;

  // Aborts the ring and any rendezvous in progress, and refuses later calls with UNAVAILABLE.
  // Calls in flight return promptly. Idempotent.
  void Shutdown();

  // The generation of the ring this worker is in, 0 when none.
  int64_t generation() const;
  // When the coordinator last pinged (an authenticated Ping); InfinitePast before the first.
  absl::Time last_ping() const;

 private:
  struct Ring {
    int64_t generation = 0;
    std::unique_ptr<RingConnection> conn;
    int64_t next_sequence = 1;  // the call turn due next (ShardHeader.sequence); guarded by mu_
    std::set<int64_t> skipped;  // later turns given up before they came; guarded by mu_
  };
  // Staging kept between calls. Two sets: a call stages into its turn's set while the call
  // before it, in the other set, computes; a set is held from staging to the last output copy.
  struct StagingSlot {
    std::shared_ptr<char> data;
    size_t bytes = 0;
    bool engine_memory = false;
  };
  struct SlotSet {
    bool in_use = false;  // guarded by the service's mu_
    std::vector<StagingSlot> slots;  // used by the call that set in_use
  };
  // A call's turn on the ring: Begin waits for the call's staging set, Take until every call
  // of an earlier turn (sequence) has had its own, then holds run_mu_ for the ring pass;
  // Release (or the destructor) passes the turn on and frees the set. A call cancelled or past
  // its deadline before its ring pass skips its turn (the ring stays). Sequence 0 takes run_mu_
  // in no particular order.
  class Turn;

  // Shared by the handlers: the ring, if `generation` is the current one (`rpc` names the call).
  absl::Status CheckGeneration(const char* rpc, int64_t generation) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The frame of every compute call: refuses a stale generation without waiting, then runs
  // `run` on the current ring with the staging set of its turn held; `run` takes the turn for
  // its ring pass. After a failure the ring is aborted and dropped, and `response` cleared.
  grpc::Status RunOnCurrentRing(
      const char* rpc, int64_t generation, int64_t sequence, grpc::ServerContext* context,
      const std::function<absl::Status(const std::shared_ptr<Ring>&, Turn&, SlotSet&)>& run,
      google::protobuf::Message* response) ABSL_LOCKS_EXCLUDED(run_mu_);
  absl::Status Join(grpc::ServerContext* context, const v1::JoinRingRequest& request);
  // A rank's shard tensors in host memory, in the table's order: inputs from the request's
  // bytes or read from shared memory into staging; outputs into the response's bytes or into
  // staging that is written to shared memory after the ring. Outputs not wanted are null.
  struct ShardBuffers {
    std::vector<const char*> inputs;  // [rpc.inputs.size()]
    std::vector<char*> outputs;       // [rpc.outputs.size()]
  };
  // One ring pass of a compute call on this rank's shard.
  template <typename Request>
  using ShardOp = std::function<absl::StatusOr<RingTimings>(
      RingConnection& comm, const ShardSpec& spec, const Request& request,
      const ShardBuffers& buffers)>;
  // A compute call (`method`, of table `rpc`) in the frame of RunOnCurrentRing: its shard
  // header parsed, its inputs checked and outputs sized by the table, then `op` run, aborting
  // the ring when the call is cancelled or past its deadline. `what_kind` goes into the
  // messages ("backward of ").
  template <typename Request, typename Response>
  grpc::Status RunCompute(const ComputeRpc& rpc, const char* method, const char* what_kind,
                          grpc::ServerContext* context, const Request& request, Response* response,
                          const ShardOp<Request>& op) ABSL_LOCKS_EXCLUDED(run_mu_);
  // Where a tensor in a client's shared memory (`mapping`; null for CUDA memory) has its shard
  // during a call: the engine's shard memory (device memory on GPU workers, filled straight
  // from the client's pages, which the engine pins, or from its GPU allocation) or, where the
  // engine cannot pin them, page-locked host staging. Slot `slot`, at least `bytes`, kept
  // between calls.
  struct SharedShard {
    char* data = nullptr;
    bool engine_memory = false;  // AllocateShard's (copies by CopyShard), else AllocateHost's
  };
  absl::StatusOr<SharedShard> StageShared(SlotSet& set, size_t slot, size_t bytes,
                                          SharedMemoryMapping* mapping);
  // The copies of a shared shard's rows (SharedShard's kind says how).
  absl::Status CopyRows(const SharedShard& shard, const std::vector<CopySpan>& copies,
                        absl::string_view what);
  // Aborts `ring` with `reason` and forgets it if it is still the current one.
  void DropRing(const std::shared_ptr<Ring>& ring, const absl::Status& reason)
      ABSL_LOCKS_EXCLUDED(mu_);

  const std::shared_ptr<v1::CoordinatorService::StubInterface> coordinator_;
  const ClusterSecret secret_;
  WorkerMetrics* const metrics_;  // may be null

  // Held for the whole of a rendezvous or a ring pass: the ring (and the backend) run one thing
  // at a time. Acquired before mu_.
  absl::Mutex run_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  // Connect and the connections' passes under run_mu_; its staging methods (AllocateShard,
  // PinHost, CopyShard, OpenCudaShared) are thread-safe and run outside it.
  const std::unique_ptr<RingEngine> engine_;
  // Same-host clients' shared memory (ShardHeader.shm), mapped once per tensor range.
  SharedMemoryCache shared_memory_;
  std::vector<SlotSet> slot_sets_;  // a call of turn `sequence` stages in [sequence % size]

  // Guards the state that Ping and the aborting paths read without waiting for a run.
  mutable absl::Mutex mu_;
  std::shared_ptr<Ring> ring_ ABSL_GUARDED_BY(mu_);
  // The newest generation JoinRing was called with; older ones are stale.
  int64_t newest_generation_ ABSL_GUARDED_BY(mu_) = 0;
  // The rendezvous in progress, so that a newer JoinRing or Shutdown can cancel it.
  std::shared_ptr<CoordinatorStore> joining_store_ ABSL_GUARDED_BY(mu_);
  bool busy_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time last_ping_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace ringattn
