#include "base/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/shm_test_object.h"
#include "gtest/gtest.h"

namespace ringattn {
namespace {

using test::ShmObject;

TEST(SharedMemoryMapping, MapsTheRangeAtAnUnalignedOffset) {
  ShmObject obj(3 * 4096);
  auto whole = SharedMemoryMapping::Open(obj.key(), 0, 3 * 4096, "r");
  ASSERT_TRUE(whole.ok()) << whole.status();
  for (int i = 0; i < 3 * 4096; ++i) (*whole)->data()[i] = static_cast<char>(i % 251);
  auto part = SharedMemoryMapping::Open(obj.key(), 5000, 100, "r");
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_EQ((*part)->size(), 100);
  for (int i = 0; i < 100; ++i) EXPECT_EQ((*part)->data()[i], static_cast<char>((5000 + i) % 251));
  (*part)->data()[0] = 42;  // writes reach the object
  EXPECT_EQ((*whole)->data()[5000], 42);
  EXPECT_TRUE((*part)->StillCurrent());
}

TEST(SharedMemoryMapping, RefusesBadKeysAndRangesNamingTheField) {
  ShmObject obj(4096);
  for (const std::string key : {"", "/", "noslash", "/a/b"}) {
    auto m = SharedMemoryMapping::Open(key, 0, 1, "region");
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_NE(m.status().message().find("region.key"), std::string::npos) << m.status();
  }
  auto past = SharedMemoryMapping::Open(obj.key(), 4000, 97, "region");
  EXPECT_EQ(past.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(past.status().message().find("exceeds the 4096 bytes"), std::string::npos);
  EXPECT_EQ(SharedMemoryMapping::Open(obj.key(), -1, 1, "region").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SharedMemoryMapping::Open(obj.key(), 0, 0, "region").status().code(),
            absl::StatusCode::kInvalidArgument);
  // Overflow of offset + size must not wrap around into "fits".
  EXPECT_EQ(SharedMemoryMapping::Open(obj.key(), 8, INT64_MAX, "region").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SharedMemoryMapping::Open("/ringattn_no_such_object", 0, 1, "region").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(SharedMemoryMapping, UnlinkedObjectStaysReadableButIsNoLongerCurrent) {
  auto obj = std::make_unique<ShmObject>(4096);
  auto m = SharedMemoryMapping::Open(obj->key(), 0, 4096, "r");
  ASSERT_TRUE(m.ok());
  (*m)->data()[7] = 9;
  obj.reset();  // shm_unlink
  EXPECT_FALSE((*m)->StillCurrent());
  EXPECT_EQ((*m)->data()[7], 9);
}

TEST(SharedMemoryCache, ReusesWhileCurrentRemapsWhenReplacedAndStaysBounded) {
  SharedMemoryCache cache(2);
  auto obj = std::make_unique<ShmObject>(4096);
  const std::string key = obj->key();
  auto a = cache.Open(key, 0, 4096, "r");
  ASSERT_TRUE(a.ok());
  auto b = cache.Open(key, 0, 4096, "r");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(a->get(), b->get());
  // Another range is another entry; a third evicts the least recently used (the first).
  ASSERT_TRUE(cache.Open(key, 0, 100, "r").ok());
  ASSERT_TRUE(cache.Open(key, 0, 200, "r").ok());
  EXPECT_EQ(cache.size(), 2u);
  auto c = cache.Open(key, 0, 100, "r");
  ASSERT_TRUE(c.ok());
  // A new object under the same name is mapped afresh, not served from the old mapping.
  (*c)->data()[0] = 1;
  obj.reset();
  const int fd = shm_open(key.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 4096), 0);
  close(fd);
  auto d = cache.Open(key, 0, 100, "r");
  ASSERT_TRUE(d.ok());
  EXPECT_NE(d->get(), c->get());
  EXPECT_EQ((*d)->data()[0], 0);
  shm_unlink(key.c_str());
  EXPECT_EQ(cache.Open(key, 0, 100, "r").status().code(), absl::StatusCode::kNotFound);
}

TEST(ParallelCopy, CopiesEveryByteAtAwkwardSizes) {
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{4095}, (size_t{9} << 20) + 13}) {
    std::vector<char> src(bytes), dst(bytes, 0);
    for (size_t i = 0; i < bytes; ++i) src[i] = static_cast<char>(i * 131 + 7);
    ASSERT_TRUE(ParallelCopy(dst.data(), src.data(), bytes, "test", 3).ok());
    EXPECT_EQ(src, dst) << bytes;
  }
}

TEST(ParallelCopy, SpansCutAcrossThreadsLandWhereTheySay) {
  // Spans of uneven sizes, reversed order into the destination, on several threads.
  const size_t sizes[] = {size_t{5} << 20, 17, size_t{3} << 20, 1, (size_t{7} << 20) + 3};
  size_t total = 0;
  for (size_t s : sizes) total += s;
  std::vector<char> src(total), dst(total, 0);
  for (size_t i = 0; i < total; ++i) src[i] = static_cast<char>((i * 2654435761u) >> 13);
  std::vector<CopySpan> spans;
  size_t from = 0, to = total;
  for (size_t s : sizes) {
    to -= s;
    spans.push_back({dst.data() + to, src.data() + from, s});
    from += s;
  }
  for (int threads : {1, 2, 5, 8}) {
    std::fill(dst.begin(), dst.end(), 0);
    ASSERT_TRUE(ParallelCopy(spans, "spans", threads).ok());
    size_t f = 0, t = total;
    for (size_t s : sizes) {
      t -= s;
      ASSERT_EQ(std::memcmp(dst.data() + t, src.data() + f, s), 0) << threads << " " << s;
      f += s;
    }
  }
}

TEST(ParallelCopy, ATruncatedSourceOnAnyThreadIsAnError) {
  ShmObject obj(int64_t{16} << 20);
  auto m = SharedMemoryMapping::Open(obj.key(), 0, int64_t{16} << 20, "r");
  ASSERT_TRUE(m.ok());
  obj.Truncate(int64_t{4} << 20);
  std::vector<char> dst(size_t{16} << 20);
  const absl::Status s = ParallelCopy(dst.data(), (*m)->data(), dst.size(), "q rows", 4);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("q rows"), std::string::npos);
}

TEST(GuardedAccess, ATruncatedRegionIsAnErrorNotACrash) {
  ShmObject obj(4 * 4096);
  auto m = SharedMemoryMapping::Open(obj.key(), 0, 4 * 4096, "r");
  ASSERT_TRUE(m.ok());
  EXPECT_TRUE(GuardedAccess("read", [&] { std::memset((*m)->data(), 1, 4 * 4096); }).ok());
  obj.Truncate(4096);
  EXPECT_FALSE((*m)->StillCurrent());
  char sink[4096];
  const absl::Status s = GuardedAccess("q", [&] { std::memcpy(sink, (*m)->data() + 8192, 4096); });
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("q: the shared-memory region shrank"), std::string::npos);
  // The thread and the guard still work afterwards, nested too.
  EXPECT_TRUE(GuardedAccess("first page", [&] { std::memcpy(sink, (*m)->data(), 4096); }).ok());
  absl::Status inner;
  const absl::Status outer = GuardedAccess("outer", [&] {
    inner = GuardedAccess("inner", [&] { std::memcpy(sink, (*m)->data() + 3 * 4096, 16); });
  });
  EXPECT_TRUE(outer.ok());
  EXPECT_EQ(inner.code(), absl::StatusCode::kFailedPrecondition);
}

TEST(GuardedAccess, ASigbusOutsideAGuardStillKillsTheProcess) {
  EXPECT_DEATH(
      {
        ShmObject obj(2 * 4096);
        auto m = SharedMemoryMapping::Open(obj.key(), 0, 2 * 4096, "r");
        (void)GuardedAccess("install", [] {});
        obj.Truncate(0);
        volatile char c = (*m)->data()[4096];
        (void)c;
      },
      "");
}

}  // namespace
}  // namespace ringattn
