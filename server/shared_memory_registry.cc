#include "server/shared_memory_registry.h"

#include "absl/strings/str_cat.h"

namespace ringattn {

bool SharedTensor::Overlaps(const SharedTensor& other) const {
  if (mapping->key() != other.mapping->key()) return false;
  const int64_t a0 = object_offset();
  const int64_t b0 = other.object_offset();
  return a0 < b0 + other.bytes && b0 < a0 + bytes;
}

absl::Status SharedMemoryRegistry::Register(const std::string& owner,
                                            const v1::RegisterSystemSharedMemoryRequest& r) {
  const std::string& name = r.name();
  if (name.empty() || static_cast<int>(name.size()) > limits_.max_name_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("name must have 1 to ", limits_.max_name_bytes,
                                                   " bytes, got ", name.size()));
  }
  for (unsigned char c : name) {
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError("name must be printable ASCII");
    }
  }
  {
    absl::MutexLock lock(&mu_);
    auto it = regions_.find(owner);
    if (it != regions_.end()) {
      if (it->second.count(name) > 0) {
        return absl::AlreadyExistsError(absl::StrCat(
            "region '", name, "' is already registered; unregister it first"));
      }
      if (static_cast<int>(it->second.size()) >= limits_.max_regions_per_owner) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "at most ", limits_.max_regions_per_owner, " regions per client are registered"));
      }
    }
  }
  // Mapped outside the lock (a slow filesystem must not stall other callers).
  absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> mapping =
      SharedMemoryMapping::Open(r.key(), r.offset(), r.byte_size(), "");
  if (!mapping.ok()) return mapping.status();
  absl::MutexLock lock(&mu_);
  auto& mine = regions_[owner];
  if (mine.count(name) > 0) {
    return absl::AlreadyExistsError(
        absl::StrCat("region '", name, "' is already registered; unregister it first"));
  }
  if (static_cast<int>(mine.size()) >= limits_.max_regions_per_owner) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "at most ", limits_.max_regions_per_owner, " regions per client are registered"));
  }
  mine.emplace(name, Region{r.key(), *std::move(mapping)});
  return absl::OkStatus();
}

absl::Status SharedMemoryRegistry::Unregister(const std::string& owner, const std::string& name) {
  absl::MutexLock lock(&mu_);
  auto it = regions_.find(owner);
  if (name.empty()) {
    if (it != regions_.end()) regions_.erase(it);
    return absl::OkStatus();
  }
  if (it == regions_.end() || it->second.erase(name) == 0) {
    return absl::NotFoundError(absl::StrCat("region '", name, "' is not registered"));
  }
  if (it->second.empty()) regions_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::SystemSharedMemoryRegion>> SharedMemoryRegistry::List(
    const std::string& owner, const std::string& name) const {
  std::vector<v1::SystemSharedMemoryRegion> out;
  absl::MutexLock lock(&mu_);
  auto it = regions_.find(owner);
  if (it != regions_.end()) {
    for (const auto& [n, region] : it->second) {
      if (!name.empty() && n != name) continue;
      v1::SystemSharedMemoryRegion& r = out.emplace_back();
      r.set_name(n);
      r.set_key(region.key);
      r.set_offset(region.mapping->offset());
      r.set_byte_size(region.mapping->size());
    }
  }
  if (!name.empty() && out.empty()) {
    return absl::NotFoundError(absl::StrCat("region '", name, "' is not registered"));
  }
  return out;
}

absl::StatusOr<SharedTensor> SharedMemoryRegistry::Resolve(const std::string& owner,
                                                           const v1::SharedMemoryRef& ref,
                                                           int64_t want_bytes,
                                                           absl::string_view field) const {
  std::shared_ptr<SharedMemoryMapping> mapping;
  {
    absl::MutexLock lock(&mu_);
    auto it = regions_.find(owner);
    if (it != regions_.end()) {
      auto r = it->second.find(ref.region());
      if (r != it->second.end()) mapping = r->second.mapping;
    }
  }
  if (mapping == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".region '", ref.region().substr(0, 128),
        "' is not registered by this caller (RegisterSystemSharedMemory)"));
  }
  if (ref.byte_size() != want_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".byte_size is ", ref.byte_size(),
                                                   "; the tensor's shape and dtype need ",
                                                   want_bytes));
  }
  if (ref.offset() < 0 || ref.offset() > mapping->size() ||
      want_bytes > mapping->size() - ref.offset()) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".offset ", ref.offset(), " + byte_size ", want_bytes, " exceeds region '",
        ref.region(), "' (", mapping->size(), " bytes)"));
  }
  return SharedTensor{std::move(mapping), ref.offset(), want_bytes};
}

size_t SharedMemoryRegistry::size() const {
  absl::MutexLock lock(&mu_);
  size_t n = 0;
  for (const auto& [owner, mine] : regions_) n += mine.size();
  return n;
}

}  // namespace ringattn
