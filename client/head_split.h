// A compute request cut by groups of K/V heads into independent requests, and their answers
// put back together: attention is independent per head, so `parts` requests over `parts`
// connections move a large request's bytes in parallel (one gRPC connection moves about 1 GB/s
// on loopback; bench/grpc_wire_bench). Part p takes K/V heads [p*hk/parts, (p+1)*hk/parts) and
// the query heads of their GQA groups; every other field is the request's (ALiBi slopes cut
// alike). Tensors of the compute table by kind: q-like [b, s, h, d], k-like [b, s, hk, d],
// lse [b, h, s].
#pragma once

#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "google/protobuf/message.h"
#include "proto/compute_rpcs.h"

namespace ringattn {

// How many parts (<= `wanted`) `request` is cut into: the largest divisor of heads_k not above
// `wanted`; 1 (no cut) when its tensors do not give the shapes, a tensor lies in shared memory
// or dropout is on (its mask depends on the head's index).
int HeadParts(const ComputeRpc& rpc, const google::protobuf::Message& request, int wanted);

// The `parts` requests (HeadParts(...) == parts), each a new message of request's type.
absl::StatusOr<std::vector<std::unique_ptr<google::protobuf::Message>>> SplitByHeads(
    const ComputeRpc& rpc, const google::protobuf::Message& request, int parts);

// The answers of SplitByHeads' parts, in order, as one answer into `whole` (of their type): every
// output the parts carry, joined along the heads; the other fields from part 0, the timings
// from the part whose server total was longest. INTERNAL when a part's output is missing or
// has another size than its shape says.
absl::Status JoinByHeads(const ComputeRpc& rpc,
                         const std::vector<const google::protobuf::Message*>& parts,
                         google::protobuf::Message* whole);

}  // namespace ringattn
