// Shared pieces of the service end-to-end tests (service_test, service_backward_test): an
// in-process coordinator with real `ringattn worker` processes, synthetic request tensors and
// the fp64 reference's parameters of a request.
#ifndef RINGATTN_TESTS_SERVICE_FIXTURE_H_
#define RINGATTN_TESTS_SERVICE_FIXTURE_H_

#include <grpcpp/channel.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kernels/attention_params.h"
#include "kernels/cpu/reference_attention.h"
#include "ringattn/v1/attention.grpc.pb.h"
#include "ringattn/v1/attention.pb.h"
#include "server/coordinator.h"
#include "server/local_workers.h"

namespace ringattn::test {

// The `ringattn` binary the workers run (RINGATTN_BIN), empty when unset.
std::string WorkerBinary();

// A coordinator plus `world` worker processes, torn down at the end. Fixtures that add a client
// call Stop() first in their destructor, so the ring goes down before the client does.
class LocalService {
 public:
  // Sets world_size, the ring timeout and the ping interval on `options`; waits up to 60 s for
  // the ring to form. The workers run with --kernel=`kernel`.
  // `worker_args` go to every worker's command line, with the coordinator's --pipeline_depth.
  LocalService(int world, Coordinator::Options options, std::string kernel = "auto",
               std::vector<std::string> worker_args = {});
  ~LocalService();
  LocalService(const LocalService&) = delete;
  LocalService& operator=(const LocalService&) = delete;

  const absl::Status& start_status() const { return start_status_; }
  Coordinator& coordinator() { return *coordinator_; }
  LocalWorkerPool& workers() { return *workers_; }
  // "127.0.0.1:<port>" of the coordinator.
  std::string address() const;
  // Stops the workers and shuts the coordinator down; later calls do nothing.
  void Stop();

 protected:
  absl::Status start_status_;

 private:
  bool stopped_ = false;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<LocalWorkerPool> workers_;
};

// The shape of a request: q is [batch, seqlen, heads, head_dim], k and v [.., heads_k, ..].
struct Shape {
  int batch = 1;
  int64_t seqlen = 64;
  int heads = 4;
  int heads_k = 4;
  int head_dim = 64;
  v1::DType dtype = v1::DTYPE_FP32;
};

DType ToDType(v1::DType d);

// Fills `t` with synthetic data of [s.batch, s.seqlen, heads, s.head_dim] in s.dtype.
void FillTensor(v1::Tensor* t, const Shape& s, int heads, uint32_t id, uint64_t seed);

// A request with synthetic q, k, v (ids 0, 1, 2) that asks for the LSE.
v1::AttendRequest MakeRequest(const Shape& s, uint64_t seed = 3);

// The forward parameters of contiguous q, k, v and `o` as the reference reads them, with no
// output pointer. p.alibi_slopes points into `slopes`, which must outlive the parameters.
AttentionParams ReferenceParams(const v1::Tensor& q, const v1::Tensor& k, const v1::Tensor& v,
                                const v1::AttentionOptions& o, std::vector<float>* slopes);

// The serialized grpc.health.v1 HealthCheckResponse of the whole server over `channel`
// ("\x08\x01": SERVING), or "error: ..." when the call fails.
std::string HealthStatus(const std::shared_ptr<grpc::Channel>& channel);

// Expects `resp` (out and lse) to match the fp64 reference of `req` within its dtype's tolerance.
void ExpectMatchesReference(const v1::AttendRequest& req, const v1::AttendResponse& resp);
// The fp64 reference of `req`'s forward (ReferenceForward of its ReferenceParams), or the
// reference's refusal.
absl::StatusOr<ReferenceResult> ReferenceOf(const v1::AttendRequest& req);

// A stub on a channel to `address` that takes responses of any size (they carry whole tensors).
std::unique_ptr<v1::AttentionService::Stub> UnlimitedStub(const std::string& address);

// Attend through `stub` with a deadline `timeout` from now.
grpc::Status CallAttend(v1::AttentionService::Stub& stub, const v1::AttendRequest& req,
                        v1::AttendResponse* resp, absl::Duration timeout = absl::Seconds(60));

}  // namespace ringattn::test

#endif  // RINGATTN_TESTS_SERVICE_FIXTURE_H_
