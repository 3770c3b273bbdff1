// Parsing of the command line's shared values (dtype and layout names) and the one format of
// an error line, for every `ringattn` command.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

// "fp32", "fp16" or "bf16"; anything else is InvalidArgument naming --dtype.
absl::StatusOr<DType> ParseDTypeName(const std::string& name);
// "auto", "contiguous", "zigzag" or "stripe"; anything else is InvalidArgument naming --layout.
absl::StatusOr<v1::Layout> ParseLayoutName(const std::string& name);
// "error: CODE: message\n".
std::string ErrorLine(const absl::Status& status);

}  // namespace ringattn
