#include "client/shared_memory_placement.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/shared_memory.h"
#include "base/status_macros.h"
#include "client/attention_client.h"
#include "proto/chunk_codec.h"

namespace ringattn {
namespace {

int64_t AlignUp(int64_t bytes) {
  return (bytes + kSharedMemoryAlignment - 1) / kSharedMemoryAlignment * kSharedMemoryAlignment;
}

void SetRef(const std::string& region, const SharedMemoryPlacement::Slot& slot,
            v1::SharedMemoryRef* ref) {
  ref->set_region(region);
  ref->set_offset(slot.offset);
  ref->set_byte_size(slot.byte_size);
}

// A copy between a tensor's data and its slot: {to, from, bytes}.
using Copy = CopySpan;

// Runs the copies with `copy`, or on several threads with a shrinking region (SIGBUS) turned
// into FAILED_PRECONDITION.
absl::Status RunCopies(const RegionCopier& copy, const char* what,
                       const std::vector<Copy>& copies) {
  if (copy) return copy(copies, what);
  return ParallelCopy(copies, what);
}

}  // namespace

absl::StatusOr<SharedMemoryPlacement> SharedMemoryPlacement::Make(
    const ComputeRpc& rpc, const google::protobuf::Message& request) {
  SharedMemoryPlacement p;
  p.rpc_ = &rpc;
  int64_t end = 0;
  const auto add = [&end](std::vector<Slot>* slots, const char* name, int64_t bytes) {
    slots->push_back({name, end, bytes});
    end = AlignUp(end + bytes);
  };
  for (const ComputeTensor& in : rpc.inputs) {
    if (!HasTensorField(request, in.name)) continue;
    const v1::Tensor& t = TensorField(request, in.name);
    const int64_t expected = ExpectedTensorBytes(t);
    if (expected < 0 || static_cast<int64_t>(t.data().size()) != expected) {
      return absl::InvalidArgumentError(absl::StrCat(in.name, " has ", t.data().size(),
                                                     " bytes of data; its shape ",
                                                     DescribeTensor(t), " needs ", expected));
    }
    add(&p.inputs_, in.name, expected);
  }
  for (const ComputeTensor& out : rpc.outputs) {
    if (!Wants(request, out)) continue;
    const int64_t bytes = ExpectedOutputBytes(out, request);
    if (bytes < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot size ", out.name, " in shared memory: q ",
                       DescribeTensor(TensorField(request, "q")), " and k ",
                       DescribeTensor(TensorField(request, "k")),
                       " must be 4-D [batch, seq, heads, head_dim] of a known dtype"));
    }
    add(&p.outputs_, out.name, bytes);
  }
  p.bytes_ = std::max(end, kSharedMemoryAlignment);
  return p;
}

absl::StatusOr<SharedMemoryPlacement> SharedMemoryPlacement::Of(const v1::AttendRequest& request) {
  return Make(AttendRpc(), request);
}

absl::StatusOr<SharedMemoryPlacement> SharedMemoryPlacement::Of(
    const v1::AttendBackwardRequest& request) {
  return Make(AttendBackwardRpc(), request);
}

absl::Status SharedMemoryPlacement::CheckRegionSize(int64_t size) const {
  if (size < bytes_) {
    return absl::InvalidArgumentError(absl::StrCat("the shared-memory region has ", size,
                                                   " bytes; the request's tensors need ", bytes_));
  }
  return absl::OkStatus();
}

absl::Status SharedMemoryPlacement::PlaceInputs(const google::protobuf::Message& request,
                                                const std::string& region,
                                                absl::Span<char> region_bytes,
                                                const RegionCopier& copy,
                                                google::protobuf::Message* sent) const {
  RA_RETURN_IF_ERROR(CheckRegionSize(static_cast<int64_t>(region_bytes.size())));
  std::vector<Copy> copies;
  size_t next = 0;  // the slot of the next slotted input in the table's order
  for (const ComputeTensor& in : rpc_->inputs) {
    const bool slotted = next < inputs_.size() && inputs_[next].name == in.name;
    const bool present = HasTensorField(request, in.name);
    if (!slotted && !present) continue;
    const v1::Tensor& t = TensorField(request, in.name);
    if (!slotted || !present || static_cast<int64_t>(t.data().size()) != inputs_[next].byte_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("request ", in.name,
                       present ? absl::StrCat(" has ", t.data().size(), " bytes") : " is absent",
                       slotted ? absl::StrCat("; its slot has ", inputs_[next].byte_size, " bytes")
                               : "; the placement has no slot for it"));
    }
    const Slot& slot = inputs_[next++];
    copies.push_back({region_bytes.data() + slot.offset, t.data().data(), t.data().size()});
    SetRef(region, slot, MutableTensorField(sent, slot.name)->mutable_shm());
  }
  return RunCopies(copy, "copying the inputs into shared memory", copies);
}

absl::Status SharedMemoryPlacement::CollectOutputs(absl::Span<const char> region_bytes,
                                                   const RegionCopier& copy,
                                                   google::protobuf::Message* response) const {
  RA_RETURN_IF_ERROR(CheckRegionSize(static_cast<int64_t>(region_bytes.size())));
  std::vector<Copy> copies;
  for (const Slot& slot : outputs_) {
    v1::Tensor* t = MutableTensorField(response, slot.name);
    if (!t->data().empty()) {
      return absl::InternalError(absl::StrCat("response ", slot.name, " carries ", t->data().size(),
                                              " bytes; the request placed it in shared memory"));
    }
    if (ExpectedTensorBytes(*t) != slot.byte_size) {
      return absl::InternalError(absl::StrCat(
          "response ", slot.name, " is ", DescribeTensor(*t), " (", ExpectedTensorBytes(*t),
          " bytes); its shared-memory slot has ", slot.byte_size));
    }
    t->mutable_data()->resize(static_cast<size_t>(slot.byte_size));
    copies.push_back({t->mutable_data()->data(), region_bytes.data() + slot.offset,
                      static_cast<size_t>(slot.byte_size)});
  }
  return RunCopies(copy, "copying the outputs out of shared memory", copies);
}

template <typename Request>
absl::StatusOr<Request> SharedMemoryPlacement::PlaceAs(const Request& request,
                                                       const std::string& region,
                                                       absl::Span<char> region_bytes,
                                                       const RegionCopier& copy) const {
  Request sent = HeaderOf(request);
  RA_RETURN_IF_ERROR(PlaceInputs(request, region, region_bytes, copy, &sent));
  sent.clear_output_shm();
  for (const Slot& slot : outputs_) SetRef(region, slot, &(*sent.mutable_output_shm())[slot.name]);
  return sent;
}

absl::StatusOr<v1::AttendRequest> SharedMemoryPlacement::Place(
    const v1::AttendRequest& request, const std::string& region, absl::Span<char> region_bytes,
    const RegionCopier& copy) const {
  return PlaceAs(request, region, region_bytes, copy);
}

absl::StatusOr<v1::AttendBackwardRequest> SharedMemoryPlacement::Place(
    const v1::AttendBackwardRequest& request, const std::string& region,
    absl::Span<char> region_bytes, const RegionCopier& copy) const {
  return PlaceAs(request, region, region_bytes, copy);
}

absl::Status SharedMemoryPlacement::Collect(absl::Span<const char> region_bytes,
                                            v1::AttendResponse* response,
                                            const RegionCopier& copy) const {
  return CollectOutputs(region_bytes, copy, response);
}

absl::Status SharedMemoryPlacement::Collect(absl::Span<const char> region_bytes,
                                            v1::AttendBackwardResponse* response,
                                            const RegionCopier& copy) const {
  return CollectOutputs(region_bytes, copy, response);
}

}  // namespace ringattn
