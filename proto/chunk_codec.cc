#include "proto/chunk_codec.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "google/protobuf/field_mask.pb.h"
#include "google/protobuf/util/field_mask_util.h"

namespace ringattn {

ChunkAssembler::ChunkAssembler(std::string what, absl::StatusCode code)
    : what_(std::move(what)), code_(code) {}

absl::Status ChunkAssembler::Error(std::string_view message) const {
  return absl::Status(code_, absl::StrCat(what_, ": ", std::string(message)));
}

namespace {
constexpr int64_t kUpfrontBytes = int64_t{64} << 20;
}  // namespace

absl::Status ChunkAssembler::CheckNoData(std::string_view name, const v1::Tensor& tensor) const {
  if (tensor.data().empty()) return absl::OkStatus();
  return Error(absl::StrCat("header carries tensor data: ", tensor.data().size(), " bytes of ",
                            std::string(name), "; every tensor's bytes come as chunks"));
}

absl::Status ChunkAssembler::Expect(v1::TensorChunk::Which which, std::string_view name,
                                    v1::Tensor* tensor, int64_t bytes) {
  RA_RETURN_IF_ERROR(CheckNoData(name, *tensor));
  // Memory follows the data: a header alone cannot make the server hold what it declares
  // (up to max_request_bytes); past the first 64 MiB the buffer grows as chunks arrive.
  tensor->mutable_data()->reserve(static_cast<size_t>(std::min<int64_t>(bytes, kUpfrontBytes)));
  parts_.push_back({which, std::string(name), tensor->mutable_data(), {}, bytes});
  return absl::OkStatus();
}

absl::Status ChunkAssembler::ExpectInto(v1::TensorChunk::Which which, std::string_view name,
                                        const v1::Tensor& tensor, char* dst, int64_t bytes) {
  return ExpectInto(which, name, tensor, StridedRows{dst, 1, bytes, bytes});
}

absl::Status ChunkAssembler::ExpectInto(v1::TensorChunk::Which which, std::string_view name,
                                        const v1::Tensor& tensor, const StridedRows& dst) {
  RA_RETURN_IF_ERROR(CheckNoData(name, tensor));
  parts_.push_back({which, std::string(name), nullptr, dst, dst.bytes()});
  return absl::OkStatus();
}

void StridedRows::Gather(int64_t offset, int64_t n, char* out) const {
  while (n > 0) {
    const int64_t r = offset / row_bytes, in_row = offset % row_bytes;
    const int64_t take = std::min(n, row_bytes - in_row);
    std::memcpy(out, base + r * stride + in_row, static_cast<size_t>(take));
    out += take;
    offset += take;
    n -= take;
  }
}

void StridedRows::Scatter(int64_t offset, int64_t n, const char* in) const {
  while (n > 0) {
    const int64_t r = offset / row_bytes, in_row = offset % row_bytes;
    const int64_t take = std::min(n, row_bytes - in_row);
    std::memcpy(base + r * stride + in_row, in, static_cast<size_t>(take));
    in += take;
    offset += take;
    n -= take;
  }
}

absl::Status ChunkAssembler::AddChunk(const v1::TensorChunk& chunk) {
  auto part = std::find_if(parts_.begin(), parts_.end(),
                           [&](const Part& p) { return p.which == chunk.tensor(); });
  if (part == parts_.end()) {
    std::string names;
    for (const Part& p : parts_) absl::StrAppend(&names, names.empty() ? "" : ", ", p.name);
    return Error(absl::StrCat("chunk.tensor ", v1::TensorChunk::Which_Name(chunk.tensor()),
                              " is not one this call takes (", names, ")"));
  }
  const int64_t have = part->have;
  if (chunk.offset() != have) {
    return Error(absl::StrCat(part->name, " chunk at offset ", chunk.offset(), ", expected ", have,
                              " (chunks contiguous and in order)"));
  }
  const int64_t n = static_cast<int64_t>(chunk.data().size());
  if (have + n > part->bytes) {
    return Error(absl::StrCat(part->name, " chunks exceed the ", part->bytes,
                              " bytes its shape needs (chunk at offset ", chunk.offset(), " of ", n,
                              " bytes)"));
  }
  if (part->data != nullptr) {
    part->data->append(chunk.data());
  } else if (n > 0) {
    part->dst.Scatter(have, n, chunk.data().data());
  }
  part->have += n;
  received_ += n;
  return absl::OkStatus();
}

absl::Status ChunkAssembler::CheckComplete() const {
  for (const Part& p : parts_) {
    if (p.have != p.bytes) {
      return Error(absl::StrCat("incomplete: ", p.name, " has ", p.have, " of the ",
                                p.bytes, " bytes its shape needs"));
    }
  }
  return absl::OkStatus();
}

int64_t ChunkAssembler::expected_bytes() const {
  int64_t sum = 0;
  for (const Part& p : parts_) sum += p.bytes;
  return sum;
}

ChunkCursor::ChunkCursor(std::vector<Source> tensors, int64_t chunk_bytes)
    : tensors_(std::move(tensors)), chunk_bytes_(std::max<int64_t>(1, chunk_bytes)) {}

bool ChunkCursor::Next(v1::TensorChunk* chunk) {
  auto size = [](const Source& t) {
    return t.strided.rows > 0 ? t.strided.bytes() : static_cast<int64_t>(t.data.size());
  };
  while (tensor_ < tensors_.size() && offset_ >= size(tensors_[tensor_])) {
    ++tensor_;
    offset_ = 0;
  }
  if (tensor_ == tensors_.size()) return false;
  const Source& t = tensors_[tensor_];
  const int64_t n = std::min(chunk_bytes_, size(t) - offset_);
  chunk->set_tensor(t.which);
  chunk->set_offset(offset_);
  if (t.strided.rows > 0) {
    std::string* data = chunk->mutable_data();
    data->resize(static_cast<size_t>(n));
    t.strided.Gather(offset_, n, data->data());
  } else {
    chunk->set_data(t.data.data() + offset_, static_cast<size_t>(n));
  }
  offset_ += n;
  return true;
}

int64_t ChunkCursor::total_bytes() const {
  int64_t sum = 0;
  for (const Source& t : tensors_) {
    sum += t.strided.rows > 0 ? t.strided.bytes() : static_cast<int64_t>(t.data.size());
  }
  return sum;
}

void CopyWithoutTensorData(const google::protobuf::Message& from, google::protobuf::Message* to) {
  const google::protobuf::Descriptor* d = from.GetDescriptor();
  const google::protobuf::Reflection* r = from.GetReflection();
  google::protobuf::FieldMask others;
  for (int i = 0; i < d->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* f = d->field(i);
    if (f->is_repeated() || f->message_type() != v1::Tensor::descriptor()) {
      others.add_paths(f->name());
      continue;
    }
    if (!r->HasField(from, f)) continue;
    const auto& tensor = static_cast<const v1::Tensor&>(r->GetMessage(from, f));
    auto* copy = static_cast<v1::Tensor*>(to->GetReflection()->MutableMessage(to, f));
    copy->set_dtype(tensor.dtype());
    *copy->mutable_shape() = tensor.shape();
  }
  google::protobuf::util::FieldMaskUtil::MergeMessageTo(
      from, others, google::protobuf::util::FieldMaskUtil::MergeOptions(), to);
}

}  // namespace ringattn
