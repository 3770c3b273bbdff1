#include "base/shared_memory.h"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>

#include "absl/strings/str_cat.h"

namespace ringattn {
namespace {

// The jump target of the innermost GuardedAccess on this thread; null outside one.
thread_local sigjmp_buf* g_guard = nullptr;
struct sigaction g_previous_bus;

void OnSigbus(int sig, siginfo_t* info, void* context) {
  if (g_guard != nullptr) siglongjmp(*g_guard, 1);
  // Not ours: what was installed before, else the default action (the process dies).
  if (g_previous_bus.sa_flags & SA_SIGINFO) {
    if (g_previous_bus.sa_sigaction != nullptr) return g_previous_bus.sa_sigaction(sig, info, context);
  } else if (g_previous_bus.sa_handler != SIG_DFL && g_previous_bus.sa_handler != SIG_IGN &&
             g_previous_bus.sa_handler != nullptr) {
    return g_previous_bus.sa_handler(sig);
  }
  signal(SIGBUS, SIG_DFL);
  raise(SIGBUS);
}

void InstallSigbusHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = OnSigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &g_previous_bus);
  });
}

absl::Status ErrnoStatus(int err, absl::string_view what) {
  const std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(msg);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
  return absl::FailedPreconditionError(msg);
}

}  // namespace

absl::Status CheckSharedMemoryKey(const std::string& key, absl::string_view field) {
  if (key.size() < 2 || key.size() > 255 || key[0] != '/' ||
      key.find('/', 1) != std::string::npos || key.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " must be a shm_open name, \"/name\" without another '/', got '",
                     key.substr(0, 64), "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> SharedMemoryMapping::Open(
    const std::string& key, int64_t offset, int64_t byte_size, absl::string_view field) {
  if (absl::Status s = CheckSharedMemoryKey(key, absl::StrCat(field, ".key")); !s.ok()) return s;
  if (offset < 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".offset must be >= 0, got ", offset));
  }
  if (byte_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".byte_size must be > 0, got ", byte_size));
  }
  const int fd = shm_open(key.c_str(), O_RDWR, 0);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat(field, ": shm_open('", key, "')"));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return ErrnoStatus(err, absl::StrCat(field, ": fstat('", key, "')"));
  }
  if (offset > st.st_size || byte_size > st.st_size - offset) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": offset ", offset, " + byte_size ", byte_size, " exceeds the ", st.st_size,
        " bytes of shared-memory object '", key, "'"));
  }
  const int64_t page = sysconf(_SC_PAGESIZE);
  const int64_t map_offset = offset / page * page;
  const size_t map_bytes = static_cast<size_t>(offset - map_offset + byte_size);
  void* base = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, map_offset);
  const int err = errno;
  close(fd);
  if (base == MAP_FAILED) return ErrnoStatus(err, absl::StrCat(field, ": mmap('", key, "')"));
  InstallSigbusHandler();
  std::shared_ptr<SharedMemoryMapping> m(new SharedMemoryMapping());
  m->key_ = key;
  m->offset_ = offset;
  m->size_ = byte_size;
  m->map_base_ = base;
  m->map_bytes_ = map_bytes;
  m->data_ = static_cast<char*>(base) + (offset - map_offset);
  m->device_ = static_cast<uint64_t>(st.st_dev);
  m->inode_ = static_cast<uint64_t>(st.st_ino);
  return m;
}

SharedMemoryMapping::~SharedMemoryMapping() {
  if (map_base_ != nullptr) munmap(map_base_, map_bytes_);
}

bool SharedMemoryMapping::StillCurrent() const {
  const int fd = shm_open(key_.c_str(), O_RDONLY, 0);
  if (fd < 0) return false;
  struct stat st;
  const bool ok = fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_dev) == device_ &&
                  static_cast<uint64_t>(st.st_ino) == inode_ && st.st_size >= offset_ + size_;
  close(fd);
  return ok;
}

absl::Status GuardedAccess(absl::string_view what, const std::function<void()>& fn) {
  InstallSigbusHandler();
  sigjmp_buf here;
  sigjmp_buf* const outer = g_guard;
  // savemask = 1: the jump restores the signal mask that the handler's entry changed.
  if (sigsetjmp(here, 1) != 0) {
    g_guard = outer;
    return absl::FailedPreconditionError(absl::StrCat(
        what, ": the shared-memory region shrank or vanished while it was being accessed"));
  }
  g_guard = &here;
  fn();
  g_guard = outer;
  return absl::OkStatus();
}

}  // namespace ringattn
