// The coordinator's key-value store through which a ring's ranks rendezvous (Gloo's store;
// later the NCCL unique id). Get blocks until every key exists or the deadline passes.
#pragma once

#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace ringattn {

class RendezvousStore {
 public:
  void Set(const std::string& key, std::string value);
  // Values of `keys` in order once all exist; DeadlineExceeded naming the first missing key.
  absl::StatusOr<std::vector<std::string>> Get(const std::vector<std::string>& keys,
                                               absl::Time deadline);
  // Drops every key that starts with `prefix` (a finished ring's rendezvous).
  void ErasePrefix(const std::string& prefix);
  size_t size() const;

 private:
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ringattn
