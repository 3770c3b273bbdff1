// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status, the error model inside ringattn
// (grpc::Status only at the service edge; no exceptions on the data path).
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define RA_CONCAT_INNER(a, b) a##b
#define RA_CONCAT(a, b) RA_CONCAT_INNER(a, b)

#define RA_RETURN_IF_ERROR(expr)                  \
  do {                                            \
    ::absl::Status ra_status_ = (expr);           \
    if (!ra_status_.ok()) return ra_status_;      \
  } while (0)

#define RA_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return tmp.status();            \
  lhs = std::move(*tmp)

#define RA_ASSIGN_OR_RETURN(lhs, expr) \
  RA_ASSIGN_OR_RETURN_IMPL(RA_CONCAT(ra_statusor_, __LINE__), lhs, expr)
