#include "base/shared_memory.h"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>

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

// "field.sub", or "sub" for an empty field.
std::string Sub(absl::string_view field, absl::string_view sub) {
  return field.empty() ? std::string(sub) : absl::StrCat(field, ".", sub);
}
// "field: what", or "what" for an empty field.
std::string About(absl::string_view field, absl::string_view what) {
  return field.empty() ? std::string(what) : absl::StrCat(field, ": ", what);
}

}  // namespace

std::string HostId() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  std::string boot;
  if (FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r")) {
    char buf[64] = {0};
    if (std::fgets(buf, sizeof(buf), f) != nullptr) boot = buf;
    std::fclose(f);
    while (!boot.empty() && (boot.back() == '\n' || boot.back() == ' ')) boot.pop_back();
  }
  return absl::StrCat(boot, "/", host);
}

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
  if (absl::Status s = CheckSharedMemoryKey(key, Sub(field, "key")); !s.ok()) return s;
  if (offset < 0) {
    return absl::InvalidArgumentError(absl::StrCat(Sub(field, "offset"), " must be >= 0, got ", offset));
  }
  if (byte_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(Sub(field, "byte_size"), " must be > 0, got ", byte_size));
  }
  const int fd = shm_open(key.c_str(), O_RDWR, 0);
  if (fd < 0) return ErrnoStatus(errno, About(field, absl::StrCat("shm_open('", key, "')")));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return ErrnoStatus(err, About(field, absl::StrCat("fstat('", key, "')")));
  }
  if (offset > st.st_size || byte_size > st.st_size - offset) {
    close(fd);
    return absl::InvalidArgumentError(About(
        field, absl::StrCat("offset ", offset, " + byte_size ", byte_size, " exceeds the ",
                            st.st_size, " bytes of shared-memory object '", key, "'")));
  }
  const int64_t page = sysconf(_SC_PAGESIZE);
  const int64_t map_offset = offset / page * page;
  const size_t map_bytes = static_cast<size_t>(offset - map_offset + byte_size);
  void* base = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, map_offset);
  const int err = errno;
  close(fd);
  if (base == MAP_FAILED) return ErrnoStatus(err, About(field, absl::StrCat("mmap('", key, "')")));
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
  attachment_.reset();  // before the pages it may refer to go
  if (map_base_ != nullptr) munmap(map_base_, map_bytes_);
}

std::shared_ptr<void> SharedMemoryMapping::attachment() const {
  std::lock_guard<std::mutex> lock(attachment_mu_);
  return attachment_;
}

void SharedMemoryMapping::set_attachment(std::shared_ptr<void> attachment) {
  std::lock_guard<std::mutex> lock(attachment_mu_);
  attachment_ = std::move(attachment);
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

bool SharedMemoryMapping::Shrunk() const {
  const int fd = shm_open(key_.c_str(), O_RDONLY, 0);
  if (fd < 0) return false;
  struct stat st;
  const bool shrunk = fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_dev) == device_ &&
                      static_cast<uint64_t>(st.st_ino) == inode_ && st.st_size < offset_ + size_;
  close(fd);
  return shrunk;
}

absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> SharedMemoryCache::Open(
    const std::string& key, int64_t offset, int64_t byte_size, absl::string_view field) {
  const auto id = std::make_tuple(key, offset, byte_size);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(id);
    if (it != entries_.end()) {
      if (it->second.mapping->StillCurrent()) {
        it->second.last_use = ++clock_;
        return it->second.mapping;
      }
      entries_.erase(it);
    }
  }
  absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> m =
      SharedMemoryMapping::Open(key, offset, byte_size, field);
  if (!m.ok()) return m.status();
  std::lock_guard<std::mutex> lock(mu_);
  while (!entries_.empty() && entries_.size() >= capacity_) {
    auto oldest = entries_.begin();
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->second.last_use < oldest->second.last_use) oldest = it;
    }
    entries_.erase(oldest);
  }
  if (capacity_ > 0) entries_[id] = Entry{*m, ++clock_};
  return m;
}

size_t SharedMemoryCache::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.size();
}

absl::Status ParallelCopy(const std::vector<CopySpan>& spans, absl::string_view what,
                          int threads) {
  constexpr size_t kMinPerThread = size_t{4} << 20;
  size_t total = 0;
  for (const CopySpan& s : spans) total += s.bytes;
  if (threads <= 0) {
    threads = static_cast<int>(std::min(8u, std::max(1u, std::thread::hardware_concurrency())));
  }
  const int n = static_cast<int>(
      std::min<size_t>(threads, std::max<size_t>(1, total / kMinPerThread)));
  if (n <= 1) {
    return GuardedAccess(what, [&] {
      for (const CopySpan& s : spans) std::memcpy(s.dst, s.src, s.bytes);
    });
  }
  // Thread t copies bytes [t * per, (t + 1) * per) of the spans laid end to end.
  const size_t per = (total + n - 1) / n;
  std::vector<absl::Status> statuses(n);
  std::vector<std::thread> pool;
  for (int t = 0; t < n; ++t) {
    pool.emplace_back([&, t] {
      const size_t begin = std::min(total, t * per);
      const size_t end = std::min(total, begin + per);
      statuses[t] = GuardedAccess(what, [&] {
        size_t at = 0;  // start of the current span in the end-to-end order
        for (const CopySpan& s : spans) {
          const size_t lo = std::max(begin, at);
          const size_t hi = std::min(end, at + s.bytes);
          if (lo < hi) std::memcpy(s.dst + (lo - at), s.src + (lo - at), hi - lo);
          at += s.bytes;
          if (at >= end) break;
        }
      });
    });
  }
  for (std::thread& t : pool) t.join();
  for (const absl::Status& s : statuses) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status ParallelCopy(char* dst, const char* src, size_t bytes, absl::string_view what,
                          int threads) {
  return ParallelCopy(std::vector<CopySpan>{{dst, src, bytes}}, what, threads);
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
