// `ringattn attend`: sends one Attend request to a coordinator and reports the answer.
//
// The inputs are synthetic (deterministic random values addressed by position, the same as
// `ringattn ring` makes for a seed) or read from .npy files. The request goes unary or, when
// forced or larger than the server's unary limit, through AttendStream in chunks; with `shm`, a
// unary call whose tensors go through system shared memory registered with the service (which
// must run on this host). The command
// prints the output's shape, a few values and its NaN count, then the timing table; with
// `check` it also compares the output with the fp64 reference computed locally.
#pragma once

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/error_metrics.h"
#include "client/attention_client.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/dtype.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

struct AttendCommandOptions {
  std::string target = "localhost:50051";  // the coordinator, host:port
  ClientCredentials credentials;           // TLS and bearer token; default: neither
  int connections = 1;  // AttentionClient::Connect's: requests past kSplitAboveBytes cut by heads
  // Problem size of synthetic inputs; ignored when the inputs come from .npy files.
  int batch = 1;
  int64_t seqlen = 4096;
  int heads = 8;
  int heads_k = 0;  // 0: equal to heads
  int head_dim = 64;
  // fp32, fp16 or bf16. Empty: bf16 for synthetic inputs, the files' dtype for .npy inputs
  // (which are converted when it is set, e.g. fp32 files to bf16).
  std::string dtype;
  bool causal = false;
  int64_t window_left = -1;     // -1: unbounded
  int64_t window_right = -1;    // -1: unbounded
  bool alibi = false;           // the standard slopes 2^(-8 (i + 1) / heads)
  float softcap = 0;            // 0 disables
  float dropout_p = 0;          // in [0, 1); CPU workers (GPU workers refuse p > 0)
  uint64_t dropout_seed = 0;
  // Packed variable-length sequences, [0, ..., seqlen] (AttentionOptions.cu_seqlens); empty: one.
  std::vector<int64_t> cu_seqlens;
  float softmax_scale = 0;      // 0: the service's default, 1 / sqrt(head_dim)
  std::string layout = "auto";  // auto, contiguous, zigzag or stripe
  // [batch, seq, heads(_k), head_dim] inputs; all three or none. The shapes come from the files.
  std::string q_npy, k_npy, v_npy;
  bool check = false;      // compare with the fp64 reference computed here
  bool streaming = false;  // force AttendStream
  // Send the tensors through system shared memory (client/shared_memory_session.h): a region
  // per call (forward, backward) sized for it, registered, unregistered and unlinked at the
  // end. Unary calls only (not with `streaming`); the timing table adds the copies' times.
  bool shm = false;
  // With `shm`: the region is a GPU allocation of this process (device 0, CUDA IPC) instead of
  // a POSIX object; the service's workers must be GPU workers on this host.
  bool cuda_shm = false;
  int64_t chunk_bytes = kDefaultChunkBytes;
  double timeout_seconds = 300;         // for the Attend call
  double connect_timeout_seconds = 10;  // for the connection and GetInfo
  uint64_t seed = 1;
  bool return_lse = false;
  std::string out_npy;     // when set, the output is written here (bf16 as fp32)
  std::string request_id;  // empty: the coordinator makes one
  // Also take the gradients: AttendBackward with the forward's out and lse and a synthetic dout
  // (unary). With `check`, the gradients are compared with the fp64 reference backward.
  bool backward = false;
  // With `backward`, when set: the gradients are written to <prefix>dq.npy, <prefix>dk.npy and
  // <prefix>dv.npy (bf16 as fp32), e.g. "grads/" or "run1_".
  std::string grads_npy_prefix;
};

// Runs the command, printing to `out`. Returns the process exit code (cli/exit_codes.h): 0 on
// success, 2 for bad options, 3 or 4 when a call failed (printed as "error: <CODE>: <message>"),
// 5 when the check breached its tolerance, 1 for anything else (an input file unread).
int RunAttendCommand(const AttendCommandOptions& options, std::ostream& out);

// A request with synthetic q [batch, seqlen, heads, head_dim] and k, v [batch, seqlen, heads_k,
// head_dim] of `dtype` (the values `ringattn ring` uses for `seed`) and default options.
v1::AttendRequest MakeSyntheticRequest(int batch, int64_t seqlen, int heads, int heads_k,
                                       int head_dim, DType dtype, uint64_t seed);

// The relative L2 error of the output against the fp64 reference that --check accepts:
// 1e-5 for fp32, 2e-3 for fp16, 1e-2 for bf16.
double OutputTolerance(DType dtype);

// The fp64 reference of a request (its tensors and options). INVALID_ARGUMENT when the request
// is not consistent (shapes, dtypes, data sizes, ALiBi slopes) or asks for dropout.
absl::StatusOr<ReferenceResult> ReferenceForRequest(const v1::AttendRequest& request);

struct ReferenceErrors {
  ErrorStats out;
  std::optional<ErrorStats> lse;  // when the response has an LSE
};

// Errors of the response's out (and lse) against ReferenceForRequest(request). INVALID_ARGUMENT
// when the response's tensors do not have the shapes and dtypes the request implies.
absl::StatusOr<ReferenceErrors> CompareWithReference(const v1::AttendRequest& request,
                                                     const v1::AttendResponse& response);

// The AttendBackward request of a forward request and its response (which must hold the LSE):
// the same q, k, v, options and layout, the response's out and lse, and a synthetic dout of
// q's shape and dtype (id 3 of `seed`).
v1::AttendBackwardRequest MakeBackwardRequest(const v1::AttendRequest& forward,
                                              const v1::AttendResponse& response, uint64_t seed);

// The relative L2 error of each gradient against the fp64 reference that --check accepts:
// 1e-4 for fp32, 5e-3 for fp16, 2e-2 for bf16 (the seed's bar for bf16 is 5e-2).
double GradientTolerance(DType dtype);

struct GradientErrors {
  ErrorStats dq, dk, dv;
};

// Errors of the response's dq, dk, dv against ReferenceBackward of the request (which
// recomputes the forward from q, k and v in fp64 and reads the request's out, lse and dout).
// INVALID_ARGUMENT when shapes, dtypes or sizes do not match.
absl::StatusOr<GradientErrors> CompareGradientsWithReference(
    const v1::AttendBackwardRequest& request, const v1::AttendBackwardResponse& response);

// CompareWithReference's errors of the output alone.
absl::StatusOr<ErrorStats> CheckAgainstReference(const v1::AttendRequest& request,
                                                 const v1::AttendResponse& response);

}  // namespace ringattn
