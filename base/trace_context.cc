#include "base/trace_context.h"

#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"

namespace ringattn {
namespace {

bool IsLowerHex(absl::string_view s) {
  for (const char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

bool AllZeros(absl::string_view s) { return s.find_first_not_of('0') == absl::string_view::npos; }

// `digits` random lowercase hex digits, never all zeros.
std::string RandomHex(int digits) {
  static absl::Mutex mu(absl::kConstInit);
  static std::mt19937_64* const engine = new std::mt19937_64(std::random_device{}());
  std::string out;
  while (true) {
    out.clear();
    {
      absl::MutexLock lock(&mu);
      while (static_cast<int>(out.size()) < digits) {
        absl::StrAppendFormat(&out, "%016x", (*engine)());
      }
    }
    out.resize(static_cast<size_t>(digits));
    if (!AllZeros(out)) return out;
  }
}

}  // namespace

std::string TraceContext::Traceparent() const {
  return absl::StrFormat("00-%s-%s-%02x", trace_id, span_id, flags);
}

std::optional<TraceContext> ParseTraceparent(absl::string_view header) {
  // version(2) - trace id(32) - parent id(16) - flags(2): 55 characters.
  constexpr size_t kLength = 55;
  if (header.size() < kLength) return std::nullopt;
  const absl::string_view version = header.substr(0, 2);
  if (!IsLowerHex(version) || version == "ff") return std::nullopt;
  // Version 00 is exactly 55 characters; a later one may add fields after a '-'.
  if (header.size() > kLength && (version == "00" || header[kLength] != '-')) return std::nullopt;
  if (header[2] != '-' || header[35] != '-' || header[52] != '-') return std::nullopt;
  TraceContext c;
  c.trace_id = std::string(header.substr(3, 32));
  c.span_id = std::string(header.substr(36, 16));
  const absl::string_view flags = header.substr(53, 2);
  if (!IsLowerHex(c.trace_id) || !IsLowerHex(c.span_id) || !IsLowerHex(flags)) {
    return std::nullopt;
  }
  if (AllZeros(c.trace_id) || AllZeros(c.span_id)) return std::nullopt;
  int value = 0;
  if (!absl::SimpleHexAtoi(flags, &value)) return std::nullopt;
  c.flags = static_cast<uint8_t>(value);
  return c;
}

TraceContext SpanForCall(absl::string_view header) {
  TraceContext span;
  if (std::optional<TraceContext> caller = ParseTraceparent(header); caller.has_value()) {
    span.trace_id = caller->trace_id;
    span.parent_span_id = caller->span_id;
    span.flags = caller->flags;
  } else {
    span.trace_id = RandomHex(32);
  }
  span.span_id = RandomHex(16);
  return span;
}

}  // namespace ringattn
