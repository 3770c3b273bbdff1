// Every accepted request is right: random valid requests (seeded, so a failure replays) through
// the service on CPU workers, each compared with the fp64 reference. Shapes from 1 token up,
// every dtype, GQA/MQA, layouts, causal, windows up to far past the sequence, ALiBi, softcaps
// below and above the scores' range, softmax scales from the smallest to the largest accepted
// (and past them), NaN and infinities in q, k and v, finite inputs whose scores exceed fp32; a
// request the service refuses must be one the reference refuses too. NaN must be exactly where
// the reference has it (reference_attention.h): hand-written cases check which rows that is
// through every layout.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
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

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Element (b, row, head, d) of a request tensor [batch, seq, heads, head_dim] set to `value`
// (rounded to the tensor's dtype).
void SetElement(v1::Tensor* t, int64_t b, int64_t row, int64_t head, int64_t d, float value) {
  const int64_t at = ((b * t->shape(1) + row) * t->shape(2) + head) * t->shape(3) + d;
  StoreFromFloat(t->mutable_data()->data(), at, test::ToDType(t->dtype()), value);
}

// Every element of a request tensor multiplied by `factor`.
void ScaleTensor(v1::Tensor* t, float factor) {
  const DType dtype = test::ToDType(t->dtype());
  const int64_t n = static_cast<int64_t>(t->data().size() / DTypeSize(dtype));
  char* data = t->mutable_data()->data();
  for (int64_t i = 0; i < n; ++i) StoreFromFloat(data, i, dtype, LoadAsFloat(data, i, dtype) * factor);
}

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
  if (chance(0.3)) {
    // Ordinary, then the accepted extremes (FLT_MIN, 1e6), then past them (refused).
    const float scales[] = {0.01f, 2.0f, 1.17549435e-38f, 1e6f, 1e-40f, 2e6f};
    o->set_softmax_scale(scales[pick(0, 5)]);
  }
  r.set_return_lse(true);
  std::string poisoned;
  if (chance(0.15)) {
    // Finite inputs whose scores exceed fp32 (each product stays within it, q.k up to ~1e38,
    // scaled by 1e4): rows NaN. bf16 and fp32 only: fp16 would make them infinities.
    if (s.dtype != v1::DTYPE_FP16) {
      ScaleTensor(r.mutable_q(), 1e18f);
      ScaleTensor(r.mutable_k(), 1e18f);
      o->set_softmax_scale(1e4f);
      poisoned = " q, k x1e18, scale 1e4";
    }
  }
  if (chance(0.25)) {
    // One to three elements of q, k or v NaN or infinite.
    for (int64_t n = pick(1, 3); n > 0; --n) {
      const int64_t which = pick(0, 2);
      v1::Tensor* t = which == 0 ? r.mutable_q() : which == 1 ? r.mutable_k() : r.mutable_v();
      const float values[] = {kNan, kInf, -kInf};
      const float value = values[pick(0, 2)];
      const int64_t b = pick(0, s.batch - 1), row = pick(0, s.seqlen - 1);
      const int64_t head = pick(0, t->shape(2) - 1), d = pick(0, s.head_dim - 1);
      SetElement(t, b, row, head, d, value);
      absl::StrAppend(&poisoned, " ", std::string(1, "qkv"[which]), "[", b, ",", row, ",", head, ",", d,
                      "]=", value);
    }
  }
  *description = absl::StrCat(
      "b", s.batch, " s", s.seqlen, " h", s.heads, "/", s.heads_k, " d", s.head_dim, " dtype ",
      v1::DType_Name(s.dtype), " layout ", v1::Layout_Name(r.layout()), " options {",
      o->ShortDebugString(), "}", poisoned);
  return r;
}

// The response's out and lse against the fp64 reference `ref`: NaN exactly where the
// reference has it, infinities equal, the rest within the dtype's tolerance (the LSE relative to
// its size, which an extreme softmax_scale makes large). False, with the failure reported, when
// they differ.
bool MatchesReference(const v1::AttendResponse& resp, const ReferenceResult& ref, DType dtype) {
  const int64_t n = static_cast<int64_t>(ref.o.size());
  EXPECT_EQ(resp.out().data().size(), static_cast<size_t>(n) * DTypeSize(dtype));
  EXPECT_EQ(resp.lse().data().size(), ref.lse.size() * sizeof(float));
  if (resp.out().data().size() != static_cast<size_t>(n) * DTypeSize(dtype) ||
      resp.lse().data().size() != ref.lse.size() * sizeof(float)) {
    return false;
  }
  const double tol = dtype == DType::kF32 ? 1e-5 : dtype == DType::kF16 ? 2e-3 : 1e-2;
  const ErrorStats e = CompareTensor(resp.out().data().data(), dtype, ref.o.data(), n);
  const ErrorStats l = CompareTensor(resp.lse().data().data(), DType::kF32, ref.lse.data(),
                                     static_cast<int64_t>(ref.lse.size()));
  double lse_scale = 1.0;  // the largest finite |LSE|: fp32 rounds the LSE relative to it
  for (const double x : ref.lse) {
    if (std::isfinite(x)) lse_scale = std::max(lse_scale, std::abs(x));
  }
  const bool ok = e.Within(tol, 1.0) && l.Within(1e-5, 1e-4 * lse_scale);
  EXPECT_TRUE(ok) << "out: " << e.ToString() << "; lse: " << l.ToString();
  return ok;
}

TEST(DifferentialFuzz, RandomValidRequestsMatchTheFp64Reference) {
  ASSERT_FALSE(test::WorkerBinary().empty()) << "RINGATTN_BIN not set";
  test::LocalService svc(3, {}, "cpu");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  auto stub = test::UnlimitedStub(svc.address());
  const uint64_t seed = 20261207;
  std::mt19937_64 rng(seed);
  constexpr int kRequests = 150;
  int wrong = 0, refused = 0, with_nan = 0;
  for (int i = 0; i < kRequests; ++i) {
    std::string what;
    const v1::AttendRequest req = RandomRequest(rng, &what);
    SCOPED_TRACE(absl::StrCat("seed ", seed, " request ", i, ": ", what));
    v1::AttendResponse resp;
    const grpc::Status st = test::CallAttend(*stub, req, &resp);
    const absl::StatusOr<ReferenceResult> ref = test::ReferenceOf(req);
    if (!st.ok()) {
      // Refused: only what the reference refuses too.
      EXPECT_FALSE(ref.ok()) << "the service refused a request the reference computes: "
                             << st.error_message();
      ++refused;
      continue;
    }
    ASSERT_TRUE(ref.ok()) << "the service answered a request the reference refuses: "
                          << ref.status();
    wrong += MatchesReference(resp, *ref, test::ToDType(req.q().dtype())) ? 0 : 1;
    with_nan += std::any_of(ref->o.begin(), ref->o.end(), [](double x) { return std::isnan(x); });
  }
  EXPECT_EQ(wrong, 0) << "of " << kRequests;
  std::fprintf(stderr, "%d requests: %d refused, %d answered with NaN where the reference has it\n",
               kRequests, refused, with_nan);
}

// Hand-written: which rows a NaN reaches, through the ring on every layout (3 workers, 200
// tokens: shards and zigzag chunks that do not fall on the kernels' 64-row blocks), GQA 4:2
// (K/V head 0 serves query heads 0 and 1). Each case says where the output must be NaN; every
// other element must be finite, and everything must match the fp64 reference.
TEST(DifferentialFuzz, NanReachesExactlyTheRowsThatSeeIt) {
  ASSERT_FALSE(test::WorkerBinary().empty()) << "RINGATTN_BIN not set";
  test::LocalService svc(3, {}, "cpu");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  auto stub = test::UnlimitedStub(svc.address());
  const Shape shape{1, 200, 4, 2, 64, v1::DTYPE_FP32};
  struct Case {
    std::string name;
    std::function<void(v1::AttendRequest*)> poison;
    // Whether out[row, head, d] must be NaN (d = -1: the LSE of the row and head).
    std::function<bool(int64_t row, int64_t head, int64_t d)> nan;
  };
  const Case cases[] = {
      {"NaN in q row 37, causal: that row only",
       [](v1::AttendRequest* r) {
         r->mutable_options()->set_causal(true);
         SetElement(r->mutable_q(), 0, 37, 1, 5, kNan);
       },
       [](int64_t i, int64_t h, int64_t) { return i == 37 && h == 1; }},
      {"NaN in k row 120, causal: rows 120 on, rows before unaffected",
       [](v1::AttendRequest* r) {
         r->mutable_options()->set_causal(true);
         SetElement(r->mutable_k(), 0, 120, 0, 3, kNan);
       },
       [](int64_t i, int64_t h, int64_t) { return i >= 120 && h < 2; }},
      {"+inf in k row 120, window (10, 5): rows 115 to 130",
       [](v1::AttendRequest* r) {
         r->mutable_options()->set_window_left(10);
         r->mutable_options()->set_window_right(5);
         SetElement(r->mutable_k(), 0, 120, 1, 0, kInf);
       },
       [](int64_t i, int64_t h, int64_t) { return i >= 115 && i <= 130 && h >= 2; }},
      {"NaN in v row 120, causal: column 7 of rows 120 on",
       [](v1::AttendRequest* r) {
         r->mutable_options()->set_causal(true);
         SetElement(r->mutable_v(), 0, 120, 0, 7, kNan);
       },
       [](int64_t i, int64_t h, int64_t d) { return i >= 120 && h < 2 && d == 7; }},
  };
  for (const v1::Layout layout : {v1::LAYOUT_CONTIGUOUS, v1::LAYOUT_ZIGZAG, v1::LAYOUT_STRIPE}) {
    for (const Case& c : cases) {
      SCOPED_TRACE(absl::StrCat(c.name, ", ", v1::Layout_Name(layout)));
      v1::AttendRequest req = test::MakeRequest(shape);
      req.set_layout(layout);
      c.poison(&req);
      v1::AttendResponse resp;
      const grpc::Status st = test::CallAttend(*stub, req, &resp);
      ASSERT_TRUE(st.ok()) << st.error_message();
      const absl::StatusOr<ReferenceResult> ref = test::ReferenceOf(req);
      ASSERT_TRUE(ref.ok()) << ref.status();
      EXPECT_TRUE(MatchesReference(resp, *ref, DType::kF32));
      const float* out = reinterpret_cast<const float*>(resp.out().data().data());
      const float* lse = reinterpret_cast<const float*>(resp.lse().data().data());
      int64_t wrong = 0;
      for (int64_t i = 0; i < shape.seqlen; ++i) {
        for (int64_t h = 0; h < shape.heads; ++h) {
          const bool lse_nan = std::isnan(lse[h * shape.seqlen + i]);
          if (lse_nan != c.nan(i, h, -1) && wrong++ < 3) {
            ADD_FAILURE() << "row " << i << " head " << h << ": lse " << lse[h * shape.seqlen + i];
          }
          for (int64_t d = 0; d < shape.head_dim; ++d) {
            const float x = out[(i * shape.heads + h) * shape.head_dim + d];
            if (std::isnan(x) != c.nan(i, h, d) && wrong++ < 3) {
              ADD_FAILURE() << "row " << i << " head " << h << " dim " << d << ": " << x;
            }
          }
        }
      }
      EXPECT_EQ(wrong, 0);
    }
  }
}

}  // namespace
}  // namespace ringattn
