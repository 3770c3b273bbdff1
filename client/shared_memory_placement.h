// Where a compute request's tensors lie in one system shared-memory region, and the moves that
// put a request's inputs there and take its outputs back.
//
// A placement of an Attend or AttendBackward request has one slot per input the request carries
// (q, k, v; AttendBackward also out, dout, lse) and one per output it asks for (Attend: out, and
// lse when return_lse; AttendBackward: dq, dk, dv), in the order of the RPC's table
// (proto/compute_rpcs.h), inputs first. Each slot starts at a multiple of
// kSharedMemoryAlignment after the previous one ends, so no two overlap, and is exactly the
// tensor's bytes as its dtype and shape imply (outputs: as the request's q and k imply).
//
// Place makes the request to send: its inputs copied into their slots and referred to there
// (Tensor.shm, no data), its outputs named in output_shm. After the call Collect copies the
// outputs from their slots into the response's tensors, so that the response reads as one that
// carried them. Pure client-side: no service involved.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "base/shared_memory.h"
#include "proto/compute_rpcs.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

// Slot alignment: 256 bytes, as cudaMalloc's, so that a tensor in a CUDA region can be used in
// place by the kernels.
inline constexpr int64_t kSharedMemoryAlignment = 256;

// Runs copies between a request's tensors and a region (host memory by default; device memory
// for a CUDA region); `what` names them in errors.
using RegionCopier =
    std::function<absl::Status(const std::vector<CopySpan>& copies, absl::string_view what)>;

class SharedMemoryPlacement {
 public:
  struct Slot {
    std::string name;       // the tensor's name in the RPC's table: "q", "out", "lse", "dq", ...
    int64_t offset = 0;     // from the region's start, a multiple of kSharedMemoryAlignment
    int64_t byte_size = 0;  // the tensor's bytes
  };

  // INVALID_ARGUMENT when an input's data does not have the bytes its dtype and shape imply, or
  // q and k do not give the outputs' sizes (a 4-D shape and a known dtype).
  static absl::StatusOr<SharedMemoryPlacement> Of(const v1::AttendRequest& request);
  static absl::StatusOr<SharedMemoryPlacement> Of(const v1::AttendBackwardRequest& request);

  const std::vector<Slot>& inputs() const { return inputs_; }
  const std::vector<Slot>& outputs() const { return outputs_; }
  // Bytes the region needs: the last slot's end rounded up to the alignment (at least one
  // alignment unit).
  int64_t bytes() const { return bytes_; }

  // The request to send in place of `request` (the one the placement was made of), whose
  // tensors go through the bytes `region_bytes`, registered as `region`: copies each input's
  // data into its slot and returns `request` without tensor data, each input's shm referring to
  // its slot and output_shm to the outputs' slots. INVALID_ARGUMENT when the region is smaller
  // than bytes() or the request's inputs are not the placement's; FAILED_PRECONDITION when the
  // region's object shrinks under the copy (base/shared_memory.h GuardedAccess).
  // `copy` (null: ParallelCopy, for host memory) moves the bytes.
  absl::StatusOr<v1::AttendRequest> Place(const v1::AttendRequest& request,
                                          const std::string& region, absl::Span<char> region_bytes,
                                          const RegionCopier& copy = nullptr) const;
  absl::StatusOr<v1::AttendBackwardRequest> Place(const v1::AttendBackwardRequest& request,
                                                  const std::string& region,
                                                  absl::Span<char> region_bytes,
                                                  const RegionCopier& copy = nullptr) const;

  // Fills each output of `response` (the answer to the placed request: the outputs' dtypes and
  // shapes, no data) with its slot's bytes. INTERNAL when an output's dtype and shape imply
  // another size than its slot or it carries data; INVALID_ARGUMENT when the region is smaller
  // than bytes(); FAILED_PRECONDITION when it shrinks under the copy.
  absl::Status Collect(absl::Span<const char> region_bytes, v1::AttendResponse* response,
                       const RegionCopier& copy = nullptr) const;
  absl::Status Collect(absl::Span<const char> region_bytes, v1::AttendBackwardResponse* response,
                       const RegionCopier& copy = nullptr) const;

 private:
  static absl::StatusOr<SharedMemoryPlacement> Make(const ComputeRpc& rpc,
                                                    const google::protobuf::Message& request);
  // Checks `request`'s inputs against the slots and the region's size; copies the inputs in and
  // fills `sent`'s refs (not output_shm, a field of each request type).
  absl::Status PlaceInputs(const google::protobuf::Message& request, const std::string& region,
                           absl::Span<char> region_bytes, const RegionCopier& copy,
                           google::protobuf::Message* sent) const;
  absl::Status CollectOutputs(absl::Span<const char> region_bytes, const RegionCopier& copy,
                              google::protobuf::Message* response) const;
  absl::Status CheckRegionSize(int64_t size) const;
  template <typename Request>
  absl::StatusOr<Request> PlaceAs(const Request& request, const std::string& region,
                                  absl::Span<char> region_bytes, const RegionCopier& copy) const;

  const ComputeRpc* rpc_ = nullptr;
  std::vector<Slot> inputs_;
  std::vector<Slot> outputs_;
  int64_t bytes_ = 0;
};

}  // namespace ringattn
