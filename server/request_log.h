// The coordinator's log line per compute call (base/log.h, component "request", message
// "request"): the request id, the RPC, the shape, how it ended, who asked, its trace, and its
// time in all and per phase. Info when OK, warning otherwise.
//
//   ... INFO request: request request_id=req-1 rpc=Attend code=OK client=peer:ipv4:127.0.0.1
//       trace_id=4bf9... span_id=... shape=1x4096x8x64 heads_k=2 dtype=bf16 bytes_in=...
//       bytes_out=... total_ms=41.2 receive_ms=0 validate_ms=0.1 queue_ms=0 ring_wait_ms=0
//       scatter_ms=1.2 workers_ms=38.9 gather_ms=0.6 respond_ms=0 send_ms=0
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "base/trace_context.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

struct RequestLogEntry {
  std::string rpc;         // "Attend", "AttendStream", "AttendBackward", ...
  std::string request_id;  // as sent (at most 128 bytes are logged), or the coordinator's
  std::string client;      // the caller's identity
  const TraceContext* trace = nullptr;  // this call's span; may be null
  absl::Status status;
  // The request's q and k (their shapes and q's dtype); null or shapeless when the call ended
  // before the request was read.
  const v1::Tensor* q = nullptr;
  const v1::Tensor* k = nullptr;
  const v1::Timings* timings = nullptr;  // may be null
  double total_seconds = 0;              // arrival to the end of the call
  int64_t bytes_in = 0;                  // the request's tensor bytes
  int64_t bytes_out = 0;                 // the response's tensor bytes
};

void LogRequest(const RequestLogEntry& entry);

}  // namespace ringattn
