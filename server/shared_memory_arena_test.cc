#include "server/shared_memory_arena.h"

#include <memory>
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

// A /dev/shm that cannot hold the arena is RESOURCE_EXHAUSTED at Reserve, not a SIGBUS later.
TEST(SharedMemoryArena, MoreThanTheMachineHoldsIsRefusedAtReserve) {
  SharedMemoryArena arena("/ringattn_arena_test_huge");
  auto a = arena.Reserve(int64_t{1} << 50);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kResourceExhausted) << a.status();
}

TEST(ArenaPool, LendsEachArenaToOneHolderAtATime) {
  ArenaPool pool(2, "/ringattn_pool_test");
  std::unique_ptr<ArenaPool::Lease> a = pool.TryAcquire();
  std::unique_ptr<ArenaPool::Lease> b = pool.TryAcquire();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_NE(&a->arena(), &b->arena());
  EXPECT_EQ(pool.TryAcquire(), nullptr);  // all lent
  SharedMemoryArena* first = &a->arena();
  auto m = first->Reserve(4096);
  ASSERT_TRUE(m.ok()) << m.status();
  a.reset();  // back to the pool, its object kept for the next holder
  std::unique_ptr<ArenaPool::Lease> c = pool.TryAcquire();
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(&c->arena(), first);
  auto again = c->arena().Reserve(4096);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->get(), m->get());
}

}  // namespace
}  // namespace ringattn
