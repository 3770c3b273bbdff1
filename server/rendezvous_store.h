// The coordinator's key-value store through which a ring's ranks rendezvous (Gloo's store;
// later the NCCL unique id). Get blocks until every key exists, the deadline passes or the
// caller gives up. Bounded: values, keys and their lifetime are limited, so that the store holds
// ring formations and nothing else (only authenticated workers reach it at all).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace ringattn {

class RendezvousStore {
 public:
  struct Limits {
    size_t max_value_bytes = size_t{1} << 20;  // a rank's address or an NCCL id: bytes
    size_t max_keys = 4096;                    // of all rings forming at once
    absl::Duration lifetime = absl::Minutes(10);  // a key older than this is gone
  };
  RendezvousStore() : RendezvousStore(Limits()) {}
  explicit RendezvousStore(Limits limits) : limits_(limits) {}

  // RESOURCE_EXHAUSTED for a value past max_value_bytes or a new key past max_keys.
  absl::Status Set(const std::string& key, std::string value);
  // Values of `keys` in order once all exist; DEADLINE_EXCEEDED naming the first missing key;
  // CANCELLED as soon as `cancelled` (polled, may be empty) says so.
  absl::StatusOr<std::vector<std::string>> Get(const std::vector<std::string>& keys,
                                               absl::Time deadline,
                                               const std::function<bool()>& cancelled = nullptr);
  // Drops every key that starts with `prefix` (a finished ring's rendezvous).
  void ErasePrefix(const std::string& prefix);
  size_t size() const;

 private:
  struct Entry {
    std::string value;
    absl::Time set;
  };
  void DropExpired() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Limits limits_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Entry> values_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ringattn
