// NumPy .npy files: the inputs and outputs of `ringattn attend`.
//
// Supported: format versions 1.0, 2.0 and 3.0; C order; little-endian float32 ('<f4') and
// float16 ('<f2'). NumPy has no bfloat16 type, so bf16 tensors are not read or written here:
// bf16 inputs are made by reading fp32 files and converting them (`ringattn attend --dtype
// bf16`), and bf16 outputs are written as fp32. Every error names the file and what was wrong.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype.h"

namespace ringattn {

struct NpyArray {
  DType dtype = DType::kF32;   // kF32 or kF16
  std::vector<int64_t> shape;  // empty for a scalar
  std::string data;            // little-endian elements in C order

  int64_t num_elements() const;
};

// Parses the bytes of a .npy file; `name` is the file's name in error messages.
absl::StatusOr<NpyArray> ParseNpy(const std::string& bytes, const std::string& name);

// Reads a .npy file: NOT_FOUND when it does not exist, INVALID_ARGUMENT when it is not a
// supported .npy file.
absl::StatusOr<NpyArray> ReadNpy(const std::string& path);

// The bytes of a .npy file holding `array`. `major_version` 1 or 2 forces that format version;
// 0 picks 1.0 unless the header needs 2.0's longer length field. INVALID_ARGUMENT for a bf16
// array, a data size that does not match the shape, or an unknown version.
absl::StatusOr<std::string> EncodeNpy(const NpyArray& array, int major_version = 0);

// Writes EncodeNpy(array) to `path`.
absl::Status WriteNpy(const std::string& path, const NpyArray& array, int major_version = 0);

}  // namespace ringattn
