#include "proto/cluster_auth.h"

#include <cstdlib>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace ringattn {
namespace {

TEST(ClusterSecret, GeneratedSecretsAreLongAndDistinct) {
  absl::StatusOr<ClusterSecret> a = ClusterSecret::Generate();
  absl::StatusOr<ClusterSecret> b = ClusterSecret::Generate();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->value().size(), 64u);
  EXPECT_NE(a->value(), b->value());
  EXPECT_TRUE(ClusterSecret::FromString(a->value()).ok());
}

TEST(ClusterSecret, RefusesShortOrUnprintableValues) {
  EXPECT_EQ(ClusterSecret::FromString("short").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ClusterSecret::FromString(std::string(20, 'a') + " b").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ClusterSecret::FromString(std::string(20, 'a') + "\n").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ClusterSecret::FromString(std::string(16, 'a')).ok());
}

TEST(ClusterSecret, FromFileThenEnvironment) {
  const std::string path = ::testing::TempDir() + "/ringattn_secret";
  {
    std::ofstream f(path);
    f << "file-secret-0123456789\n";
  }
  setenv(ClusterSecret::kEnvironmentVariable, "env-secret-0123456789", 1);
  EXPECT_EQ(ClusterSecret::FromFileOrEnvironment(path)->value(), "file-secret-0123456789");
  EXPECT_EQ(ClusterSecret::FromFileOrEnvironment("")->value(), "env-secret-0123456789");
  setenv(ClusterSecret::kEnvironmentVariable, "tiny", 1);
  absl::Status bad = ClusterSecret::FromFileOrEnvironment("").status();
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find(ClusterSecret::kEnvironmentVariable), std::string::npos);
  unsetenv(ClusterSecret::kEnvironmentVariable);
  EXPECT_EQ(ClusterSecret::FromFileOrEnvironment("").status().code(),
            absl::StatusCode::kNotFound);
  absl::Status missing = ClusterSecret::FromFileOrEnvironment("/nonexistent/secret").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(missing.message().find("/nonexistent/secret"), std::string::npos);
}

}  // namespace
}  // namespace ringattn
