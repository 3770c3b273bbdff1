#include "server/request_log.h"

#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "base/log.h"

namespace ringattn {
namespace {

constexpr size_t kMaxLoggedIdBytes = 128;  // AttendLimits::max_request_id_bytes

double Ms(double seconds) { return seconds * 1e3; }

std::string DTypeLabel(v1::DType dtype) {
  std::string name = v1::DType_Name(dtype);
  if (absl::StartsWith(name, "DTYPE_")) name = name.substr(6);
  return absl::AsciiStrToLower(name);
}

}  // namespace

void LogRequest(const RequestLogEntry& e) {
  std::vector<LogField> fields = {
      {"request_id", e.request_id.substr(0, kMaxLoggedIdBytes)},
      {"rpc", e.rpc},
      {"code", absl::StatusCodeToString(e.status.code())},
      {"client", e.client},
  };
  if (e.trace != nullptr) {
    fields.emplace_back("trace_id", e.trace->trace_id);
    fields.emplace_back("span_id", e.trace->span_id);
    if (!e.trace->parent_span_id.empty()) {
      fields.emplace_back("parent_span_id", e.trace->parent_span_id);
    }
  }
  if (e.q != nullptr && e.q->shape_size() > 0) {
    fields.emplace_back("shape", absl::StrJoin(e.q->shape(), "x"));
    if (e.k != nullptr && e.k->shape_size() == 4) fields.emplace_back("heads_k", e.k->shape(2));
    fields.emplace_back("dtype", DTypeLabel(e.q->dtype()));
  }
  fields.emplace_back("bytes_in", e.bytes_in);
  fields.emplace_back("bytes_out", e.bytes_out);
  fields.emplace_back("total_ms", Ms(e.total_seconds));
  const v1::Timings none;
  const v1::Timings& t = e.timings != nullptr ? *e.timings : none;
  for (const auto& [name, seconds] :
       {std::pair{"receive_ms", t.receive_seconds()},
        std::pair{"validate_ms", t.validate_seconds()}, std::pair{"queue_ms", t.queue_seconds()},
        std::pair{"ring_wait_ms", t.ring_wait_seconds()},
        std::pair{"scatter_ms", t.scatter_seconds()}, std::pair{"workers_ms", t.workers_seconds()},
        std::pair{"gather_ms", t.gather_seconds()}, std::pair{"respond_ms", t.respond_seconds()},
        std::pair{"send_ms", t.send_seconds()}}) {
    fields.emplace_back(name, Ms(seconds));
  }
  if (!e.status.ok()) fields.emplace_back("error", e.status.message());
  Log(e.status.ok() ? LogLevel::kInfo : LogLevel::kWarning, "request", "request", fields);
}

}  // namespace ringattn
