// A POSIX shared-memory object that this process creates and owns, for the same-host data path
// (system shared memory: the client registers it with the service and refers to its bytes in
// requests instead of sending them).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "base/shared_memory.h"

namespace ringattn {

class SharedMemoryRegion {
 public:
  // Creates the object `key` (shm_open's name, "/name") exclusively, mode 0600, of `byte_size`
  // (> 0) bytes, zero-filled, and maps it whole, read-write. INVALID_ARGUMENT for a bad key or
  // size; ALREADY_EXISTS when an object of that name exists; other failures of the system calls
  // as FAILED_PRECONDITION or PERMISSION_DENIED, naming the key.
  static absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> Create(const std::string& key,
                                                                    int64_t byte_size);
  // Unmaps the object and unlinks its name (a mapping elsewhere, e.g. the service's, stays
  // valid until it unmaps).
  ~SharedMemoryRegion();
  SharedMemoryRegion(const SharedMemoryRegion&) = delete;
  SharedMemoryRegion& operator=(const SharedMemoryRegion&) = delete;

  const std::string& key() const { return mapping_->key(); }
  int64_t size() const { return mapping_->size(); }
  // The first of size() bytes.
  char* data() const { return mapping_->data(); }

 private:
  explicit SharedMemoryRegion(std::shared_ptr<SharedMemoryMapping> mapping)
      : mapping_(std::move(mapping)) {}
  std::shared_ptr<SharedMemoryMapping> mapping_;
};

// A key no other call in this process returns: "/ringattn_<pid>_<n>".
std::string MakeSharedMemoryKey();

}  // namespace ringattn
