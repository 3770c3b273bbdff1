// The coordinator's own shared memory for requests that arrive as bytes: when the ring's workers
// share this host, the coordinator copies a request's tensors into the arena once and the workers
// read their rows from it (and write their output rows into it) through the same ShardHeader.shm
// references a client's region uses, instead of each shard crossing gRPC twice. One arena serves
// one request at a time; it grows (a new object) and is otherwise reused, so the workers' cached
// mappings stay valid across requests.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "base/shared_memory.h"

namespace ringattn {

class SharedMemoryArena {
 public:
  // Objects are named "<prefix>_<pid>_<n>".
  explicit SharedMemoryArena(std::string prefix = "/ringattn_arena") : prefix_(std::move(prefix)) {}
  ~SharedMemoryArena();
  SharedMemoryArena(const SharedMemoryArena&) = delete;
  SharedMemoryArena& operator=(const SharedMemoryArena&) = delete;

  // A mapping of at least `bytes` (owner read-write only), the previous one when it is large
  // enough. The caller uses it for one request; the next Reserve may replace it. The object's
  // pages are allocated at once (RESOURCE_EXHAUSTED when /dev/shm cannot hold them, rather than
  // a SIGBUS on a later write).
  absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> Reserve(int64_t bytes);

 private:
  void Release() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  const std::string prefix_;
  absl::Mutex mu_;
  std::shared_ptr<SharedMemoryMapping> mapping_ ABSL_GUARDED_BY(mu_);
  std::string key_ ABSL_GUARDED_BY(mu_);
  int serial_ ABSL_GUARDED_BY(mu_) = 0;
};

// `count` arenas lent one at a time: a streamed request lands its chunks in one (the coordinator
// lends it from the stream's header to its last response chunk).
class ArenaPool {
 public:
  ArenaPool(int count, const std::string& prefix);

  // Returns the arena to the pool when destroyed.
  class Lease {
   public:
    Lease(ArenaPool* pool, SharedMemoryArena* arena) : pool_(pool), arena_(arena) {}
    ~Lease();
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    SharedMemoryArena& arena() { return *arena_; }

   private:
    ArenaPool* const pool_;
    SharedMemoryArena* const arena_;
  };

  // A free arena, or null when all are lent.
  std::unique_ptr<Lease> TryAcquire();

 private:
  std::vector<std::unique_ptr<SharedMemoryArena>> arenas_;
  absl::Mutex mu_;
  std::vector<SharedMemoryArena*> free_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ringattn
