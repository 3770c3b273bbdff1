// A gloo::rendezvous::Store over the coordinator's key-value store (CoordinatorService.StoreSet
// and StoreGet), through which the ranks of one ring find each other.
//
// Gloo's Store interface reports failure by throwing, so set/get/wait throw gloo::IoException
// with a message naming the call, the key and the gRPC status; GlooCommunicator::Create catches
// it. Everything else in ringattn uses the status-returning Set and Get.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "gloo/rendezvous/store.h"
#include "ringattn/v1/worker.grpc.pb.h"

namespace grpc {
class ClientContext;
}  // namespace grpc

namespace ringattn {

class CoordinatorStore final : public gloo::rendezvous::Store {
 public:
  // Keys travel as `prefix + key`, so that each ring (generation) has its own namespace in the
  // coordinator's store. `timeout` bounds every RPC whose caller gives no timeout of its own
  // (set, get, and the wait overload without one).
  CoordinatorStore(std::shared_ptr<v1::CoordinatorService::StubInterface> stub, std::string prefix,
                   std::chrono::milliseconds timeout);
  ~CoordinatorStore() override = default;

  CoordinatorStore(const CoordinatorStore&) = delete;
  CoordinatorStore& operator=(const CoordinatorStore&) = delete;

  // gloo::rendezvous::Store. Each throws gloo::IoException on failure.
  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;

  // The same calls without exceptions: the gRPC status of the RPC (DEADLINE_EXCEEDED when a
  // key did not appear in time), or the Cancel reason.
  absl::Status Set(const std::string& key, const std::vector<char>& data);
  // Waits until every key exists, up to `timeout`, and returns their values in order.
  absl::StatusOr<std::vector<std::string>> Get(const std::vector<std::string>& keys,
                                               std::chrono::milliseconds timeout);

  // Fails the RPCs in flight and every later call with `reason` (which must not be OK), so
  // that a rendezvous blocked on ranks that never come can be given up at once. Thread-safe
  // and idempotent; the first reason sticks.
  void Cancel(const absl::Status& reason);

  // The Cancel reason, or OK while not cancelled.
  absl::Status cancel_status() const;

  const std::string& prefix() const { return prefix_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

 private:
  // Registers `ctx` for Cancel; false (and nothing registered) when already cancelled.
  bool Track(grpc::ClientContext* ctx);
  void Untrack(grpc::ClientContext* ctx);

  const std::shared_ptr<v1::CoordinatorService::StubInterface> stub_;
  const std::string prefix_;
  const std::chrono::milliseconds timeout_;

  mutable absl::Mutex mu_;
  absl::Status cancel_status_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<grpc::ClientContext*> in_flight_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ringattn
