// W3C Trace Context (www.w3.org/TR/trace-context): the `traceparent` header,
// "00-<trace id: 32 hex>-<parent id: 16 hex>-<flags: 2 hex>", lowercase, neither id all zeros.
// A process that receives a call works in a span of its own: a child of the caller's context
// (same trace, a new span id), or the root of a new trace when the caller sent none or a
// malformed one (as the specification says). It logs the trace id and passes its own span on.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/strings/string_view.h"

namespace ringattn {

// The gRPC metadata key (lowercase, as gRPC wants keys).
inline constexpr char kTraceparentKey[] = "traceparent";

struct TraceContext {
  std::string trace_id;        // 32 lowercase hex digits
  std::string span_id;         // 16 lowercase hex digits: this span
  std::string parent_span_id;  // the caller's span; empty for the root of a trace
  uint8_t flags = 0;           // bit 0: sampled (passed on as received)

  // "00-<trace_id>-<span_id>-<flags>": the header this span sends on its own calls.
  std::string Traceparent() const;
};

// The caller's context from a traceparent header (its span_id is the caller's span); nullopt
// when the header is malformed: a wrong length or separator, non-hex or uppercase digits,
// version ff, an all-zero id. A later version's header is read by its first four fields.
std::optional<TraceContext> ParseTraceparent(absl::string_view header);

// This process's span for a call whose traceparent metadata is `header` (empty: none): a child
// of the parsed context, or a new trace.
TraceContext SpanForCall(absl::string_view header);

}  // namespace ringattn
