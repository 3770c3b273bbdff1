// Fuzz target over what an unauthenticated client controls before any computing: the bytes of
// a unary Attend/AttendBackward request through validation, and a stream of messages through
// the chunk protocol with the header's checks. The input's first byte picks the path; the rest
// is protobuf wire data. Contract: never crash, never hang; whatever validation accepts has
// tensors of exactly the bytes their shapes imply, or all in shared memory by reference.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "google/protobuf/stubs/logging.h"
#include "proto/chunk_codec.h"
#include "proto/compute_rpcs.h"
#include "ringattn/v1/attention.pb.h"
#include "server/attend_request.h"

namespace {

using ringattn::AttendLimits;

// Small limits so that accepted shapes stay cheap to check.
AttendLimits Limits() {
  AttendLimits l;
  l.max_request_bytes = int64_t{1} << 24;
  return l;
}

void Require(bool ok) {
  if (!ok) std::abort();
}

void Unary(const uint8_t* data, size_t size, bool backward) {
  if (backward) {
    ringattn::v1::AttendBackwardRequest r;
    if (!r.ParseFromArray(data, static_cast<int>(size))) return;
    absl::StatusOr<ringattn::ValidatedAttend> v = ringattn::ValidateAttendBackwardRequest(r, Limits());
    if (!v.ok()) return;
    Require(v->shape.seqlen_q == v->shape.seqlen_k && v->shape.heads % v->shape.heads_k == 0);
    return;
  }
  ringattn::v1::AttendRequest r;
  if (!r.ParseFromArray(data, static_cast<int>(size))) return;
  absl::StatusOr<ringattn::ValidatedAttend> v = ringattn::ValidateAttendRequest(r, Limits());
  if (!v.ok()) return;
  const ringattn::AttentionShape& s = v->shape;
  Require(s.heads_k > 0 && s.heads % s.heads_k == 0);
  for (const char* name : {"q", "k", "v"}) {
    const ringattn::v1::Tensor& t = ringattn::TensorField(r, name);
    const size_t want = name[0] == 'q' ? s.q_bytes() : s.kv_bytes();
    Require(t.has_shm() ? t.data().empty() && static_cast<size_t>(t.shm().byte_size()) == want
                        : t.data().size() == want);
  }
  // Window sides come out within the sequence (or unbounded).
  Require(v->options.window_size.first <= s.seqlen_q && v->options.window_size.second <= s.seqlen_q);
}

// Messages as length-prefixed protobufs (one length byte each), fed to the stream assembler.
void Stream(const uint8_t* data, size_t size) {
  ringattn::StreamAssembler<ringattn::v1::AttendStreamRequest> receiver(
      "AttendStream request", absl::StatusCode::kInvalidArgument);
  size_t at = 0;
  while (at < size) {
    const size_t n = std::min<size_t>(data[at], size - at - 1);
    ringattn::v1::AttendStreamRequest m;
    if (!m.ParseFromArray(data + at + 1, static_cast<int>(n))) return;
    at += 1 + n;
    absl::Status s = receiver.Add(&m, [&](ringattn::v1::AttendRequest* h) -> absl::Status {
      absl::StatusOr<ringattn::ValidatedAttend> v = ringattn::ValidateAttendHeader(*h, Limits());
      if (!v.ok()) return v.status();
      for (const ringattn::ComputeTensor& in : ringattn::AttendRpc().inputs) {
        absl::Status e = receiver.chunks().Expect(in.which, in.name,
                                                  ringattn::MutableTensorField(h, in.name),
                                                  ringattn::BytesOf(in.kind, v->shape));
        if (!e.ok()) return e;
      }
      return absl::OkStatus();
    });
    if (!s.ok()) return;
  }
  if (receiver.Finish().ok()) {
    // Complete: every tensor has exactly its bytes.
    absl::StatusOr<ringattn::ValidatedAttend> v =
        ringattn::ValidateAttendRequest(*receiver.header(), Limits());
    Require(v.ok());
  }
}

// Protobuf logs every malformed string field; a fuzzer feeds it thousands.
const bool kQuietProtobuf = [] {
  google::protobuf::SetLogHandler(nullptr);
  return true;
}();

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  switch (data[0] % 3) {
    case 0: Unary(data + 1, size - 1, false); break;
    case 1: Unary(data + 1, size - 1, true); break;
    default: Stream(data + 1, size - 1); break;
  }
  return 0;
}
