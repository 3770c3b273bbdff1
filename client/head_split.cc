#include "client/head_split.h"

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/attention_client.h"
#include "proto/chunk_codec.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {
namespace {

using google::protobuf::Message;

// The index of the heads dimension in a tensor of `kind`'s shape.
int HeadsDim(TensorKind kind) { return kind == TensorKind::kLse ? 1 : 2; }

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

absl::StatusOr<std::vector<std::unique_ptr<Message>>> SplitHeaders(const ComputeRpc& rpc,
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
    for (const ComputeTensor& in : rpc.inputs) {
      if (!HasTensorField(request, in.name)) continue;
      const v1::Tensor& whole = TensorField(request, in.name);
      const int dim = HeadsDim(in.kind);
      if (whole.shape_size() <= dim || whole.shape(dim) % parts != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            in.name, ": its heads (dimension ", dim, ") do not split into ", parts, " parts"));
      }
      MutableTensorField(part.get(), in.name)->set_shape(dim, whole.shape(dim) / parts);
    }
    out.push_back(std::move(part));
  }
  return out;
}

StridedRows HeadRows(const ComputeTensor& t, const Message& request, char* base, int part,
                     int parts) {
  const v1::Tensor& q = TensorField(request, "q");
  const v1::Tensor& k = TensorField(request, "k");
  const int64_t batch = q.shape(0), seq = q.shape(1), head_dim = q.shape(3);
  const int64_t element = ExpectedTensorBytes(q) / (batch * seq * q.shape(2) * head_dim);
  int64_t outer = batch * seq, heads = q.shape(2), unit = head_dim * element;
  if (t.kind == TensorKind::kKv) heads = k.shape(2);
  if (t.kind == TensorKind::kLse) {
    outer = batch;
    unit = seq * static_cast<int64_t>(sizeof(float));
  }
  const int64_t per = heads / parts;
  return StridedRows{base + part * per * unit, outer, per * unit, heads * unit};
}

absl::Status JoinHeaders(const ComputeRpc& rpc, const std::vector<const Message*>& parts,
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
    for (int p = 1; p < n; ++p) {
      if (!HasTensorField(*parts[p], out.name)) {
        return absl::InternalError(absl::StrCat("part ", p, " of the answer has no ", out.name));
      }
    }
    v1::Tensor* t = MutableTensorField(whole, out.name);
    const int dim = HeadsDim(out.kind);
    if (t->shape_size() <= dim) {
      return absl::InternalError(absl::StrCat(out.name, " of part 0 has no heads dimension"));
    }
    t->set_shape(dim, t->shape(dim) * n);
  }
  return absl::OkStatus();
}

}  // namespace ringattn
