#include "tests/service_backward_fixture.h"

#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "kernels/attention_backward_params.h"
#include "kernels/cpu/reference_backward.h"
#include "server/coordinator.h"

namespace ringattn::test {

BackwardService::BackwardService(int world, std::string kernel)
    : LocalService(world, Coordinator::Options(), std::move(kernel)) {
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
  const v1::Tensor& q = req.q();
  AttentionBackwardParams b;
  std::vector<float> slopes;
  b.fwd = ReferenceParams(q, req.k(), req.v(), req.options(), &slopes);
  AttentionParams& p = b.fwd;
  p.o = const_cast<char*>(req.out().data().data());  // not read by the backward
  b.out = req.out().data().data();
  b.dout = req.dout().data().data();
  b.out_dtype = p.dtype;
  b.lse = reinterpret_cast<const float*>(req.lse().data().data());
  // Not written by the reference; its validation wants pointers.
  std::vector<float> unused(1);
  b.dq = b.dk = b.dv = unused.data();
  SetContiguousBackwardStrides(&b);
  GradErrors e;
  absl::StatusOr<ReferenceBackwardResult> ref = ReferenceBackward(b);
  EXPECT_TRUE(ref.ok()) << ref.status();
  if (!ref.ok()) return e;
  EXPECT_EQ(resp.dq().data().size(), q.data().size());
  EXPECT_EQ(resp.dk().data().size(), req.k().data().size());
  EXPECT_EQ(resp.dv().data().size(), req.v().data().size());
  if (resp.dq().data().size() != q.data().size() ||
      resp.dk().data().size() != req.k().data().size() ||
      resp.dv().data().size() != req.v().data().size()) {
    return e;
  }
  e.dq = CompareTensor(resp.dq().data().data(), p.dtype, ref->dq.data(),
                       static_cast<int64_t>(ref->dq.size()));
  e.dk = CompareTensor(resp.dk().data().data(), p.dtype, ref->dk.data(),
                       static_cast<int64_t>(ref->dk.size()));
  e.dv = CompareTensor(resp.dv().data().data(), p.dtype, ref->dv.data(),
                       static_cast<int64_t>(ref->dv.size()));
  return e;
}

}  // namespace ringattn::test
