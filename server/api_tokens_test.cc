// ApiTokens: the file's format and what authenticates a call.
#include "server/api_tokens.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;

constexpr char kFile[] =
    "# clients of the service\n"
    "\n"
    "alice-token-0123456789 alice\n"
    "  alice-rotated-token-01\talice  \n"
    "bob-token-0123456789ab bob\r\n";

TEST(ApiTokens, ParsesLinesAndSkipsCommentsAndBlanks) {
  absl::StatusOr<ApiTokens> t = ApiTokens::Parse(kFile, "tokens");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->size(), 3u);
}

TEST(ApiTokens, TheRightTokenNamesItsClient) {
  const ApiTokens t = *ApiTokens::Parse(kFile, "tokens");
  EXPECT_EQ(*t.AuthenticateValue("Bearer alice-token-0123456789"), "alice");
  EXPECT_EQ(*t.AuthenticateValue("Bearer alice-rotated-token-01"), "alice");
  EXPECT_EQ(*t.AuthenticateValue("Bearer bob-token-0123456789ab"), "bob");
}

TEST(ApiTokens, AnythingElseIsUnauthenticated) {
  const ApiTokens t = *ApiTokens::Parse(kFile, "tokens");
  for (const char* value : {"Bearer alice-token-012345678",    // a prefix
                            "Bearer alice-token-01234567890",  // one byte more
                            "Bearer alice-token-0123456788",   // the last byte differs
                            "Bearer ", "Bearer", "", "bearer alice-token-0123456789",
                            "alice-token-0123456789", "Basic alice-token-0123456789"}) {
    SCOPED_TRACE(value);
    const absl::StatusOr<std::string> who = t.AuthenticateValue(value);
    EXPECT_EQ(who.status().code(), absl::StatusCode::kUnauthenticated);
    EXPECT_THAT(who.status().message(), HasSubstr("'authorization' metadata"));
  }
}

TEST(ApiTokens, BadFilesAreRefusedNamingTheLine) {
  struct Case {
    const char* text;
    const char* error;
  };
  for (const Case& c : {
           Case{"alice-token-0123456789\n", "tokens line 1: want '<token> <client name>'"},
           Case{"ok-token-0123456789 a\nshort b\n", "tokens line 2: a token needs 16"},
           Case{"x-token-0123456789ab a b\n", "tokens line 1: want"},
           Case{"same-token-0123456789 a\nsame-token-0123456789 b\n",
                "tokens line 2: this token is also on an earlier line"},
           Case{"# only a comment\n\n", "tokens: no tokens"},
       }) {
    SCOPED_TRACE(c.text);
    const absl::StatusOr<ApiTokens> t = ApiTokens::Parse(c.text, "tokens");
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(t.status().message(), HasSubstr(c.error));
  }
  const absl::StatusOr<ApiTokens> missing = ApiTokens::FromFile("/nonexistent/tokens");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(missing.status().message(), HasSubstr("--api_tokens_file: cannot read"));
}

}  // namespace
}  // namespace ringattn
