// A compute request cut by groups of K/V heads into independent requests, and their answers
// put back together: attention is independent per head, so `parts` requests over `parts`
// connections move a large request's bytes in parallel (one gRPC connection moves about 1 GB/s
// on loopback; bench/grpc_wire_bench). Part p takes K/V heads [p*hk/parts, (p+1)*hk/parts) and
// the query heads of their GQA groups; every other field is the request's (ALiBi slopes cut
// alike). Tensors of the compute table by kind: q-like [b, s, h, d], k-like [b, s, hk, d],
// lse [b, h, s].
#pragma once

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "google/protobuf/message.h"
#include "proto/chunk_codec.h"
#include "proto/compute_rpcs.h"

namespace ringattn {

// How many parts (<= `wanted`) `request` is cut into: the largest divisor of heads_k not above
// `wanted`; 1 (no cut) when its tensors do not give the shapes, a tensor lies in shared memory
// or dropout is on (its mask depends on the head's index).
int HeadParts(const ComputeRpc& rpc, const google::protobuf::Message& request, int wanted);

// The headers of the `parts` requests (HeadParts(...) == parts), each a new message of
// request's type: its tensors' dtypes and shapes (heads cut), no data.
absl::StatusOr<std::vector<std::unique_ptr<google::protobuf::Message>>> SplitHeaders(
    const ComputeRpc& rpc, const google::protobuf::Message& request, int parts);

// Part `part`'s rows of the whole tensor `t` of `request` whose bytes start at `base`: the
// tensor's heads [part * heads / parts, ...) of every outer row, as its request (or answer)
// has them. The shapes come from request's q and k (kLse: q's batch, heads and sequence).
StridedRows HeadRows(const ComputeTensor& t, const google::protobuf::Message& request, char* base,
                     int part, int parts);

// The answers' headers of the parts, in order, as one answer into `whole` (of their type): each
// output the parts carry with its heads joined (no data: the caller's), the other fields from
// part 0, the timings from the part whose server total was longest. INTERNAL when a part lacks
// an output part 0 has.
absl::Status JoinHeaders(const ComputeRpc& rpc,
                         const std::vector<const google::protobuf::Message*>& parts,
                         google::protobuf::Message* whole);

}  // namespace ringattn
