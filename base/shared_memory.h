// POSIX shared memory for the same-host data path: a mapped byte range of an shm_open object,
// and memory access that turns the object shrinking underneath (SIGBUS) into an error.
//
// A client owns its objects: it may truncate or unlink one while a request reads it. Unlinking
// is harmless (the mapping stays valid); truncation makes the vanished pages fault with SIGBUS,
// which GuardedAccess turns into FAILED_PRECONDITION for that request only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ringattn {

class SharedMemoryMapping {
 public:
  // Maps [offset, offset + byte_size) of the object `key` (shm_open's name: "/" and at most 255
  // bytes without another "/"), read-write. INVALID_ARGUMENT naming the field for a bad key,
  // offset or size ("<field>.offset"; plain "offset" when `field` is empty), or when the range
  // does not lie within the object; NOT_FOUND when no such object.
  static absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> Open(const std::string& key,
                                                                   int64_t offset,
                                                                   int64_t byte_size,
                                                                   absl::string_view field);
  ~SharedMemoryMapping();
  SharedMemoryMapping(const SharedMemoryMapping&) = delete;
  SharedMemoryMapping& operator=(const SharedMemoryMapping&) = delete;

  const std::string& key() const { return key_; }
  int64_t offset() const { return offset_; }
  int64_t size() const { return size_; }
  // The range's first byte. Access it through GuardedAccess.
  char* data() const { return data_; }
  // Whether the object named `key` is still the one mapped here (same inode) and still covers
  // the range: a cached mapping is reused only when it is.
  bool StillCurrent() const;
  // Whether the object named `key` is the one mapped here and no longer covers the range (it
  // was truncated); false when the name is gone or names another object (the pages mapped
  // here are still the ones the client wrote).
  bool Shrunk() const;

  // The page-aligned mmap that holds the range (what a device registers).
  void* map_base() const { return map_base_; }
  size_t map_bytes() const { return map_bytes_; }
  // Something that lives as long as the mapping and is released before the range is unmapped
  // (a registration of its pages with a device). Thread-safe; null until set.
  std::shared_ptr<void> attachment() const;
  void set_attachment(std::shared_ptr<void> attachment);

 private:
  SharedMemoryMapping() = default;
  std::string key_;
  int64_t offset_ = 0;
  int64_t size_ = 0;
  char* data_ = nullptr;
  void* map_base_ = nullptr;  // page-aligned start of the mmap
  size_t map_bytes_ = 0;
  uint64_t device_ = 0;
  uint64_t inode_ = 0;
  mutable std::mutex attachment_mu_;
  std::shared_ptr<void> attachment_;  // guarded by attachment_mu_
};

// Mappings kept between requests (mapping and first-touch page faults cost milliseconds per
// hundred megabytes): Open returns the cached mapping of (key, offset, byte_size) while the
// object is still the one mapped, else maps afresh. Holds at most `capacity` mappings, dropping
// the least recently used. Thread-safe.
class SharedMemoryCache {
 public:
  explicit SharedMemoryCache(size_t capacity = 64) : capacity_(capacity) {}
  absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> Open(const std::string& key,
                                                            int64_t offset, int64_t byte_size,
                                                            absl::string_view field);
  size_t size() const;

 private:
  struct Entry {
    std::shared_ptr<SharedMemoryMapping> mapping;
    uint64_t last_use = 0;
  };
  const size_t capacity_;
  mutable std::mutex mu_;
  std::map<std::tuple<std::string, int64_t, int64_t>, Entry> entries_;  // guarded by mu_
  uint64_t clock_ = 0;                                                  // guarded by mu_
};

// Runs `fn`, which reads or writes shared memory, on this thread with a SIGBUS inside it turned
// into FAILED_PRECONDITION ("<what>: the shared-memory region shrank or vanished ..."). `fn` is
// abandoned at the fault: it must hold nothing that needs a destructor (plain copies only).
absl::Status GuardedAccess(absl::string_view what, const std::function<void()>& fn);

// This host's identity for deciding who can map whose shared memory: the kernel's boot id and
// the hostname (a container with its own /dev/shm should not advertise it; see the worker's
// --shared_memory flag).
std::string HostId();

// One memcpy of a ParallelCopy.
struct CopySpan {
  char* dst = nullptr;
  const char* src = nullptr;
  size_t bytes = 0;
};

// The copies, their bytes split evenly over up to `threads` threads (0: the machine's cores, at
// most 8; spans cut where needed; one thread below a few megabytes), each thread under
// GuardedAccess: FAILED_PRECONDITION naming `what` when shared memory shrank underneath.
absl::Status ParallelCopy(const std::vector<CopySpan>& spans, absl::string_view what,
                          int threads = 0);
absl::Status ParallelCopy(char* dst, const char* src, size_t bytes, absl::string_view what,
                          int threads = 0);

// Validates an shm_open name: INVALID_ARGUMENT naming `field` when it is not "/name".
absl::Status CheckSharedMemoryKey(const std::string& key, absl::string_view field);

}  // namespace ringattn
