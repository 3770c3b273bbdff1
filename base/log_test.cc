// The log's two formats, its levels and escaping, and the W3C traceparent parser (against the
// specification's examples).
#include "base/log.h"

#include <regex>
#include <string>
#include <vector>

#include "base/trace_context.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ringattn {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::MatchesRegex;

// Restores the default configuration after each test.
class LogTest : public ::testing::Test {
 protected:
  void TearDown() override { ConfigureLog(LogFormat::kText, LogLevel::kInfo); }
};

TEST_F(LogTest, TextLinesHaveTimestampLevelComponentAndFields) {
  ConfigureLog(LogFormat::kText, LogLevel::kInfo);
  LogCapture capture;
  LogInfo("coordinator", "request done",
          {{"request_id", "req-7"},
           {"code", "OK"},
           {"total_ms", 12.5},
           {"rank", 3},
           {"ok", true},
           {"client", "peer:ipv4:127.0.0.1"},
           {"note", "two words"},
           {"none", ""}});
  ASSERT_EQ(capture.lines().size(), 1u);
  EXPECT_THAT(capture.lines()[0],
              MatchesRegex("[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z "
                           "INFO coordinator: request done request_id=req-7 code=OK "
                           "total_ms=12.5 rank=3 ok=true client=peer:ipv4:127.0.0.1 "
                           "note=\"two words\" none=\"\""));
}

TEST_F(LogTest, JsonLinesAreOneObjectWithTypedFields) {
  ConfigureLog(LogFormat::kJson, LogLevel::kDebug);
  LogCapture capture;
  LogDebug("worker", "shard \"done\"", {{"bytes", int64_t{1} << 40}, {"ms", 0.25}, {"x", false}});
  ASSERT_EQ(capture.lines().size(), 1u);
  EXPECT_THAT(capture.lines()[0],
              MatchesRegex("\\{\"ts\":\"[0-9-]+T[0-9:.]+Z\",\"level\":\"debug\","
                           "\"component\":\"worker\",\"msg\":\"shard \\\\\"done\\\\\"\","
                           "\"bytes\":1099511627776,\"ms\":0.25,\"x\":false\\}"));
}

TEST_F(LogTest, ControlBytesNeverBreakALine) {
  for (const LogFormat format : {LogFormat::kText, LogFormat::kJson}) {
    ConfigureLog(format, LogLevel::kInfo);
    LogCapture capture;
    LogWarning("c", "line one\nline two", {{"id", std::string("a\x01\"b\n", 5)}});
    const std::vector<std::string> lines = capture.lines();
    ASSERT_EQ(lines.size(), 1u);
    const std::string& line = lines[0];
    EXPECT_EQ(line.find('\n'), std::string::npos) << line;
    EXPECT_EQ(line.find('\x01'), std::string::npos) << line;
    EXPECT_THAT(line, HasSubstr("line one\\nline two"));
    EXPECT_THAT(line, HasSubstr("a\\u0001\\\"b\\n"));
  }
}

TEST_F(LogTest, LevelsBelowTheConfiguredOneAreDropped) {
  ConfigureLog(LogFormat::kText, LogLevel::kWarning);
  LogCapture capture;
  LogDebug("c", "debug");
  LogInfo("c", "info");
  LogWarning("c", "warning");
  LogError("c", "error");
  std::vector<std::string> levels;
  for (const std::string& line : capture.lines()) levels.push_back(line.substr(28, 5));
  EXPECT_THAT(levels, ElementsAre("WARNI", "ERROR"));
  EXPECT_FALSE(LogEnabled(LogLevel::kInfo));
  EXPECT_TRUE(LogEnabled(LogLevel::kError));
}

TEST_F(LogTest, NonFiniteNumbersStayValidJson) {
  ConfigureLog(LogFormat::kJson, LogLevel::kInfo);
  LogCapture capture;
  LogInfo("c", "m", {{"a", std::nan("")}, {"b", -1.0 / 0.0}});
  ASSERT_EQ(capture.lines().size(), 1u);
  EXPECT_THAT(capture.lines()[0], HasSubstr("\"a\":\"nan\",\"b\":\"-inf\"}"));
}

TEST(LogFlagsTest, ParsesFormatsAndLevelsAndNamesTheFlagOtherwise) {
  EXPECT_EQ(*ParseLogFormat("json"), LogFormat::kJson);
  EXPECT_EQ(*ParseLogFormat("text"), LogFormat::kText);
  EXPECT_THAT(ParseLogFormat("xml").status().message(), HasSubstr("--log_format"));
  EXPECT_EQ(*ParseLogLevel("warn"), LogLevel::kWarning);
  EXPECT_EQ(*ParseLogLevel("warning"), LogLevel::kWarning);
  EXPECT_EQ(*ParseLogLevel("debug"), LogLevel::kDebug);
  EXPECT_THAT(ParseLogLevel("verbose").status().message(), HasSubstr("--log_level"));
}

TEST(LogCaptureTest, NothingIsCapturedAfterTheCaptureEnds) {
  std::vector<std::string> lines;
  {
    LogCapture capture;
    LogInfo("c", "kept");
    lines = capture.lines();
  }
  EXPECT_EQ(lines.size(), 1u);
  LogCapture again;
  EXPECT_THAT(again.lines(), IsEmpty());
}

// ---- traceparent ------------------------------------------------------------------------------

TEST(TraceparentTest, ReadsTheSpecificationsExample) {
  const std::optional<TraceContext> c =
      ParseTraceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_EQ(c->span_id, "00f067aa0ba902b7");
  EXPECT_EQ(c->flags, 1);
  EXPECT_EQ(c->Traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
}

TEST(TraceparentTest, RefusesMalformedHeaders) {
  for (const char* bad : {
           "",
           "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",       // no flags
           "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",    // uppercase
           "00-00000000000000000000000000000000-00f067aa0ba902b7-01",    // zero trace id
           "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",    // zero parent id
           "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",    // version ff
           "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",  // 00 is exactly 55
           "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",    // separator
           "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",    // not hex
       }) {
    EXPECT_FALSE(ParseTraceparent(bad).has_value()) << bad;
  }
  // A later version: its first four fields, then more after a '-'.
  EXPECT_TRUE(ParseTraceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                  .has_value());
  EXPECT_FALSE(
      ParseTraceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01extra").has_value());
}

TEST(TraceparentTest, ASpanIsAChildOfTheCallerOrTheRootOfANewTrace) {
  const TraceContext child = SpanForCall("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
  EXPECT_EQ(child.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_EQ(child.parent_span_id, "00f067aa0ba902b7");
  EXPECT_NE(child.span_id, "00f067aa0ba902b7");
  EXPECT_EQ(child.flags, 1);
  // What it passes on parses back to its own span.
  const std::optional<TraceContext> sent = ParseTraceparent(child.Traceparent());
  ASSERT_TRUE(sent.has_value());
  EXPECT_EQ(sent->trace_id, child.trace_id);
  EXPECT_EQ(sent->span_id, child.span_id);

  for (const char* none : {"", "garbage"}) {
    const TraceContext root = SpanForCall(none);
    EXPECT_THAT(root.trace_id, MatchesRegex("[0-9a-f]{32}"));
    EXPECT_THAT(root.span_id, MatchesRegex("[0-9a-f]{16}"));
    EXPECT_THAT(root.parent_span_id, IsEmpty());
    EXPECT_TRUE(ParseTraceparent(root.Traceparent()).has_value());
  }
  EXPECT_NE(SpanForCall("").trace_id, SpanForCall("").trace_id);
}

}  // namespace
}  // namespace ringattn
