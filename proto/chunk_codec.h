// The chunk protocol of the streaming RPCs (AttendStream, AttendBackwardStream), for both ends.
// A stream is a header message (the unary request or response whose tensors carry dtype and
// shape but no data), then each tensor's bytes as TensorChunk messages: tensor by tensor, each
// tensor's chunks contiguous from offset 0.
//
// Receiving (StreamAssembler): the header first, then chunks of the tensors the header
// announced (Expect), until each has the bytes its shape needs. Every breach is an error of the
// code the receiver gives (the coordinator: INVALID_ARGUMENT; the client: INTERNAL), naming the
// tensor and the offending offset or size: no header, a second header, data in the header, a
// chunk of a tensor the call does not take, an out-of-order offset, too many bytes, a short
// tensor. Sending: HeaderOf makes the header, ChunkCursor cuts the tensors into chunks.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "google/protobuf/message.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

// A tensor's bytes as `rows` rows of `row_bytes`, row r at base + r * stride (stride >=
// row_bytes): e.g. some heads of every (batch, position) row of a larger tensor. Its bytes are
// rows * row_bytes, in row order.
struct StridedRows {
  char* base = nullptr;
  int64_t rows = 0;
  int64_t row_bytes = 0;
  int64_t stride = 0;

  int64_t bytes() const { return rows * row_bytes; }
  // Copies bytes [offset, offset + n) of the view to `out` (Gather) or from `in` (Scatter).
  void Gather(int64_t offset, int64_t n, char* out) const;
  void Scatter(int64_t offset, int64_t n, const char* in) const;
};

// Assembles the chunks that follow a header into the tensors it announced.
class ChunkAssembler {
 public:
  // `what` names the stream in errors ("AttendStream request"); `code` is a breach's code.
  ChunkAssembler(std::string what, absl::StatusCode code);

  // The header announces `tensor`, whose `bytes` follow as chunks of `which`, appended to
  // tensor->data(). A header whose tensor already carries data is a breach.
  absl::Status Expect(v1::TensorChunk::Which which, std::string_view name, v1::Tensor* tensor,
                      int64_t bytes);
  // The same, the chunks landing in `dst` instead (memory the caller owns, which must outlive
  // the assembler); `tensor` gets no data.
  absl::Status ExpectInto(v1::TensorChunk::Which which, std::string_view name,
                          const v1::Tensor& tensor, char* dst, int64_t bytes);
  absl::Status ExpectInto(v1::TensorChunk::Which which, std::string_view name,
                          const v1::Tensor& tensor, const StridedRows& dst);
  // Appends one chunk to its tensor.
  absl::Status AddChunk(const v1::TensorChunk& chunk);
  // OK when every announced tensor has all its bytes.
  absl::Status CheckComplete() const;

  int64_t expected_bytes() const;
  int64_t received_bytes() const { return received_; }
  absl::Status Error(std::string_view message) const;  // `code` with "<what>: message"

 private:
  struct Part {
    v1::TensorChunk::Which which;
    std::string name;
    std::string* data;  // appended to; null: written into dst
    StridedRows dst;
    int64_t bytes;
    int64_t have = 0;
  };
  absl::Status CheckNoData(std::string_view name, const v1::Tensor& tensor) const;
  const std::string what_;
  const absl::StatusCode code_;
  std::vector<Part> parts_;
  int64_t received_ = 0;
};

// The receiving end of one stream of `StreamMessage` (a oneof of `header` and `chunk`).
template <typename StreamMessage>
class StreamAssembler {
 public:
  using Header = std::remove_cvref_t<decltype(std::declval<StreamMessage&>().header())>;
  // Called once with the header (moved into header()): checks it and Expects its tensors.
  using OnHeader = absl::FunctionRef<absl::Status(Header*)>;

  StreamAssembler(std::string what, absl::StatusCode code) : chunks_(std::move(what), code) {}

  // Takes the stream's next message.
  absl::Status Add(StreamMessage* message, OnHeader on_header) {
    if (message->has_header()) {
      if (has_header_) return chunks_.Error("a second header; only one header is allowed");
      header_ = std::move(*message->mutable_header());
      has_header_ = true;
      return on_header(&header_);
    }
    if (!message->has_chunk()) return chunks_.Error("a message with neither header nor chunk");
    if (!has_header_) return NoHeader("got a chunk before the header");
    return chunks_.AddChunk(message->chunk());
  }

  // After the last message: OK when the header came and every tensor is complete.
  absl::Status Finish() const {
    if (!has_header_) return NoHeader("got no message");
    return chunks_.CheckComplete();
  }

  bool has_header() const { return has_header_; }
  Header* header() { return &header_; }
  ChunkAssembler& chunks() { return chunks_; }
  const ChunkAssembler& chunks() const { return chunks_; }

 private:
  absl::Status NoHeader(std::string_view got) const {
    return chunks_.Error(std::string("must start with a header message; ") + std::string(got));
  }

  ChunkAssembler chunks_;
  bool has_header_ = false;
  Header header_;
};

// The chunks of some tensors, tensor by tensor, each at most `chunk_bytes` long. An empty
// tensor has no chunks. The tensors' bytes must outlive the cursor.
class ChunkCursor {
 public:
  struct Source {
    v1::TensorChunk::Which which;
    std::string_view data;
    // When rows > 0, the tensor is this view instead of `data` (base const in fact).
    StridedRows strided = {};
  };
  ChunkCursor(std::vector<Source> tensors, int64_t chunk_bytes);

  // Fills the next chunk; false after the last.
  bool Next(v1::TensorChunk* chunk);
  int64_t total_bytes() const;

 private:
  std::vector<Source> tensors_;
  int64_t chunk_bytes_;
  size_t tensor_ = 0;
  int64_t offset_ = 0;
};

// `from` without tensor data, into `to` (empty): every v1::Tensor field keeps its dtype and
// shape, absent ones stay absent, every other field is copied. Copies no tensor bytes.
void CopyWithoutTensorData(const google::protobuf::Message& from, google::protobuf::Message* to);

// A stream's header for `message`.
template <typename M>
M HeaderOf(const M& message) {
  M header;
  CopyWithoutTensorData(message, &header);
  return header;
}

}  // namespace ringattn
