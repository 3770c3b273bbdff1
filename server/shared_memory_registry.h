// The shared-memory regions clients registered with the coordinator, by owner (the caller's
// identity) and name: system regions (kept mapped until unregistered) and CUDA regions (an IPC
// handle the coordinator keeps for the workers; it never opens one). A request refers to a
// region by name; resolving a reference checks it against the region and returns where the
// tensor lies, keeping the region alive for the request even if it is unregistered meanwhile.
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

// A client's GPU allocation exported by CUDA IPC.
struct CudaRegion {
  std::string handle;  // cudaIpcMemHandle_t bytes
  int device_id = 0;   // the client's index of its GPU
  int64_t byte_size = 0;
};

// A tensor's bytes in a registered region: [at, at + bytes) of `mapping` (system shared memory)
// or of `cuda` (exactly one is set).
struct SharedTensor {
  std::shared_ptr<SharedMemoryMapping> mapping;
  std::shared_ptr<const CudaRegion> cuda;
  int64_t at = 0;
  int64_t bytes = 0;

  // System shared memory only.
  char* data() const { return mapping->data() + at; }
  // Where the tensor lies in the shm object or the allocation itself (for a worker).
  int64_t object_offset() const { return mapping != nullptr ? mapping->offset() + at : at; }
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
  // Keeps the handle under (owner, name): INVALID_ARGUMENT naming the field for a bad name,
  // handle (not 64 bytes), device or size; ALREADY_EXISTS, RESOURCE_EXHAUSTED as Register.
  absl::Status Register(const std::string& owner,
                        const v1::RegisterCudaSharedMemoryRequest& request);

  enum class Kind { kSystem, kCuda };
  // Forgets the owner's region `name` of `kind`, or all of its regions of that kind when `name`
  // is empty. NOT_FOUND for a name the owner has not registered as that kind.
  absl::Status Unregister(const std::string& owner, const std::string& name,
                          Kind kind = Kind::kSystem);
  // The owner's system region `name`, or all of them (by name) when `name` is empty.
  absl::StatusOr<std::vector<v1::SystemSharedMemoryRegion>> List(const std::string& owner,
                                                                 const std::string& name) const;
  absl::StatusOr<std::vector<v1::CudaSharedMemoryRegion>> ListCuda(const std::string& owner,
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
    std::shared_ptr<SharedMemoryMapping> mapping;  // system regions
    std::shared_ptr<const CudaRegion> cuda;        // CUDA regions
    Kind kind() const { return cuda != nullptr ? Kind::kCuda : Kind::kSystem; }
    int64_t size() const { return cuda != nullptr ? cuda->byte_size : mapping->size(); }
  };
  // INVALID_ARGUMENT for a name that is empty, too long or not printable ASCII.
  absl::Status CheckName(const std::string& name) const;
  // Whether the owner may add `name`: ALREADY_EXISTS or RESOURCE_EXHAUSTED when not.
  absl::Status CheckRoom(const std::map<std::string, Region>& mine, const std::string& name) const;
  absl::Status Add(const std::string& owner, const std::string& name, Region region);
  const Limits limits_;
  mutable absl::Mutex mu_;
  // owner -> name -> region
  std::map<std::string, std::map<std::string, Region>> regions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ringattn
