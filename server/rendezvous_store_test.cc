#include "server/rendezvous_store.h"

#include <atomic>
#include <string>
#include <thread>

#include "gtest/gtest.h"

namespace ringattn {
namespace {

TEST(RendezvousStore, GetWaitsForEveryKey) {
  RendezvousStore store;
  std::thread setter([&] {
    absl::SleepFor(absl::Milliseconds(50));
    ASSERT_TRUE(store.Set("a", "1").ok());
    ASSERT_TRUE(store.Set("b", "2").ok());
  });
  absl::StatusOr<std::vector<std::string>> v =
      store.Get({"a", "b"}, absl::Now() + absl::Seconds(10));
  setter.join();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, (std::vector<std::string>{"1", "2"}));
  absl::Status missing = store.Get({"a", "c"}, absl::Now() + absl::Milliseconds(50)).status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(missing.message().find("'c'"), std::string::npos);
  store.ErasePrefix("a");
  EXPECT_EQ(store.size(), 1u);
}

TEST(RendezvousStore, ValuesAndKeysAreBounded) {
  RendezvousStore store(RendezvousStore::Limits{.max_value_bytes = 8, .max_keys = 2});
  EXPECT_EQ(store.Set("big", std::string(9, 'x')).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(store.Set("k1", "v").ok());
  ASSERT_TRUE(store.Set("k2", "v").ok());
  EXPECT_EQ(store.Set("k3", "v").code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(store.Set("k2", "w").ok());  // replacing a key adds none
  EXPECT_EQ(store.size(), 2u);
}

TEST(RendezvousStore, KeysExpireAfterTheirLifetime) {
  RendezvousStore store(RendezvousStore::Limits{.max_keys = 1,
                                                .lifetime = absl::Milliseconds(50)});
  ASSERT_TRUE(store.Set("old", "v").ok());
  absl::SleepFor(absl::Milliseconds(80));
  EXPECT_TRUE(store.Set("new", "v").ok());  // the old one expired and freed its place
  EXPECT_EQ(store.size(), 1u);
}

TEST(RendezvousStore, ACallerThatGoesAwayIsReleasedPromptly) {
  RendezvousStore store;
  std::atomic<bool> gone{false};
  std::thread leaver([&] {
    absl::SleepFor(absl::Milliseconds(50));
    gone = true;
  });
  const absl::Time t0 = absl::Now();
  absl::Status s =
      store.Get({"never"}, absl::Now() + absl::Minutes(5), [&] { return gone.load(); }).status();
  leaver.join();
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
}

}  // namespace
}  // namespace ringattn
