#include "cli/cli_parse.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace ringattn {

absl::StatusOr<DType> ParseDTypeName(const std::string& name) {
  if (name == "fp32") return DType::kF32;
  if (name == "fp16") return DType::kF16;
  if (name == "bf16") return DType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("--dtype must be fp32, fp16 or bf16, got '", name, "'"));
}

absl::StatusOr<v1::Layout> ParseLayoutName(const std::string& name) {
  if (name == "auto") return v1::LAYOUT_AUTO;
  if (name == "contiguous") return v1::LAYOUT_CONTIGUOUS;
  if (name == "zigzag") return v1::LAYOUT_ZIGZAG;
  if (name == "stripe") return v1::LAYOUT_STRIPE;
  return absl::InvalidArgumentError(
      absl::StrCat("--layout must be auto, contiguous, zigzag or stripe, got '", name, "'"));
}

absl::StatusOr<std::vector<int64_t>> ParseCuSeqlens(const std::string& text) {
  std::vector<int64_t> out;
  if (text.empty()) return out;
  for (const absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t value = 0;
    if (!absl::SimpleAtoi(part, &value) || value < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--cu_seqlens must be comma-separated non-negative integers, e.g. 0,100,4096; got '",
          text, "'"));
    }
    out.push_back(value);
  }
  return out;
}

std::string ErrorLine(const absl::Status& status) {
  return absl::StrCat("error: ", absl::StatusCodeToString(status.code()), ": ", status.message(),
                      "\n");
}

}  // namespace ringattn
