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

TEST(ConstantTimeEquals, EqualOnlyWhenEveryByteAndTheLengthAgree) {
  EXPECT_TRUE(ConstantTimeEquals("secret-value", "secret-value"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_FALSE(ConstantTimeEquals("secret-value", "secret-valuf"));
  EXPECT_FALSE(ConstantTimeEquals("secret-value", "secret-valu"));
  EXPECT_FALSE(ConstantTimeEquals("secret-value", "secret-value!"));
  EXPECT_FALSE(ConstantTimeEquals("secret-value", ""));
  EXPECT_FALSE(ConstantTimeEquals("", "x"));
  // The given value repeated to the expected length is not equal either.
  EXPECT_FALSE(ConstantTimeEquals("abab", "ab"));
}

TEST(ClusterSecret, TlsNeedsAllThreeReadableFiles) {
  const ClusterSecret secret = *ClusterSecret::FromString("tls-secret-0123456789");
  EXPECT_FALSE(secret.has_tls());
  const absl::Status partial = secret.WithTls({"cert.pem", "key.pem", ""}).status();
  EXPECT_EQ(partial.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(partial.message().find("--internal_tls_ca"), std::string::npos) << partial;
  const absl::Status missing =
      secret.WithTls({"/nonexistent/c.pem", "/nonexistent/k.pem", "/nonexistent/ca.pem"}).status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(missing.message().find("--internal_tls_cert: cannot read /nonexistent/c.pem"),
            std::string::npos)
      << missing;
  const std::string not_pem = ::testing::TempDir() + "/not_pem";
  std::ofstream(not_pem) << "plain text\n";
  const absl::Status bad = secret.WithTls({not_pem, not_pem, not_pem}).status();
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("is not a PEM file"), std::string::npos) << bad;
}

}  // namespace
}  // namespace ringattn
