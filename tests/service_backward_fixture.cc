#include "tests/service_backward_fixture.h"

#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "cli/attend_command.h"
#include "gtest/gtest.h"
#include "server/coordinator.h"

namespace ringattn::test {

BackwardService::BackwardService(int world, std::string kernel, Coordinator::Options options)
    : LocalService(world, std::move(options), std::move(kernel)) {
  if (!start_status().ok()) return;
  absl::StatusOr<std::unique_ptr<AttentionClient>> client =
      AttentionClient::Connect(address(), absl::Seconds(10));
  if (!client.ok()) {
    start_status_ = client.status();
    return;
  }
  client_ = *std::move(client);
}

// The ring goes down before the client does.
BackwardService::~BackwardService() { Stop(); }

v1::AttendBackwardRequest MakeBackward(const v1::AttendRequest& fwd, const v1::AttendResponse& resp,
                                       const Shape& s, uint64_t seed) {
  v1::AttendBackwardRequest r;
  r.set_request_id(fwd.request_id());
  *r.mutable_q() = fwd.q();
  *r.mutable_k() = fwd.k();
  *r.mutable_v() = fwd.v();
  *r.mutable_out() = resp.out();
  *r.mutable_lse() = resp.lse();
  FillTensor(r.mutable_dout(), s, s.heads, 3, seed);
  *r.mutable_options() = fwd.options();
  r.set_layout(fwd.layout());
  return r;
}

GradErrors CompareWithReference(const v1::AttendBackwardRequest& req,
                                const v1::AttendBackwardResponse& resp) {
  absl::StatusOr<GradientErrors> e = CompareGradientsWithReference(req, resp);
  EXPECT_TRUE(e.ok()) << e.status();
  if (!e.ok()) return {};
  return {e->dq, e->dk, e->dv};
}

}  // namespace ringattn::test
