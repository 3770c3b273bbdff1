#include "server/shared_memory_arena.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace ringattn {
namespace {

TEST(SharedMemoryArena, ReusesWhileLargeEnoughGrowsIntoANewObject) {
  SharedMemoryArena arena("/ringattn_arena_test");
  auto a = arena.Reserve(1000);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_GE((*a)->size(), 1000);
  auto b = arena.Reserve(5000);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(a->get(), b->get());  // 1 MiB at least: no new object
  const std::string first_key = (*a)->key();
  auto c = arena.Reserve(int64_t{3} << 20);
  ASSERT_TRUE(c.ok());
  EXPECT_NE((*c)->key(), first_key);
  EXPECT_GE((*c)->size(), int64_t{3} << 20);
  // The old object is unlinked; a mapping held by a request still works.
  EXPECT_FALSE((*a)->StillCurrent());
  (*a)->data()[0] = 1;
  EXPECT_TRUE((*c)->StillCurrent());
  // Workers open it by key, as they do a client's region.
  auto worker = SharedMemoryMapping::Open((*c)->key(), 0, (*c)->size(), "w");
  ASSERT_TRUE(worker.ok()) << worker.status();
  (*c)->data()[12345] = 7;
  EXPECT_EQ((*worker)->data()[12345], 7);
}

TEST(ParallelCopy, CopiesEveryByteAtAwkwardSizes) {
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{4095}, (size_t{9} << 20) + 13}) {
    std::vector<char> src(bytes), dst(bytes, 0);
    for (size_t i = 0; i < bytes; ++i) src[i] = static_cast<char>(i * 131 + 7);
    ASSERT_TRUE(ParallelCopy(dst.data(), src.data(), bytes, "test", 3).ok());
    EXPECT_EQ(src, dst) << bytes;
  }
}

}  // namespace
}  // namespace ringattn
