#include "server/shared_tensors.h"

#include <set>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace ringattn {

absl::StatusOr<SharedTensors> ResolveSharedTensors(const ComputeRpc& rpc,
                                                   const google::protobuf::Message& request,
                                                   const ValidatedAttend& p,
                                                   const SharedMemoryRegistry& registry,
                                                   const std::string& owner) {
  SharedTensors out;
  std::set<std::string> inputs;
  for (const ComputeTensor& in : rpc.inputs) {
    const v1::Tensor& t = TensorField(request, in.name);
    if (!t.has_shm()) continue;
    RA_ASSIGN_OR_RETURN(SharedTensor st,
                        registry.Resolve(owner, t.shm(), BytesOf(in.kind, p.shape),
                                         absl::StrCat(in.name, ".shm")));
    out.emplace(in.name, std::move(st));
    inputs.insert(in.name);
  }
  for (const auto& [name, ref] : OutputShm(request)) {
    const ComputeTensor* output = nullptr;
    std::string names;
    for (const ComputeTensor& o : rpc.outputs) {
      if (name == o.name) output = &o;
      absl::StrAppend(&names, names.empty() ? "" : ", ", o.name);
    }
    const std::string field = absl::StrCat("output_shm['", name.substr(0, 64), "']");
    if (output == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": ", std::string(rpc.name), " has no output '",
                                                     name.substr(0, 64), "' (its outputs: ",
                                                     names, ")"));
    }
    if (!Wants(request, *output)) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": the request does not ask for ",
                                                     name, " (", output->wanted_if, " is false)"));
    }
    RA_ASSIGN_OR_RETURN(SharedTensor st,
                        registry.Resolve(owner, ref, BytesOf(output->kind, p.shape), field));
    for (const auto& [other, placed] : out) {
      if (st.Overlaps(placed)) {
        const bool input = inputs.count(other) > 0;
        return absl::InvalidArgumentError(
            absl::StrCat(field, " overlaps ", input ? other + ".shm" : "output_shm['" + other + "']",
                         ": outputs are written while the inputs are read"));
      }
    }
    out.emplace(name, std::move(st));
  }
  return out;
}

}  // namespace ringattn
