// Every accepted request is right: random valid requests (seeded, so a failure replays) through
// the service on CPU workers, each compared with the fp64 reference. Shapes from 1 token up,
// every dtype, GQA/MQA, layouts, causal, windows up to far past the sequence, ALiBi, softcaps
// below and above the scores' range, softmax scales; a request the service refuses must be one
// the reference refuses too.
#include <climits>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/cpu/reference_attention.h"
#include "ringattn/v1/attention.grpc.pb.h"
#include "server/coordinator.h"
#include "tests/service_fixture.h"

namespace ringattn {
namespace {

using test::Shape;

// One random valid request, described for the failure message.
v1::AttendRequest RandomRequest(std::mt19937_64& rng, std::string* description) {
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  auto chance = [&](double p) { return std::bernoulli_distribution(p)(rng); };
  Shape s;
  s.batch = static_cast<int>(pick(1, 2));
  const int64_t seqs[] = {1, 2, 7, 31, 64, 129, 200, 383};
  s.seqlen = seqs[pick(0, 7)];
  const int heads_k_choices[] = {1, 1, 2, 3, 5};
  s.heads_k = heads_k_choices[pick(0, 4)];
  s.heads = s.heads_k * static_cast<int>(pick(1, 3));
  const int dims[] = {64, 128};
  s.head_dim = dims[pick(0, 1)];
  const v1::DType dtypes[] = {v1::DTYPE_FP32, v1::DTYPE_FP16, v1::DTYPE_BF16};
  s.dtype = dtypes[pick(0, 2)];
  v1::AttendRequest r = test::MakeRequest(s, static_cast<uint64_t>(pick(1, 1 << 30)));
  v1::AttentionOptions* o = r.mutable_options();
  o->set_causal(chance(0.5));
  const v1::Layout layouts[] = {v1::LAYOUT_AUTO, v1::LAYOUT_CONTIGUOUS, v1::LAYOUT_ZIGZAG,
                                v1::LAYOUT_STRIPE};
  r.set_layout(layouts[pick(0, 3)]);
  auto window_side = [&]() -> int64_t {
    switch (pick(0, 4)) {
      case 0: return pick(0, 3);
      case 1: return pick(0, s.seqlen);
      case 2: return s.seqlen + pick(0, 5);
      case 3: return INT64_MAX - pick(0, 3);  // far past the sequence
      default: return -1;
    }
  };
  if (chance(0.4)) o->set_window_left(window_side());
  if (chance(0.4)) o->set_window_right(window_side());
  if (chance(0.3)) {
    for (int h = 0; h < s.heads; ++h) o->add_alibi_slopes(std::exp2(-(h + 1.0f) * 8 / s.heads));
  }
  if (chance(0.3)) o->set_softcap(chance(0.5) ? 0.5f : 30.0f);  // below and above the scores
  if (chance(0.3)) o->set_softmax_scale(chance(0.5) ? 0.01f : 2.0f);
  r.set_return_lse(true);
  *description = absl::StrCat(
      "b", s.batch, " s", s.seqlen, " h", s.heads, "/", s.heads_k, " d", s.head_dim, " dtype ",
      v1::DType_Name(s.dtype), " layout ", v1::Layout_Name(r.layout()), " options {",
      o->ShortDebugString(), "}");
  return r;
}

TEST(DifferentialFuzz, RandomValidRequestsMatchTheFp64Reference) {
  ASSERT_FALSE(test::WorkerBinary().empty()) << "RINGATTN_BIN not set";
  test::LocalService svc(3, {}, "cpu");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(INT_MAX);
  auto stub = v1::AttentionService::NewStub(
      grpc::CreateCustomChannel(svc.address(), grpc::InsecureChannelCredentials(), args));
  const uint64_t seed = 20261207;
  std::mt19937_64 rng(seed);
  constexpr int kRequests = 150;
  int wrong = 0;
  for (int i = 0; i < kRequests; ++i) {
    std::string what;
    const v1::AttendRequest req = RandomRequest(rng, &what);
    SCOPED_TRACE(absl::StrCat("seed ", seed, " request ", i, ": ", what));
    v1::AttendResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
    const grpc::Status st = stub->Attend(&ctx, req, &resp);

    std::vector<float> slopes;
    AttentionParams p =
        test::ReferenceParams(req.q(), req.k(), req.v(), req.options(), &slopes);
    char unused;
    p.o = &unused;
    absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
    if (!st.ok()) {
      // Refused: only what the reference refuses too.
      EXPECT_FALSE(ref.ok()) << "the service refused a request the reference computes: "
                             << st.error_message();
      continue;
    }
    ASSERT_TRUE(ref.ok()) << "the service answered a request the reference refuses: "
                          << ref.status();
    const int64_t n = static_cast<int64_t>(ref->o.size());
    ASSERT_EQ(resp.out().data().size(), static_cast<size_t>(n) * DTypeSize(p.dtype));
    const double tol = p.dtype == DType::kF32 ? 1e-5 : p.dtype == DType::kF16 ? 2e-3 : 1e-2;
    const ErrorStats e = CompareTensor(resp.out().data().data(), p.dtype, ref->o.data(), n);
    const ErrorStats l = CompareTensor(resp.lse().data().data(), DType::kF32, ref->lse.data(),
                                       static_cast<int64_t>(ref->lse.size()));
    const bool ok = e.Within(tol, 1.0) && l.Within(1e-5, 1e-4);
    EXPECT_TRUE(ok) << "out: " << e.ToString() << "; lse: " << l.ToString();
    wrong += ok ? 0 : 1;
  }
  EXPECT_EQ(wrong, 0) << "of " << kRequests;
}

}  // namespace
}  // namespace ringattn
