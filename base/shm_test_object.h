// For tests: a POSIX shared-memory object of a given size under a fresh name, unlinked when the
// object goes.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace ringattn::test {

class ShmObject {
 public:
  explicit ShmObject(int64_t bytes)
      : key_(absl::StrCat("/ringattn_test_", getpid(), "_", Next())), bytes_(bytes) {
    const int fd = shm_open(key_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    EXPECT_GE(fd, 0) << key_;
    EXPECT_EQ(ftruncate(fd, bytes), 0);
    close(fd);
  }
  ~ShmObject() { shm_unlink(key_.c_str()); }
  ShmObject(const ShmObject&) = delete;
  ShmObject& operator=(const ShmObject&) = delete;

  const std::string& key() const { return key_; }
  int64_t bytes() const { return bytes_; }
  void Truncate(int64_t bytes) {
    const int fd = shm_open(key_.c_str(), O_RDWR, 0);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, bytes), 0);
    close(fd);
  }

 private:
  static int Next() {
    static std::atomic<int> n{0};
    return n++;
  }
  std::string key_;
  int64_t bytes_;
};

}  // namespace ringattn::test
