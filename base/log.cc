#include "base/log.h"

#include <spdlog/logger.h>
#include <spdlog/sinks/base_sink.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"

namespace ringattn {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<int> g_format{static_cast<int>(LogFormat::kText)};

// The names of the two loggers, which share one sink: the formatter reads the payload's format
// from the logger's name, so a line is whole even while the format is being changed.
constexpr char kTextLogger[] = "text";
constexpr char kJsonLogger[] = "json";

spdlog::level::level_enum ToSpdlog(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return spdlog::level::debug;
    case LogLevel::kInfo:
      return spdlog::level::info;
    case LogLevel::kWarning:
      return spdlog::level::warn;
    case LogLevel::kError:
      return spdlog::level::err;
  }
  return spdlog::level::info;
}

LogLevel FromSpdlog(spdlog::level::level_enum level) {
  if (level <= spdlog::level::debug) return LogLevel::kDebug;
  if (level == spdlog::level::info) return LogLevel::kInfo;
  if (level == spdlog::level::warn) return LogLevel::kWarning;
  return LogLevel::kError;
}

// JSON's string escapes, and \u00XX for every byte outside printable ASCII, so that a line is
// valid JSON and stays one line whatever the bytes. `quotes`: escape '"' too.
void AppendEscaped(std::string* out, absl::string_view s, bool quotes) {
  for (const char c : s) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (c == '\\' || (quotes && c == '"')) {
      out->push_back('\\');
      out->push_back(c);
    } else if (c == '\n') {
      out->append("\\n");
    } else if (c == '\t') {
      out->append("\\t");
    } else if (c == '\r') {
      out->append("\\r");
    } else if (u < 0x20 || u > 0x7e) {
      absl::StrAppendFormat(out, "\\u%04x", u);
    } else {
      out->push_back(c);
    }
  }
}

// Whether a text value needs quotes to read back as one value.
bool NeedsQuotes(absl::string_view v) {
  if (v.empty()) return true;
  for (const char c : v) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (c == ' ' || c == '"' || c == '=' || c == '\\' || u < 0x20 || u > 0x7e) return true;
  }
  return false;
}

// `value` in double quotes and escaped, or as it is.
void AppendValue(std::string* out, absl::string_view value, bool quoted) {
  if (!quoted) {
    out->append(value.data(), value.size());
    return;
  }
  out->push_back('"');
  AppendEscaped(out, value, /*quotes=*/true);
  out->push_back('"');
}

std::string RenderText(absl::string_view component, absl::string_view message,
                       const LogField* fields, size_t n) {
  std::string out;
  AppendEscaped(&out, component, /*quotes=*/false);
  out.append(": ");
  AppendEscaped(&out, message, /*quotes=*/false);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(' ');
    AppendEscaped(&out, fields[i].key(), /*quotes=*/false);
    out.push_back('=');
    AppendValue(&out, fields[i].value(), NeedsQuotes(fields[i].value()));
  }
  return out;
}

// The members of the line's object after "ts" and "level".
std::string RenderJson(absl::string_view component, absl::string_view message,
                       const LogField* fields, size_t n) {
  std::string out = "\"component\":";
  AppendValue(&out, component, /*quoted=*/true);
  out.append(",\"msg\":");
  AppendValue(&out, message, /*quoted=*/true);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(',');
    AppendValue(&out, fields[i].key(), /*quoted=*/true);
    out.push_back(':');
    AppendValue(&out, fields[i].value(), fields[i].is_string());
  }
  return out;
}

// Adds the timestamp and the level to the payload, as its logger's format says.
class LineFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    const std::string ts =
        absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::FromChrono(msg.time), absl::UTCTimeZone());
    const LogLevel level = FromSpdlog(msg.level);
    const absl::string_view payload(msg.payload.data(), msg.payload.size());
    std::string line;
    if (absl::string_view(msg.logger_name.data(), msg.logger_name.size()) == kJsonLogger) {
      line = absl::StrCat("{\"ts\":\"", ts, "\",\"level\":\"", LogLevelName(level), "\",", payload,
                          "}\n");
    } else {
      line = absl::StrCat(ts, " ", absl::AsciiStrToUpper(LogLevelName(level)), " ", payload, "\n");
    }
    dest.append(line.data(), line.data() + line.size());
  }
  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<LineFormatter>();
  }
};

// stderr, or the lines of a LogCapture while one is alive.
class OutputSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  void StartCapture() {
    std::lock_guard<std::mutex> lock(mutex_);
    captured_.emplace();
  }
  void StopCapture() {
    std::lock_guard<std::mutex> lock(mutex_);
    captured_.reset();
  }
  std::vector<std::string> Captured() {
    std::lock_guard<std::mutex> lock(mutex_);
    return captured_.value_or(std::vector<std::string>());
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    spdlog::memory_buf_t line;
    formatter_->format(msg, line);
    if (captured_.has_value()) {
      captured_->emplace_back(line.data(), line.size() - 1);  // without its newline
      return;
    }
    // One write per line (stderr is unbuffered), so lines of processes sharing it stay whole.
    std::fwrite(line.data(), 1, line.size(), stderr);
  }
  void flush_() override { std::fflush(stderr); }

 private:
  std::optional<std::vector<std::string>> captured_;  // guarded by base_sink's mutex_
};

struct Loggers {
  std::shared_ptr<OutputSink> sink;
  std::unique_ptr<spdlog::logger> text;
  std::unique_ptr<spdlog::logger> json;
};

Loggers& TheLoggers() {
  static Loggers* const loggers = [] {
    auto* l = new Loggers;
    l->sink = std::make_shared<OutputSink>();
    l->sink->set_formatter(std::make_unique<LineFormatter>());
    l->text = std::make_unique<spdlog::logger>(kTextLogger, l->sink);
    l->json = std::make_unique<spdlog::logger>(kJsonLogger, l->sink);
    // The sink filters nothing; each logger passes what LogEnabled passes.
    for (spdlog::logger* logger : {l->text.get(), l->json.get()}) {
      logger->set_level(spdlog::level::trace);
    }
    return l;
  }();
  return *loggers;
}

void Write(LogLevel level, absl::string_view component, absl::string_view message,
           const LogField* fields, size_t n) {
  if (!LogEnabled(level)) return;
  Loggers& loggers = TheLoggers();
  const bool json = CurrentLogFormat() == LogFormat::kJson;
  const std::string payload =
      json ? RenderJson(component, message, fields, n) : RenderText(component, message, fields, n);
  (json ? loggers.json : loggers.text)
      ->log(ToSpdlog(level), spdlog::string_view_t(payload.data(), payload.size()));
}

}  // namespace

LogField::LogField(absl::string_view key, absl::string_view value)
    : key_(key), value_(value), quoted_(true) {}

LogField::LogField(absl::string_view key, double value) : key_(key), quoted_(false) {
  if (std::isfinite(value)) {
    value_ = absl::StrFormat("%.6g", value);
  } else {
    value_ = std::isnan(value) ? "nan" : (value > 0 ? "inf" : "-inf");
    quoted_ = true;  // JSON has no such numbers
  }
}

LogField::LogField(absl::string_view key, bool value)
    : key_(key), value_(value ? "true" : "false"), quoted_(false) {}

absl::StatusOr<LogFormat> ParseLogFormat(absl::string_view name) {
  if (name == "text") return LogFormat::kText;
  if (name == "json") return LogFormat::kJson;
  return absl::InvalidArgumentError(
      absl::StrCat("--log_format must be text or json, got '", name, "'"));
}

absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name) {
  if (name == "debug") return LogLevel::kDebug;
  if (name == "info") return LogLevel::kInfo;
  if (name == "warning" || name == "warn") return LogLevel::kWarning;
  if (name == "error") return LogLevel::kError;
  return absl::InvalidArgumentError(
      absl::StrCat("--log_level must be debug, info, warning or error, got '", name, "'"));
}

const char* LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "info";
}

const char* LogFormatName(LogFormat format) { return format == LogFormat::kJson ? "json" : "text"; }

void ConfigureLog(LogFormat format, LogLevel level) {
  g_format = static_cast<int>(format);
  g_level = static_cast<int>(level);
}

LogFormat CurrentLogFormat() { return static_cast<LogFormat>(g_format.load()); }
LogLevel CurrentLogLevel() { return static_cast<LogLevel>(g_level.load()); }

bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= g_level.load(); }

void Log(LogLevel level, absl::string_view component, absl::string_view message,
         std::initializer_list<LogField> fields) {
  Write(level, component, message, fields.begin(), fields.size());
}

void Log(LogLevel level, absl::string_view component, absl::string_view message,
         const std::vector<LogField>& fields) {
  Write(level, component, message, fields.data(), fields.size());
}

LogCapture::LogCapture() { TheLoggers().sink->StartCapture(); }
LogCapture::~LogCapture() { TheLoggers().sink->StopCapture(); }
std::vector<std::string> LogCapture::lines() const { return TheLoggers().sink->Captured(); }

}  // namespace ringattn
