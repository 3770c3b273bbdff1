#include "server/shared_memory_arena.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace ringattn {

SharedMemoryArena::~SharedMemoryArena() {
  absl::MutexLock lock(&mu_);
  Release();
}

void SharedMemoryArena::Release() {
  mapping_.reset();
  if (!key_.empty()) shm_unlink(key_.c_str());
  key_.clear();
}

absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> SharedMemoryArena::Reserve(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  if (mapping_ != nullptr && mapping_->size() >= bytes) return mapping_;
  Release();
  // Rounded up so that a slowly growing shape does not make a new object every time.
  const int64_t size = std::max<int64_t>(int64_t{1} << 20, bytes + bytes / 4);
  const std::string key = absl::StrCat(prefix_, "_", getpid(), "_", serial_++);
  const int fd = shm_open(key.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("shm_open('", key, "') for the coordinator's arena: ", std::strerror(errno)));
  }
  // posix_fallocate returns the error (errno untouched).
  int err = ftruncate(fd, size) == 0 ? posix_fallocate(fd, 0, size) : errno;
  close(fd);
  if (err != 0) {
    shm_unlink(key.c_str());
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot size the coordinator's arena to ", size, " bytes: ", std::strerror(err)));
  }
  absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> m =
      SharedMemoryMapping::Open(key, 0, size, "arena");
  if (!m.ok()) {
    shm_unlink(key.c_str());
    return m.status();
  }
  key_ = key;
  mapping_ = *std::move(m);
  return mapping_;
}

ArenaPool::ArenaPool(int count, const std::string& prefix) {
  for (int i = 0; i < count; ++i) {
    arenas_.push_back(std::make_unique<SharedMemoryArena>(absl::StrCat(prefix, i)));
    free_.push_back(arenas_.back().get());
  }
}

std::unique_ptr<ArenaPool::Lease> ArenaPool::TryAcquire() {
  absl::MutexLock lock(&mu_);
  if (free_.empty()) return nullptr;
  SharedMemoryArena* a = free_.back();
  free_.pop_back();
  return std::make_unique<Lease>(this, a);
}

ArenaPool::Lease::~Lease() {
  absl::MutexLock lock(&pool_->mu_);
  pool_->free_.push_back(arena_);
}

}  // namespace ringattn
