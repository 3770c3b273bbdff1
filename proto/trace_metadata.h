// The W3C trace context of gRPC calls (base/trace_context.h): read from an incoming call's
// `traceparent` metadata.
#pragma once

#include <grpcpp/server_context.h>

#include "absl/strings/string_view.h"
#include "base/trace_context.h"

namespace ringattn {

// This process's span for the incoming call `ctx`: a child of its traceparent, or a new trace.
inline TraceContext SpanOfCall(const grpc::ServerContextBase& ctx) {
  const auto& metadata = ctx.client_metadata();
  const auto it = metadata.find(kTraceparentKey);
  return SpanForCall(it == metadata.end()
                         ? absl::string_view()
                         : absl::string_view(it->second.data(), it->second.size()));
}

}  // namespace ringattn
