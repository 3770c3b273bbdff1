// The tensors of one compute request that live in the caller's registered shared memory: its
// inputs with `shm` set and its `output_shm` entries, resolved against the registry and checked
// together, for the run that reads and writes them.
#pragma once

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "google/protobuf/message.h"
#include "proto/compute_rpcs.h"
#include "server/attend_request.h"
#include "server/shared_memory_registry.h"

namespace ringattn {

// By table name ("q", "out", ...).
using SharedTensors = std::map<std::string, SharedTensor, std::less<>>;

// INVALID_ARGUMENT naming the field for a region this caller has not registered, a reference
// outside its region or of the wrong size, an output_shm name that is not an output of `rpc`
// (or one the request does not ask for, as lse without return_lse), and an output that overlaps
// an input or another output.
absl::StatusOr<SharedTensors> ResolveSharedTensors(const ComputeRpc& rpc,
                                                   const google::protobuf::Message& request,
                                                   const ValidatedAttend& problem,
                                                   const SharedMemoryRegistry& registry,
                                                   const std::string& owner);

}  // namespace ringattn
