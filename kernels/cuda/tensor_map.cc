#include "kernels/cuda/tensor_map.h"

#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ringattn {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 EncodeTiledEntryPoint() {
  static const PFN_cuTensorMapEncodeTiled_v12000 entry = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // not sticky; clear it for the caller's next check
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return entry;
}

}  // namespace

absl::StatusOr<CUtensorMap> EncodeRowsTensorMap(const char* name, const RowsOperand& operand,
                                                int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = EncodeTiledEntryPoint();
  if (encode == nullptr) {
    return absl::FailedPreconditionError("cuda: the driver has no cuTensorMapEncodeTiled");
  }
  // An empty operand still needs a valid map: one row of zeros' worth, never read.
  alignas(16) static const uint64_t kDummy[64] = {};  // 512 bytes: a row of d <= 256
  const bool empty = operand.base == nullptr || operand.rows == 0;
  const int64_t elem = DTypeSize(operand.dtype);
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(operand.head_dim),
                        static_cast<cuuint64_t>(empty ? 1 : operand.rows),
                        static_cast<cuuint64_t>(empty ? 1 : operand.heads),
                        static_cast<cuuint64_t>(empty ? 1 : operand.batch)};
  // Strides of dims 1..3 in bytes; a dimension of size 1 (every one of an empty operand's) is
  // never stepped, so its stride only has to be one TMA accepts.
  auto stride = [&](int64_t s, cuuint64_t dim) {
    return static_cast<cuuint64_t>(dim == 1 ? operand.head_dim * elem : s * elem);
  };
  cuuint64_t strides[3] = {stride(operand.row_stride, dims[1]),
                           stride(operand.head_stride, dims[2]),
                           stride(operand.batch_stride, dims[3])};
  cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type = operand.dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  void* base = empty ? const_cast<uint64_t*>(kDummy) : const_cast<void*>(operand.base);
  CUtensorMap map;
  const CUresult r = encode(&map, type, 4, base, dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda: ", name, " has a layout the tensor copy engine refuses (CUresult ", r,
                     "; strides in elements: row ", operand.row_stride, ", head ",
                     operand.head_stride, ", batch ", operand.batch_stride, ")"));
  }
  return map;
}

}  // namespace ringattn
