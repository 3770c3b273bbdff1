// The process's log: one line per event on stderr, each with a UTC timestamp and a level, as
// text or as JSON (one object per line), written through spdlog. Thread-safe.
//
//   text: 2025-06-01T12:00:00.123456Z INFO coordinator: request done request_id=req-1 code=OK
//   json: {"ts":"2025-06-01T12:00:00.123456Z","level":"info","component":"coordinator",
//          "msg":"request done","request_id":"req-1","code":"OK"}
//
// Fields are key/value pairs: strings (quoted in text when empty or holding spaces, '"', '='
// or control bytes), integers, doubles and bools (JSON numbers and booleans). A line always
// stays one line: control bytes are escaped. Below the configured level a call costs one
// comparison. Defaults: text, info.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ringattn {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };
enum class LogFormat { kText, kJson };

class LogField {
 public:
  LogField(absl::string_view key, absl::string_view value);
  LogField(absl::string_view key, const std::string& value)
      : LogField(key, absl::string_view(value)) {}
  LogField(absl::string_view key, const char* value) : LogField(key, absl::string_view(value)) {}
  template <typename T,
            std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
  LogField(absl::string_view key, T value)
      : key_(key), value_(std::to_string(value)), quoted_(false) {}
  LogField(absl::string_view key, double value);
  LogField(absl::string_view key, bool value);

  const std::string& key() const { return key_; }
  const std::string& value() const { return value_; }
  bool is_string() const { return quoted_; }

 private:
  std::string key_;
  std::string value_;
  bool quoted_;  // a string (JSON quotes it), not a number or a bool
};

// "text" or "json"; anything else is InvalidArgument naming --log_format.
absl::StatusOr<LogFormat> ParseLogFormat(absl::string_view name);
// "debug", "info", "warning" (or "warn"), "error"; anything else is InvalidArgument naming
// --log_level.
absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name);
const char* LogLevelName(LogLevel level);     // "debug", "info", "warning", "error"
const char* LogFormatName(LogFormat format);  // "text", "json"

// The format of every later line and the least level written.
void ConfigureLog(LogFormat format, LogLevel level);
LogFormat CurrentLogFormat();
LogLevel CurrentLogLevel();
bool LogEnabled(LogLevel level);

// One line: `component` says who speaks ("coordinator", "worker", "serve", "grpc").
void Log(LogLevel level, absl::string_view component, absl::string_view message,
         std::initializer_list<LogField> fields = {});
// The same with fields built at run time.
void Log(LogLevel level, absl::string_view component, absl::string_view message,
         const std::vector<LogField>& fields);

inline void LogDebug(absl::string_view component, absl::string_view message,
                     std::initializer_list<LogField> fields = {}) {
  if (LogEnabled(LogLevel::kDebug)) Log(LogLevel::kDebug, component, message, fields);
}
inline void LogInfo(absl::string_view component, absl::string_view message,
                    std::initializer_list<LogField> fields = {}) {
  Log(LogLevel::kInfo, component, message, fields);
}
inline void LogWarning(absl::string_view component, absl::string_view message,
                       std::initializer_list<LogField> fields = {}) {
  Log(LogLevel::kWarning, component, message, fields);
}
inline void LogError(absl::string_view component, absl::string_view message,
                     std::initializer_list<LogField> fields = {}) {
  Log(LogLevel::kError, component, message, fields);
}

// For tests: while one is alive, lines (without their newline) are kept here instead of going
// to stderr; the format and the level stay as configured. One at a time.
class LogCapture {
 public:
  LogCapture();
  ~LogCapture();
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;
  std::vector<std::string> lines() const;
};

}  // namespace ringattn
