// Parsing of the command line's shared values (dtype and layout names) and the one format of
// an error line, for every `ringattn` command.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

// "fp32", "fp16" or "bf16"; anything else is InvalidArgument naming --dtype.
absl::StatusOr<DType> ParseDTypeName(const std::string& name);
// "auto", "contiguous", "zigzag" or "stripe"; anything else is InvalidArgument naming --layout.
absl::StatusOr<v1::Layout> ParseLayoutName(const std::string& name);
// A comma-separated list of non-negative integers, "0,100,2051" (--cu_seqlens; "" is none);
// anything else is InvalidArgument naming --cu_seqlens. Ordering is the service's to check.
absl::StatusOr<std::vector<int64_t>> ParseCuSeqlens(const std::string& text);
// "error: CODE: message\n".
std::string ErrorLine(const absl::Status& status);

}  // namespace ringattn
