#include "server/rendezvous_store.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace ringattn {

void RendezvousStore::DropExpired() {
  const absl::Time oldest = absl::Now() - limits_.lifetime;
  absl::erase_if(values_, [&](const auto& kv) { return kv.second.set < oldest; });
}

absl::Status RendezvousStore::Set(const std::string& key, std::string value) {
  if (value.size() > limits_.max_value_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("rendezvous value of ", value.size(),
                                                     " bytes; the limit is ",
                                                     limits_.max_value_bytes));
  }
  absl::MutexLock lock(&mu_);
  DropExpired();
  if (!values_.contains(key) && values_.size() >= limits_.max_keys) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the rendezvous store holds its limit of ", limits_.max_keys, " keys"));
  }
  values_[key] = Entry{std::move(value), absl::Now()};
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> RendezvousStore::Get(
    const std::vector<std::string>& keys, absl::Time deadline,
    const std::function<bool()>& cancelled) {
  absl::MutexLock lock(&mu_);
  auto all_present = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    for (const std::string& k : keys) {
      if (!values_.contains(k)) return false;
    }
    return true;
  };
  // Waits in slices so that a caller that went away frees its thread within one.
  constexpr absl::Duration kSlice = absl::Milliseconds(100);
  while (!all_present()) {
    if (cancelled && cancelled()) return absl::CancelledError("the caller went away");
    if (absl::Now() >= deadline) {
      for (const std::string& k : keys) {
        if (!values_.contains(k)) {
          return absl::DeadlineExceededError(absl::StrCat("rendezvous key '", k, "' never set"));
        }
      }
    }
    mu_.AwaitWithDeadline(absl::Condition(&all_present), std::min(deadline, absl::Now() + kSlice));
  }
  std::vector<std::string> out;
  out.reserve(keys.size());
  for (const std::string& k : keys) out.push_back(values_.at(k).value);
  return out;
}

void RendezvousStore::ErasePrefix(const std::string& prefix) {
  absl::MutexLock lock(&mu_);
  absl::erase_if(values_, [&](const auto& kv) { return absl::StartsWith(kv.first, prefix); });
}

size_t RendezvousStore::size() const {
  absl::MutexLock lock(&mu_);
  return values_.size();
}

}  // namespace ringattn
