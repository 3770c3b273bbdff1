#include "server/shared_memory_registry.h"

#include <iterator>
#include <optional>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace ringattn {

bool SharedTensor::Overlaps(const SharedTensor& other) const {
  if ((mapping == nullptr) != (other.mapping == nullptr)) return false;
  if (mapping != nullptr ? mapping->key() != other.mapping->key()
                         : cuda->handle != other.cuda->handle) {
    return false;
  }
  const int64_t a0 = object_offset();
  const int64_t b0 = other.object_offset();
  return a0 < b0 + other.bytes && b0 < a0 + bytes;
}

absl::Status SharedMemoryRegistry::CheckName(const std::string& name) const {
  if (name.empty() || static_cast<int>(name.size()) > limits_.max_name_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("name must have 1 to ", limits_.max_name_bytes,
                                                   " bytes, got ", name.size()));
  }
  for (unsigned char c : name) {
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError("name must be printable ASCII");
    }
  }
  return absl::OkStatus();
}

absl::Status SharedMemoryRegistry::CheckRoom(const std::map<std::string, Region>& mine,
                                             const std::string& name) const {
  if (mine.count(name) > 0) {
    return absl::AlreadyExistsError(
        absl::StrCat("region '", name, "' is already registered; unregister it first"));
  }
  if (static_cast<int>(mine.size()) >= limits_.max_regions_per_owner) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "at most ", limits_.max_regions_per_owner, " regions per client are registered"));
  }
  return absl::OkStatus();
}

absl::Status SharedMemoryRegistry::Add(const std::string& owner, const std::string& name,
                                       Region region) {
  absl::MutexLock lock(&mu_);
  auto& mine = regions_[owner];
  if (absl::Status s = CheckRoom(mine, name); !s.ok()) {
    if (mine.empty()) regions_.erase(owner);
    return s;
  }
  mine.emplace(name, std::move(region));
  return absl::OkStatus();
}

absl::Status SharedMemoryRegistry::Register(const std::string& owner,
                                            const v1::RegisterSystemSharedMemoryRequest& r) {
  RA_RETURN_IF_ERROR(CheckName(r.name()));
  {
    absl::MutexLock lock(&mu_);
    auto it = regions_.find(owner);
    if (it != regions_.end()) RA_RETURN_IF_ERROR(CheckRoom(it->second, r.name()));
  }
  // Mapped outside the lock (a slow filesystem must not stall other callers).
  absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> mapping =
      SharedMemoryMapping::Open(r.key(), r.offset(), r.byte_size(), "");
  if (!mapping.ok()) return mapping.status();
  return Add(owner, r.name(), Region{r.key(), *std::move(mapping), nullptr});
}

absl::Status SharedMemoryRegistry::Register(const std::string& owner,
                                            const v1::RegisterCudaSharedMemoryRequest& r) {
  RA_RETURN_IF_ERROR(CheckName(r.name()));
  constexpr size_t kIpcHandleBytes = 64;  // sizeof(cudaIpcMemHandle_t)
  if (r.raw_handle().size() != kIpcHandleBytes) {
    return absl::InvalidArgumentError(absl::StrCat("raw_handle must be a cudaIpcMemHandle_t (",
                                                   kIpcHandleBytes, " bytes), got ",
                                                   r.raw_handle().size(), " bytes"));
  }
  if (r.device_id() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("device_id must be >= 0, got ", r.device_id()));
  }
  if (r.byte_size() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("byte_size must be > 0, got ", r.byte_size()));
  }
  auto cuda = std::make_shared<CudaRegion>();
  cuda->handle = r.raw_handle();
  cuda->device_id = r.device_id();
  cuda->byte_size = r.byte_size();
  return Add(owner, r.name(), Region{"", nullptr, std::move(cuda)});
}

absl::Status SharedMemoryRegistry::Unregister(const std::string& owner, const std::string& name,
                                              Kind kind) {
  absl::MutexLock lock(&mu_);
  auto it = regions_.find(owner);
  if (it == regions_.end()) {
    if (name.empty()) return absl::OkStatus();
    return absl::NotFoundError(absl::StrCat("region '", name, "' is not registered"));
  }
  auto& mine = it->second;
  if (name.empty()) {
    for (auto r = mine.begin(); r != mine.end();) {
      r = r->second.kind() == kind ? mine.erase(r) : std::next(r);
    }
  } else {
    auto r = mine.find(name);
    if (r == mine.end() || r->second.kind() != kind) {
      return absl::NotFoundError(absl::StrCat("region '", name, "' is not registered",
                                              r == mine.end() ? "" : " as this kind of memory"));
    }
    mine.erase(r);
  }
  if (mine.empty()) regions_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::SystemSharedMemoryRegion>> SharedMemoryRegistry::List(
    const std::string& owner, const std::string& name) const {
  std::vector<v1::SystemSharedMemoryRegion> out;
  absl::MutexLock lock(&mu_);
  auto it = regions_.find(owner);
  if (it != regions_.end()) {
    for (const auto& [n, region] : it->second) {
      if ((!name.empty() && n != name) || region.kind() != Kind::kSystem) continue;
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

absl::StatusOr<std::vector<v1::CudaSharedMemoryRegion>> SharedMemoryRegistry::ListCuda(
    const std::string& owner, const std::string& name) const {
  std::vector<v1::CudaSharedMemoryRegion> out;
  absl::MutexLock lock(&mu_);
  auto it = regions_.find(owner);
  if (it != regions_.end()) {
    for (const auto& [n, region] : it->second) {
      if ((!name.empty() && n != name) || region.kind() != Kind::kCuda) continue;
      v1::CudaSharedMemoryRegion& r = out.emplace_back();
      r.set_name(n);
      r.set_device_id(region.cuda->device_id);
      r.set_byte_size(region.cuda->byte_size);
    }
  }
  if (!name.empty() && out.empty()) {
    return absl::NotFoundError(absl::StrCat("CUDA region '", name, "' is not registered"));
  }
  return out;
}

absl::StatusOr<SharedTensor> SharedMemoryRegistry::Resolve(const std::string& owner,
                                                           const v1::SharedMemoryRef& ref,
                                                           int64_t want_bytes,
                                                           absl::string_view field) const {
  std::optional<Region> region;
  {
    absl::MutexLock lock(&mu_);
    auto it = regions_.find(owner);
    if (it != regions_.end()) {
      auto r = it->second.find(ref.region());
      if (r != it->second.end()) region = r->second;
    }
  }
  if (!region.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".region '", ref.region().substr(0, 128),
                     "' is not registered by this caller (RegisterSystemSharedMemory, "
                     "RegisterCudaSharedMemory)"));
  }
  const int64_t size = region->size();
  if (ref.byte_size() != want_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".byte_size is ", ref.byte_size(),
                                                   "; the tensor's shape and dtype need ",
                                                   want_bytes));
  }
  if (ref.offset() < 0 || ref.offset() > size || want_bytes > size - ref.offset()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".offset ", ref.offset(),
                                                   " + byte_size ", want_bytes, " exceeds region '",
                                                   ref.region(), "' (", size, " bytes)"));
  }
  return SharedTensor{std::move(region->mapping), std::move(region->cuda), ref.offset(),
                      want_bytes};
}

size_t SharedMemoryRegistry::size() const {
  absl::MutexLock lock(&mu_);
  size_t n = 0;
  for (const auto& [owner, mine] : regions_) n += mine.size();
  return n;
}

}  // namespace ringattn
