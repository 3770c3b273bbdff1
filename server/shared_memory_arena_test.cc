#include "server/shared_memory_arena.h"

#include <string>

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

}  // namespace
}  // namespace ringattn
