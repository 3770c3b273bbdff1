#include "ring/transport/communicator.h"

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace ringattn {
namespace {

absl::Status CheckOp(int rank, int world, int peer, size_t bytes, const void* data,
                     const char* kind, size_t i) {
  if (peer < 0 || peer >= world) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", rank, ": ", kind, " ", i, " names peer ", peer, ", outside [0, ", world, ")"));
  }
  if (bytes > 0 && data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, ": ", kind, " ", i, " of ", bytes,
                                                   " bytes to/from rank ", peer,
                                                   " has a null buffer"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckBatch(int rank, int world, absl::Span<const SendOp> sends,
                        absl::Span<const RecvOp> recvs) {
  for (size_t i = 0; i < sends.size(); ++i) {
    RA_RETURN_IF_ERROR(
        CheckOp(rank, world, sends[i].peer, sends[i].bytes, sends[i].data, "send", i));
  }
  for (size_t i = 0; i < recvs.size(); ++i) {
    RA_RETURN_IF_ERROR(
        CheckOp(rank, world, recvs[i].peer, recvs[i].bytes, recvs[i].data, "receive", i));
  }
  return absl::OkStatus();
}

}  // namespace ringattn
