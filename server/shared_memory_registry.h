// The system shared-memory regions clients registered with the coordinator, by owner (the
// caller's identity) and name, each kept mapped until it is unregistered. A request refers to a
// region by name; resolving a reference checks it against the region and returns the tensor's
// bytes there, keeping the mapping alive for the request even if the region is unregistered
// meanwhile.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "base/shared_memory.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

// A tensor's bytes in a registered region: [at, at + bytes) of `mapping`.
struct SharedTensor {
  std::shared_ptr<SharedMemoryMapping> mapping;
  int64_t at = 0;
  int64_t bytes = 0;

  char* data() const { return mapping->data() + at; }
  // Where the tensor lies in the shm object itself (for a worker that maps it).
  int64_t object_offset() const { return mapping->offset() + at; }
  // Whether the two share a byte of the same shm object.
  bool Overlaps(const SharedTensor& other) const;
};

class SharedMemoryRegistry {
 public:
  struct Limits {
    int max_regions_per_owner = 64;
    int max_name_bytes = 128;
  };
  SharedMemoryRegistry() : SharedMemoryRegistry(Limits()) {}
  explicit SharedMemoryRegistry(Limits limits) : limits_(limits) {}

  // Maps the range and keeps it under (owner, name). INVALID_ARGUMENT naming the field for a
  // bad name, key, offset or size; ALREADY_EXISTS when the owner has that name;
  // RESOURCE_EXHAUSTED past max_regions_per_owner; NOT_FOUND when no such object.
  absl::Status Register(const std::string& owner,
                        const v1::RegisterSystemSharedMemoryRequest& request);
  // Forgets the owner's region `name`, or all of its regions when `name` is empty. NOT_FOUND
  // for a name the owner has not registered.
  absl::Status Unregister(const std::string& owner, const std::string& name);
  // The owner's region `name`, or all of them (by name) when `name` is empty.
  absl::StatusOr<std::vector<v1::SystemSharedMemoryRegion>> List(const std::string& owner,
                                                                 const std::string& name) const;

  // The bytes `ref` names, which must be exactly `want_bytes` (the tensor's size): errors are
  // INVALID_ARGUMENT naming `field` ("q.shm": "q.shm.region 'x' is not registered by this
  // caller", "q.shm.byte_size ...", "q.shm.offset ...").
  absl::StatusOr<SharedTensor> Resolve(const std::string& owner, const v1::SharedMemoryRef& ref,
                                       int64_t want_bytes, absl::string_view field) const;

  size_t size() const;

 private:
  struct Region {
    std::string key;
    std::shared_ptr<SharedMemoryMapping> mapping;
  };
  const Limits limits_;
  mutable absl::Mutex mu_;
  // owner -> name -> region
  std::map<std::string, std::map<std::string, Region>> regions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ringattn
