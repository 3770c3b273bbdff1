// TMA descriptors (CUtensorMap) of the flash kernels' q/k/v operands, encoded on the host
// through the driver's cuTensorMapEncodeTiled (found at run time: nothing links libcuda).
// Plain C++.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "absl/status/statusor.h"
#include "kernels/dtype.h"

namespace ringattn {

// One operand as the kernels see it: rows of head_dim 16-bit elements, addressed (batch, head,
// row) by element strides; pointers 16-byte aligned and strides multiples of 8 elements
// (CheckFastKernelRows), so that every stride is a multiple of TMA's 16 bytes.
struct RowsOperand {
  const void* base = nullptr;
  DType dtype = DType::kBF16;  // bf16 or fp16
  int64_t head_dim = 0;
  int64_t rows = 0;  // seqlen
  int64_t heads = 0;
  int64_t batch = 0;
  int64_t row_stride = 0;
  int64_t head_stride = 0;
  int64_t batch_stride = 0;
};

// A 4-d map (head_dim innermost, then row, head, batch) whose box is 64 elements of `box_rows`
// rows, written to shared memory in the 128-byte swizzle; elements past any dimension read as
// zero. An empty operand (no rows or a null base) gives a map of one row that the kernels never
// read. FailedPrecondition when the driver lacks the entry point, InvalidArgument naming
// `name` when it refuses the operand's shape or strides.
absl::StatusOr<CUtensorMap> EncodeRowsTensorMap(const char* name, const RowsOperand& operand,
                                                int box_rows);

}  // namespace ringattn
