// The chunked half of the streaming RPCs (AttendStream, AttendBackwardStream) on the
// coordinator's side: after the header, each tensor's bytes travel as TensorChunk messages, the
// tensors in a fixed order and each tensor's chunks at increasing offsets. One template for
// both calls' message types.
#pragma once

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

// One tensor a stream carries in chunks.
struct StreamedTensor {
  v1::TensorChunk::Which which;
  const char* name;      // for errors: "q", "dout", ...
  std::string* data;     // receiving: appended to; sending: read from
  int64_t expected = 0;  // receiving: the bytes its header's shape needs
};

// Appends the chunks that follow a stream's header to their tensors (`StreamRequest` has a
// `chunk` and a `header` part). INVALID_ARGUMENT for a second header, a chunk of a tensor not in
// `tensors`, an offset other than the bytes received so far, or more bytes than expected; a
// short tensor is left to the caller's full validation.
template <typename StreamRequest, typename Stream>
absl::Status ReceiveChunks(Stream* stream, absl::Span<const StreamedTensor> tensors) {
  StreamRequest msg;
  while (stream->Read(&msg)) {
    if (!msg.has_chunk()) return absl::InvalidArgumentError("only one header is allowed");
    const v1::TensorChunk& c = msg.chunk();
    const StreamedTensor* t = nullptr;
    for (const StreamedTensor& candidate : tensors) {
      if (candidate.which == c.tensor()) t = &candidate;
    }
    if (t == nullptr) {
      std::string names;
      for (const StreamedTensor& candidate : tensors) {
        absl::StrAppend(&names, names.empty() ? "" : ", ", candidate.name);
      }
      return absl::InvalidArgumentError(absl::StrCat("chunk.tensor ",
                                                     v1::TensorChunk::Which_Name(c.tensor()),
                                                     " is not one this call takes (", names, ")"));
    }
    if (c.offset() != static_cast<int64_t>(t->data->size())) {
      return absl::InvalidArgumentError(absl::StrCat("chunk.offset ", c.offset(), " for ", t->name,
                                                     " must be ", t->data->size(),
                                                     " (chunks in order)"));
    }
    if (static_cast<int64_t>(t->data->size() + c.data().size()) > t->expected) {
      return absl::InvalidArgumentError(
          absl::StrCat(t->name, " chunks exceed the ", t->expected, " bytes its shape needs"));
    }
    t->data->append(c.data());
  }
  return absl::OkStatus();
}

// Writes each tensor's bytes as chunks of at most chunk_bytes (`StreamResponse` has a `chunk`
// part), in `tensors`' order. CANCELLED when the client went away.
template <typename StreamResponse, typename Stream>
absl::Status SendChunks(Stream* stream, absl::Span<const StreamedTensor> tensors,
                        int64_t chunk_bytes) {
  const int64_t chunk = std::max<int64_t>(1, chunk_bytes);
  for (const StreamedTensor& t : tensors) {
    const std::string& bytes = *t.data;
    for (int64_t off = 0; off < static_cast<int64_t>(bytes.size()); off += chunk) {
      StreamResponse m;
      m.mutable_chunk()->set_tensor(t.which);
      m.mutable_chunk()->set_offset(off);
      m.mutable_chunk()->set_data(bytes.substr(off, chunk));
      if (!stream->Write(m)) return absl::CancelledError("client went away");
    }
  }
  return absl::OkStatus();
}

}  // namespace ringattn
