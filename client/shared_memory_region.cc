#include "client/shared_memory_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ringattn {
namespace {

absl::Status ErrnoStatus(int err, const std::string& what) {
  const std::string message = absl::StrCat(what, ": ", std::strerror(err));
  if (err == EEXIST) return absl::AlreadyExistsError(message);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(message);
  return absl::FailedPreconditionError(message);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> SharedMemoryRegion::Create(
    const std::string& key, int64_t byte_size) {
  if (absl::Status s = CheckSharedMemoryKey(key, "shared-memory key"); !s.ok()) return s;
  if (byte_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared-memory region size must be > 0 bytes, got ", byte_size));
  }
  const int fd = shm_open(key.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("shm_open('", key, "')"));
  const int truncated = ftruncate(fd, byte_size);
  const int err = errno;
  close(fd);
  if (truncated != 0) {
    shm_unlink(key.c_str());
    return ErrnoStatus(err, absl::StrCat("ftruncate('", key, "', ", byte_size, ")"));
  }
  absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> mapping =
      SharedMemoryMapping::Open(key, 0, byte_size, "shared-memory region");
  if (!mapping.ok()) {
    shm_unlink(key.c_str());
    return mapping.status();
  }
  return std::unique_ptr<SharedMemoryRegion>(new SharedMemoryRegion(*std::move(mapping)));
}

SharedMemoryRegion::~SharedMemoryRegion() {
  const std::string key = mapping_->key();
  mapping_.reset();
  shm_unlink(key.c_str());
}

std::string MakeSharedMemoryKey() {
  static std::atomic<uint64_t> counter{0};
  return absl::StrCat("/ringattn_", getpid(), "_", counter.fetch_add(1));
}

}  // namespace ringattn
