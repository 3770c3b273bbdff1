// Shared pieces of the AttendBackward end-to-end tests (service_backward_test on CPU workers,
// service_backward_gpu_test on a GPU worker): a local service with an AttentionClient, the
// backward request of a forward request and its response, and the comparison of the returned
// gradients with the fp64 reference backward.
#ifndef RINGATTN_TESTS_SERVICE_BACKWARD_FIXTURE_H_
#define RINGATTN_TESTS_SERVICE_BACKWARD_FIXTURE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "base/error_metrics.h"
#include "client/attention_client.h"
#include "ringattn/v1/attention.pb.h"
#include "tests/service_fixture.h"

namespace ringattn::test {

// The coordinator and `world` workers (--kernel=`kernel`), and an AttentionClient connected to
// the coordinator.
class BackwardService : public LocalService {
 public:
  explicit BackwardService(int world, std::string kernel = "auto",
                           Coordinator::Options options = Coordinator::Options());
  ~BackwardService();
  AttentionClient& client() { return *client_; }

 private:
  std::unique_ptr<AttentionClient> client_;
};

// The backward request of a forward request and its response, with a synthetic dout (id 3 of
// `seed`).
v1::AttendBackwardRequest MakeBackward(const v1::AttendRequest& fwd, const v1::AttendResponse& resp,
                                       const Shape& s, uint64_t seed = 11);

// Errors of dq, dk and dv against the fp64 reference backward.
struct GradErrors {
  ErrorStats dq, dk, dv;
};

// The returned gradients (in q's dtype) against ReferenceBackward of the request (which
// recomputes the forward from q, k and v in fp64). Sizes are checked with EXPECT.
GradErrors CompareWithReference(const v1::AttendBackwardRequest& req,
                                const v1::AttendBackwardResponse& resp);

}  // namespace ringattn::test

#endif  // RINGATTN_TESTS_SERVICE_BACKWARD_FIXTURE_H_
