#include "server/shared_memory_registry.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "base/shm_test_object.h"
#include "gtest/gtest.h"

namespace ringattn {
namespace {

using Object = test::ShmObject;

v1::RegisterSystemSharedMemoryRequest Reg(const std::string& name, const std::string& key,
                                          int64_t offset, int64_t bytes) {
  v1::RegisterSystemSharedMemoryRequest r;
  r.set_name(name);
  r.set_key(key);
  r.set_offset(offset);
  r.set_byte_size(bytes);
  return r;
}

v1::SharedMemoryRef Ref(const std::string& region, int64_t offset, int64_t bytes) {
  v1::SharedMemoryRef r;
  r.set_region(region);
  r.set_offset(offset);
  r.set_byte_size(bytes);
  return r;
}

TEST(SharedMemoryRegistry, ResolvesWithinTheRegisteredRange) {
  Object obj(8192);
  SharedMemoryRegistry reg;
  ASSERT_TRUE(reg.Register("alice", Reg("a", obj.key(), 1000, 4000)).ok());
  absl::StatusOr<SharedTensor> t = reg.Resolve("alice", Ref("a", 100, 64), 64, "q.shm");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->object_offset(), 1100);
  t->data()[0] = 5;
  auto whole = SharedMemoryMapping::Open(obj.key(), 0, 8192, "");
  ASSERT_TRUE(whole.ok());
  EXPECT_EQ((*whole)->data()[1100], 5);
  // The last byte of the range, and one past it.
  EXPECT_TRUE(reg.Resolve("alice", Ref("a", 3999, 1), 1, "q.shm").ok());
  absl::Status past = reg.Resolve("alice", Ref("a", 3999, 2), 2, "k.shm").status();
  EXPECT_EQ(past.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(past.message().find("k.shm.offset 3999 + byte_size 2 exceeds region 'a'"),
            std::string::npos) << past;
  absl::Status neg = reg.Resolve("alice", Ref("a", -1, 1), 1, "k.shm").status();
  EXPECT_NE(neg.message().find("k.shm.offset"), std::string::npos) << neg;
  absl::Status size = reg.Resolve("alice", Ref("a", 0, 63), 64, "v.shm").status();
  EXPECT_NE(size.message().find("v.shm.byte_size is 63; the tensor's shape and dtype need 64"),
            std::string::npos) << size;
}

TEST(SharedMemoryRegistry, RegionsBelongToTheirOwner) {
  Object obj(4096);
  SharedMemoryRegistry reg;
  ASSERT_TRUE(reg.Register("alice", Reg("a", obj.key(), 0, 4096)).ok());
  absl::Status s = reg.Resolve("mallory", Ref("a", 0, 8), 8, "q.shm").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("q.shm.region 'a' is not registered"), std::string::npos) << s;
  EXPECT_EQ(reg.Unregister("mallory", "a").code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(reg.List("mallory", "").value().empty());
  EXPECT_EQ(reg.List("alice", "").value().size(), 1u);
  // The same name under another owner is another region.
  EXPECT_TRUE(reg.Register("mallory", Reg("a", obj.key(), 0, 16)).ok());
  EXPECT_EQ(reg.List("alice", "a").value()[0].byte_size(), 4096);
  EXPECT_EQ(reg.List("mallory", "a").value()[0].byte_size(), 16);
}

TEST(SharedMemoryRegistry, RegistrationChecksEveryField) {
  Object obj(4096);
  SharedMemoryRegistry reg(SharedMemoryRegistry::Limits{.max_regions_per_owner = 2});
  auto code_and = [&](const v1::RegisterSystemSharedMemoryRequest& r, absl::StatusCode code,
                      const std::string& words) {
    absl::Status s = reg.Register("c", r);
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(words), std::string::npos) << s;
  };
  code_and(Reg("", obj.key(), 0, 1), absl::StatusCode::kInvalidArgument, "name");
  code_and(Reg("x", "no-slash", 0, 1), absl::StatusCode::kInvalidArgument, "key");
  code_and(Reg("x", obj.key(), -5, 1), absl::StatusCode::kInvalidArgument, "offset");
  code_and(Reg("x", obj.key(), 0, 0), absl::StatusCode::kInvalidArgument, "byte_size");
  code_and(Reg("x", obj.key(), 4000, 97), absl::StatusCode::kInvalidArgument, "exceeds");
  code_and(Reg("x", "/ringattn_registry_absent", 0, 1), absl::StatusCode::kNotFound, "shm_open");
  ASSERT_TRUE(reg.Register("c", Reg("x", obj.key(), 0, 1)).ok());
  code_and(Reg("x", obj.key(), 0, 1), absl::StatusCode::kAlreadyExists, "'x'");
  ASSERT_TRUE(reg.Register("c", Reg("y", obj.key(), 0, 1)).ok());
  code_and(Reg("z", obj.key(), 0, 1), absl::StatusCode::kResourceExhausted, "at most 2");
  EXPECT_EQ(reg.size(), 2u);
  EXPECT_TRUE(reg.Unregister("c", "x").ok());
  EXPECT_EQ(reg.Unregister("c", "x").code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(reg.Unregister("c", "").ok());
  EXPECT_EQ(reg.size(), 0u);
}

TEST(SharedMemoryRegistry, AResolvedTensorOutlivesItsUnregistration) {
  Object obj(4096);
  SharedMemoryRegistry reg;
  ASSERT_TRUE(reg.Register("c", Reg("a", obj.key(), 0, 4096)).ok());
  absl::StatusOr<SharedTensor> t = reg.Resolve("c", Ref("a", 0, 4096), 4096, "q.shm");
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE(reg.Unregister("c", "a").ok());
  t->data()[4095] = 1;  // still mapped
  EXPECT_EQ(t->data()[4095], 1);
}

TEST(SharedTensor, OverlapIsPerObjectAndByteExact) {
  Object obj(4096), other(4096);
  SharedMemoryRegistry reg;
  ASSERT_TRUE(reg.Register("c", Reg("a", obj.key(), 0, 4096)).ok());
  ASSERT_TRUE(reg.Register("c", Reg("b", obj.key(), 1024, 1024)).ok());
  ASSERT_TRUE(reg.Register("c", Reg("o", other.key(), 0, 4096)).ok());
  auto at = [&](const char* region, int64_t off, int64_t n) {
    return reg.Resolve("c", Ref(region, off, n), n, "t").value();
  };
  EXPECT_TRUE(at("a", 1024, 1).Overlaps(at("b", 0, 1)));     // the same byte of the object
  EXPECT_FALSE(at("a", 0, 1024).Overlaps(at("b", 0, 10)));   // adjacent
  EXPECT_TRUE(at("a", 0, 1025).Overlaps(at("b", 0, 10)));
  EXPECT_FALSE(at("a", 0, 100).Overlaps(at("o", 0, 100)));   // another object
}

}  // namespace
}  // namespace ringattn
