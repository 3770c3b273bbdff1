#include "client/head_split.h"

#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "proto/chunk_codec.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {
namespace {

using google::protobuf::Message;

// The index of the heads dimension in a tensor of `kind`'s shape.
int HeadsDim(TensorKind kind) { return kind == TensorKind::kLse ? 1 : 2; }

// A tensor viewed as [outer, heads, unit bytes]: heads along HeadsDim, outer the dims before it.
struct HeadView {
  int64_t outer = 0;
  int64_t heads = 0;
  int64_t unit = 0;  // bytes of one head's part of an outer row
};

absl::StatusOr<HeadView> ViewOf(const ComputeTensor& t, const v1::Tensor& tensor) {
  const int dim = HeadsDim(t.kind);
  const int want_dims = t.kind == TensorKind::kLse ? 3 : 4;
  if (tensor.shape_size() != want_dims) {
    return absl::InternalError(absl::StrCat(t.name, " has ", tensor.shape_size(),
                                            " dimensions, expected ", want_dims));
  }
  HeadView v;
  v.outer = 1;
  for (int i = 0; i < dim; ++i) v.outer *= tensor.shape(i);
  v.heads = tensor.shape(dim);
  const int64_t rows = v.outer * v.heads;
  const int64_t bytes = static_cast<int64_t>(tensor.data().size());
  if (rows <= 0 || bytes % rows != 0) {
    return absl::InternalError(absl::StrCat(t.name, " has ", bytes, " bytes, not a whole number of ",
                                            rows, " head rows"));
  }
  v.unit = bytes / rows;
  return v;
}

v1::AttentionOptions* MutableOptions(Message* m) {
  const auto* field = m->GetDescriptor()->FindFieldByName("options");
  return static_cast<v1::AttentionOptions*>(m->GetReflection()->MutableMessage(m, field));
}

const v1::AttentionOptions& OptionsOf(const Message& m) {
  const auto* field = m.GetDescriptor()->FindFieldByName("options");
  return static_cast<const v1::AttentionOptions&>(m.GetReflection()->GetMessage(m, field));
}

const v1::Timings& TimingsOf(const Message& m) {
  const auto* field = m.GetDescriptor()->FindFieldByName("timings");
  return static_cast<const v1::Timings&>(m.GetReflection()->GetMessage(m, field));
}

}  // namespace

int HeadParts(const ComputeRpc& rpc, const Message& request, int wanted) {
  if (wanted <= 1 || !HasTensorField(request, "q") || !HasTensorField(request, "k")) return 1;
  const v1::Tensor& q = TensorField(request, "q");
  const v1::Tensor& k = TensorField(request, "k");
  if (q.shape_size() != 4 || k.shape_size() != 4) return 1;
  const int64_t heads = q.shape(2), heads_k = k.shape(2);
  if (heads_k <= 0 || heads % heads_k != 0) return 1;
  if (OptionsOf(request).dropout_p() != 0 || !OutputShm(request).empty()) return 1;
  for (const ComputeTensor& in : rpc.inputs) {
    if (TensorField(request, in.name).has_shm()) return 1;
  }
  for (int parts = wanted; parts > 1; --parts) {
    if (heads_k % parts == 0) return parts;
  }
  return 1;
}

absl::StatusOr<std::vector<std::unique_ptr<Message>>> SplitByHeads(const ComputeRpc& rpc,
                                                                    const Message& request,
                                                                    int parts) {
  std::vector<std::unique_ptr<Message>> out;
  const int64_t heads = TensorField(request, "q").shape(2);
  for (int p = 0; p < parts; ++p) {
    std::unique_ptr<Message> part(request.New());
    CopyWithoutTensorData(request, part.get());
    v1::AttentionOptions* options = MutableOptions(part.get());
    if (options->alibi_slopes_size() == heads) {
      const int64_t per = heads / parts;
      options->clear_alibi_slopes();
      for (int64_t h = p * per; h < (p + 1) * per; ++h) {
        options->add_alibi_slopes(OptionsOf(request).alibi_slopes(static_cast<int>(h)));
      }
    }
    out.push_back(std::move(part));
  }
  for (const ComputeTensor& in : rpc.inputs) {
    if (!HasTensorField(request, in.name)) continue;
    const v1::Tensor& whole = TensorField(request, in.name);
    absl::StatusOr<HeadView> v = ViewOf(in, whole);
    if (!v.ok()) return absl::InvalidArgumentError(v.status().message());
    if (v->heads % parts != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(in.name, " has ", v->heads, " heads, not a multiple of ", parts));
    }
    const int64_t per = v->heads / parts;
    const int64_t part_row = per * v->unit, whole_row = v->heads * v->unit;
    for (int p = 0; p < parts; ++p) {
      v1::Tensor* t = MutableTensorField(out[p].get(), in.name);
      t->set_dtype(whole.dtype());
      *t->mutable_shape() = whole.shape();
      t->set_shape(HeadsDim(in.kind), per);
      std::string* data = t->mutable_data();
      data->resize(static_cast<size_t>(v->outer * part_row));
      const char* src = whole.data().data() + p * part_row;
      for (int64_t o = 0; o < v->outer; ++o) {
        std::memcpy(data->data() + o * part_row, src + o * whole_row,
                    static_cast<size_t>(part_row));
      }
    }
  }
  return out;
}

absl::Status JoinByHeads(const ComputeRpc& rpc, const std::vector<const Message*>& parts,
                         Message* whole) {
  if (parts.empty()) return absl::InternalError("no parts to join");
  const int n = static_cast<int>(parts.size());
  whole->Clear();
  CopyWithoutTensorData(*parts[0], whole);
  const Message* slowest = parts[0];
  for (const Message* p : parts) {
    if (TimingsOf(*p).total_seconds() > TimingsOf(*slowest).total_seconds()) slowest = p;
  }
  const auto* timings = whole->GetDescriptor()->FindFieldByName("timings");
  whole->GetReflection()->MutableMessage(whole, timings)->CopyFrom(TimingsOf(*slowest));
  for (const ComputeTensor& out : rpc.outputs) {
    if (!HasTensorField(*parts[0], out.name)) continue;
    const v1::Tensor& first = TensorField(*parts[0], out.name);
    absl::StatusOr<HeadView> v = ViewOf(out, first);
    if (!v.ok()) return v.status();
    const int64_t part_row = v->heads * v->unit, whole_row = n * part_row;
    v1::Tensor* t = MutableTensorField(whole, out.name);
    t->set_shape(HeadsDim(out.kind), v->heads * n);
    std::string* data = t->mutable_data();
    data->resize(static_cast<size_t>(v->outer * whole_row));
    for (int p = 0; p < n; ++p) {
      if (!HasTensorField(*parts[p], out.name)) {
        return absl::InternalError(absl::StrCat("part ", p, " of the answer has no ", out.name));
      }
      const v1::Tensor& part = TensorField(*parts[p], out.name);
      if (part.data().size() != first.data().size() || part.shape_size() != first.shape_size()) {
        return absl::InternalError(absl::StrCat("part ", p, "'s ", out.name, " has ",
                                                part.data().size(), " bytes, part 0's ",
                                                first.data().size()));
      }
      for (int64_t o = 0; o < v->outer; ++o) {
        std::memcpy(data->data() + o * whole_row + p * part_row,
                    part.data().data() + o * part_row, static_cast<size_t>(part_row));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace ringattn
