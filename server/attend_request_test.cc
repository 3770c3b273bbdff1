#include "server/attend_request.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/convert.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;

int64_t ElemSize(v1::DType dtype) { return dtype == v1::DTYPE_FP32 ? 4 : 2; }

// A tensor of `shape` whose data has exactly the bytes the shape needs, filled with a pattern.
v1::Tensor MakeTensor(v1::DType dtype, const std::vector<int64_t>& shape) {
  v1::Tensor t;
  t.set_dtype(dtype);
  int64_t n = ElemSize(dtype);
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  std::string data(static_cast<size_t>(n), '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 31 + 7);
  t.set_data(std::move(data));
  return t;
}

v1::AttendRequest MakeRequest(int batch, int64_t seq, int heads, int heads_k, int head_dim,
                              v1::DType dtype = v1::DTYPE_BF16) {
  v1::AttendRequest r;
  r.set_request_id("req-1");
  *r.mutable_q() = MakeTensor(dtype, {batch, seq, heads, head_dim});
  *r.mutable_k() = MakeTensor(dtype, {batch, seq, heads_k, head_dim});
  *r.mutable_v() = MakeTensor(dtype, {batch, seq, heads_k, head_dim});
  return r;
}

// ---- Bad input -----------------------------------------------------------------------------

struct BadCase {
  const char* name;
  std::function<void(v1::AttendRequest*)> mutate;
  const char* message;  // expected substring
};

// Every case starts from a valid bf16 request: batch 1, seq 7, heads 5, heads_k 5, head_dim 64
// (GQA cases rebuild it).
const BadCase kBadCases[] = {
    {"QMissing", [](v1::AttendRequest* r) { r->clear_q(); }, "q is missing"},
    {"KMissing", [](v1::AttendRequest* r) { r->clear_k(); }, "k is missing"},
    {"VMissing", [](v1::AttendRequest* r) { r->clear_v(); }, "v is missing"},
    {"QThreeDims",
     [](v1::AttendRequest* r) {
       *r->mutable_q() = MakeTensor(v1::DTYPE_BF16, {1, 7, 320});
     },
     "q.shape must have 4 dims [batch, seq, heads, head_dim], got 3"},
    {"KFiveDims",
     [](v1::AttendRequest* r) {
       *r->mutable_k() = MakeTensor(v1::DTYPE_BF16, {1, 7, 5, 64, 1});
     },
     "k.shape must have 4 dims [batch, seq, heads_k, head_dim], got 5"},
    {"QDTypeUnspecified",
     [](v1::AttendRequest* r) { r->mutable_q()->set_dtype(v1::DTYPE_UNSPECIFIED); },
     "q.dtype must be fp32, fp16 or bf16, got DTYPE_UNSPECIFIED"},
    {"QDTypeUnknownValue",
     [](v1::AttendRequest* r) { r->mutable_q()->set_dtype(static_cast<v1::DType>(42)); },
     "q.dtype must be fp32, fp16 or bf16, got 42"},
    {"KDTypeUnspecified",
     [](v1::AttendRequest* r) { r->mutable_k()->set_dtype(v1::DTYPE_UNSPECIFIED); },
     "k.dtype must be fp32, fp16 or bf16, got DTYPE_UNSPECIFIED"},
    {"KDTypeMismatch", [](v1::AttendRequest* r) { r->mutable_k()->set_dtype(v1::DTYPE_FP16); },
     "k.dtype must match q.dtype (bf16), got fp16"},
    {"VDTypeMismatch", [](v1::AttendRequest* r) { r->mutable_v()->set_dtype(v1::DTYPE_FP32); },
     "v.dtype must match q.dtype (bf16), got fp32"},
    {"BatchZero", [](v1::AttendRequest* r) { r->mutable_q()->set_shape(0, 0); },
     "q.shape[0] (batch) must be > 0, got 0"},
    {"SeqZero", [](v1::AttendRequest* r) { r->mutable_q()->set_shape(1, 0); },
     "q.shape[1] (seq) must be > 0, got 0"},
    {"HeadsNegative", [](v1::AttendRequest* r) { r->mutable_q()->set_shape(2, -1); },
     "q.shape[2] (heads) must be > 0, got -1"},
    {"HeadsKZero", [](v1::AttendRequest* r) { r->mutable_k()->set_shape(2, 0); },
     "k.shape[2] (heads_k) must be > 0, got 0"},
    {"BatchTooLargeForInt",
     [](v1::AttendRequest* r) { r->mutable_q()->set_shape(0, int64_t{1} << 31); },
     "q.shape[0] (batch) must be <= 2147483647"},
    {"HeadDim96", [](v1::AttendRequest* r) { *r = MakeRequest(1, 7, 5, 5, 96); },
     "q.shape[3]: head_dim 96 not supported; expected 64, 128 or 256"},
    {"KBatchMismatch", [](v1::AttendRequest* r) { r->mutable_k()->set_shape(0, 2); },
     "k.shape[0] (batch) must equal q.shape[0] (1), got 2"},
    {"KSeqMismatch", [](v1::AttendRequest* r) { r->mutable_k()->set_shape(1, 8); },
     "k.shape[1] (seq) must equal q.shape[1] (7), got 8"},
    {"VSeqMismatch", [](v1::AttendRequest* r) { r->mutable_v()->set_shape(1, 6); },
     "v.shape[1] (seq) must equal q.shape[1] (7), got 6"},
    {"KHeadDimMismatch", [](v1::AttendRequest* r) { r->mutable_k()->set_shape(3, 128); },
     "k.shape[3] (head_dim) must equal q.shape[3] (64), got 128"},
    {"VHeadsKMismatch",
     [](v1::AttendRequest* r) {
       *r = MakeRequest(1, 7, 6, 2, 64);
       r->mutable_v()->set_shape(2, 3);
     },
     "v.shape[2] (heads_k) must equal k.shape[2] (2), got 3"},
    {"HeadsNotMultiple", [](v1::AttendRequest* r) { *r = MakeRequest(1, 7, 5, 2, 64); },
     "q.shape[2] (heads) 5 must be a multiple of k.shape[2] (heads_k) 2"},
    {"KDataShort",
     [](v1::AttendRequest* r) {
       *r = MakeRequest(1, 7, 2, 2, 64);
       r->mutable_k()->mutable_data()->resize(1000);
     },
     "k.data has 1000 bytes; shape [1,7,2,64] of bf16 needs 1792"},
    {"QDataLong", [](v1::AttendRequest* r) { r->mutable_q()->mutable_data()->append("x"); },
     "q.data has 4481 bytes; shape [1,7,5,64] of bf16 needs 4480"},
    {"VDataEmpty", [](v1::AttendRequest* r) { r->mutable_v()->clear_data(); },
     "v.data has 0 bytes; shape [1,7,5,64] of bf16 needs 4480"},
    {"AlibiWrongCount",
     [](v1::AttendRequest* r) {
       for (int i = 0; i < 3; ++i) r->mutable_options()->add_alibi_slopes(0.5f);
     },
     "options.alibi_slopes must have 5 entries (one per head), got 3"},
    {"AlibiNaN",
     [](v1::AttendRequest* r) {
       for (int i = 0; i < 5; ++i) r->mutable_options()->add_alibi_slopes(i == 2 ? NAN : 0.5f);
     },
     "options.alibi_slopes[2] must be finite"},
    {"CuSeqlensPastTheEnd",
     [](v1::AttendRequest* r) {
       for (int64_t b : {0, 3, 9}) r->mutable_options()->add_cu_seqlens(b);
     },
     "options.cu_seqlens must run from 0 to q.shape[1] (seq) 7, got 3 entries from 0 to 9"},
    {"CuSeqlensNotFromZero",
     [](v1::AttendRequest* r) {
       for (int64_t b : {2, 7}) r->mutable_options()->add_cu_seqlens(b);
     },
     "options.cu_seqlens must run from 0"},
    {"CuSeqlensOneEntry", [](v1::AttendRequest* r) { r->mutable_options()->add_cu_seqlens(0); },
     "options.cu_seqlens must run from 0"},
    {"CuSeqlensDecreasing",
     [](v1::AttendRequest* r) {
       for (int64_t b : {0, 5, 4, 7}) r->mutable_options()->add_cu_seqlens(b);
     },
     "options.cu_seqlens must be non-decreasing, got cu_seqlens[1] = 5 > cu_seqlens[2] = 4"},
    {"DropoutOne", [](v1::AttendRequest* r) { r->mutable_options()->set_dropout_p(1.0f); },
     "options.dropout_p must be in [0, 1)"},
    {"DropoutNegative", [](v1::AttendRequest* r) { r->mutable_options()->set_dropout_p(-0.1f); },
     "options.dropout_p must be in [0, 1)"},
    {"DropoutNaN", [](v1::AttendRequest* r) { r->mutable_options()->set_dropout_p(NAN); },
     "options.dropout_p must be in [0, 1)"},
    {"WindowLeft", [](v1::AttendRequest* r) { r->mutable_options()->set_window_left(-2); },
     "options.window_left must be >= -1"},
    {"WindowRight", [](v1::AttendRequest* r) { r->mutable_options()->set_window_right(-7); },
     "options.window_right must be >= -1 (-1 or absent is unbounded), got -7"},
    {"ScaleZero", [](v1::AttendRequest* r) { r->mutable_options()->set_softmax_scale(0.0f); },
     "options.softmax_scale must be finite and in [1.17549e-38, 1e+06]"},
    {"ScaleNegative",
     [](v1::AttendRequest* r) { r->mutable_options()->set_softmax_scale(-0.125f); },
     "options.softmax_scale must be finite and in [1.17549e-38, 1e+06]"},
    {"ScaleNaN", [](v1::AttendRequest* r) { r->mutable_options()->set_softmax_scale(NAN); },
     "options.softmax_scale must be finite and in [1.17549e-38, 1e+06]"},
    {"ScaleInf", [](v1::AttendRequest* r) { r->mutable_options()->set_softmax_scale(INFINITY); },
     "options.softmax_scale must be finite and in [1.17549e-38, 1e+06]"},
    {"ScaleAbsurd", [](v1::AttendRequest* r) { r->mutable_options()->set_softmax_scale(2e6f); },
     "options.softmax_scale must be finite and in [1.17549e-38, 1e+06], got 2e+06"},
    {"ScaleSubnormal",
     [](v1::AttendRequest* r) { r->mutable_options()->set_softmax_scale(1e-40f); },
     "options.softmax_scale must be finite and in [1.17549e-38, 1e+06]"},
    {"SoftcapNegative", [](v1::AttendRequest* r) { r->mutable_options()->set_softcap(-1.0f); },
     "options.softcap must be finite and >= 0 (0 disables)"},
    {"SoftcapInf", [](v1::AttendRequest* r) { r->mutable_options()->set_softcap(INFINITY); },
     "options.softcap must be finite and >= 0"},
    {"LayoutUnknown", [](v1::AttendRequest* r) { r->set_layout(static_cast<v1::Layout>(9)); },
     "layout must be LAYOUT_AUTO, LAYOUT_CONTIGUOUS, LAYOUT_ZIGZAG or LAYOUT_STRIPE, got 9"},
    {"RequestIdTooLong", [](v1::AttendRequest* r) { r->set_request_id(std::string(129, 'a')); },
     "request_id has 129 bytes; expected at most 128"},
    {"RequestIdControlChar", [](v1::AttendRequest* r) { r->set_request_id("a\nb"); },
     "request_id must be printable ASCII (0x20-0x7e); byte 1 is 0x0a"},
};

class BadInputTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(BadInputTest, IsInvalidArgumentNamingTheField) {
  v1::AttendRequest r = MakeRequest(1, 7, 5, 5, 64);
  ASSERT_TRUE(ValidateAttendRequest(r, AttendLimits{}).ok());
  GetParam().mutate(&r);
  absl::StatusOr<ValidatedAttend> v = ValidateAttendRequest(r, AttendLimits{});
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument) << v.status();
  EXPECT_THAT(std::string(v.status().message()), HasSubstr(GetParam().message));
}

INSTANTIATE_TEST_SUITE_P(AttendRequest, BadInputTest, ::testing::ValuesIn(kBadCases),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

// ---- Limits --------------------------------------------------------------------------------

TEST(AttendLimitsTest, OverMaxRequestBytesIsResourceExhausted) {
  const v1::AttendRequest r = MakeRequest(1, 7, 5, 5, 64);  // 3 * 4480 bytes
  AttendLimits limits;
  limits.max_request_bytes = 13440;
  EXPECT_TRUE(ValidateAttendRequest(r, limits).ok());
  limits.max_request_bytes = 13439;
  absl::StatusOr<ValidatedAttend> v = ValidateAttendRequest(r, limits);
  ASSERT_EQ(v.status().code(), absl::StatusCode::kResourceExhausted) << v.status();
  EXPECT_THAT(std::string(v.status().message()),
              HasSubstr("q, k and v need 13440 bytes; the limit is 13439 (max_request_bytes)"));
}

// The limit is checked on the shapes before the data: a header announcing a huge tensor is
// refused as too large, without the server looking for (or allocating) its bytes.
TEST(AttendLimitsTest, HugeShapeWithoutDataIsResourceExhausted) {
  v1::AttendRequest r = MakeRequest(1, 7, 8, 8, 128);
  for (v1::Tensor* t : {r.mutable_q(), r.mutable_k(), r.mutable_v()}) {
    t->set_shape(1, int64_t{1} << 30);
    t->clear_data();
  }
  for (const absl::StatusOr<ValidatedAttend>& v :
       {ValidateAttendRequest(r, AttendLimits{}), ValidateAttendHeader(r, AttendLimits{})}) {
    ASSERT_EQ(v.status().code(), absl::StatusCode::kResourceExhausted) << v.status();
    EXPECT_THAT(std::string(v.status().message()), HasSubstr("(max_request_bytes)"));
  }
}

TEST(AttendLimitsTest, OverflowingShapeIsResourceExhausted) {
  v1::AttendRequest r = MakeRequest(1, 7, 1, 1, 64);
  for (v1::Tensor* t : {r.mutable_q(), r.mutable_k(), r.mutable_v()}) {
    t->set_shape(1, int64_t{1} << 62);
    t->clear_data();
  }
  absl::StatusOr<ValidatedAttend> v = ValidateAttendRequest(r, AttendLimits{});
  ASSERT_EQ(v.status().code(), absl::StatusCode::kResourceExhausted) << v.status();
  EXPECT_THAT(std::string(v.status().message()), HasSubstr("q.shape [1,4611686018427387904,1,64]"));
  EXPECT_THAT(std::string(v.status().message()), HasSubstr("more than 2^63 bytes"));
}

TEST(AttendLimitsTest, OverMaxSeqlenIsResourceExhausted) {
  const v1::AttendRequest r = MakeRequest(1, 7, 5, 5, 64);
  AttendLimits limits;
  limits.max_seqlen = 6;
  absl::StatusOr<ValidatedAttend> v = ValidateAttendRequest(r, limits);
  ASSERT_EQ(v.status().code(), absl::StatusCode::kResourceExhausted) << v.status();
  EXPECT_THAT(std::string(v.status().message()),
              HasSubstr("q.shape[1] (seq) 7 exceeds the limit 6 (max_seqlen)"));
}

// ---- Valid requests ------------------------------------------------------------------------

class ValidRequestTest
    : public ::testing::TestWithParam<std::tuple<int /*batch*/, int64_t /*seq*/, int /*heads*/,
                                                 int /*heads_k*/, int /*head_dim*/, v1::DType>> {};

TEST_P(ValidRequestTest, PassesWithTheRightFields) {
  const auto [batch, seq, heads, heads_k, head_dim, dtype] = GetParam();
  const v1::AttendRequest r = MakeRequest(batch, seq, heads, heads_k, head_dim, dtype);
  absl::StatusOr<ValidatedAttend> v = ValidateAttendRequest(r, AttendLimits{});
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->request_id, "req-1");
  const AttentionShape& s = v->shape;
  EXPECT_EQ(DTypeToProto(s.dtype), dtype);
  EXPECT_EQ(s.batch, batch);
  EXPECT_EQ(s.seqlen_q, seq);
  EXPECT_EQ(s.seqlen_k, seq);
  EXPECT_EQ(s.heads, heads);
  EXPECT_EQ(s.heads_k, heads_k);
  EXPECT_EQ(s.head_dim, head_dim);
  EXPECT_FALSE(v->layout.has_value());
  EXPECT_EQ(v->ResolvedLayout(), Layout::kContiguous);
  EXPECT_FALSE(v->return_lse);
  const int64_t es = ElemSize(dtype);
  EXPECT_EQ(static_cast<int64_t>(s.q_bytes()), batch * seq * heads * head_dim * es);
  EXPECT_EQ(static_cast<int64_t>(s.kv_bytes()), batch * seq * heads_k * head_dim * es);
  EXPECT_EQ(static_cast<int64_t>(s.lse_bytes()), batch * heads * seq * 4);
}

INSTANTIATE_TEST_SUITE_P(AwkwardSizes, ValidRequestTest,
                         ::testing::Values(std::make_tuple(1, 1, 1, 1, 64, v1::DTYPE_FP32),
                                           std::make_tuple(1, 7, 5, 5, 64, v1::DTYPE_BF16),
                                           std::make_tuple(3, 7, 5, 1, 128, v1::DTYPE_FP16),  // MQA
                                           std::make_tuple(2, 13, 8, 2, 128,
                                                           v1::DTYPE_BF16),  // GQA 8:2
                                           std::make_tuple(1, 1, 8, 2, 256, v1::DTYPE_FP32)));

TEST(AttendRequestTest, OptionsAndLayoutAreCarriedOver) {
  v1::AttendRequest r = MakeRequest(2, 7, 8, 2, 128);
  r.set_layout(v1::LAYOUT_STRIPE);
  r.set_return_lse(true);
  v1::AttentionOptions* o = r.mutable_options();
  o->set_causal(true);
  o->set_softmax_scale(0.05f);
  o->set_window_left(50);
  o->set_softcap(30.0f);
  for (int h = 0; h < 8; ++h) o->add_alibi_slopes(std::exp2(-(h + 1.0f)));
  absl::StatusOr<ValidatedAttend> v = ValidateAttendRequest(r, AttendLimits{});
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->layout, Layout::kStripe);
  EXPECT_EQ(v->ResolvedLayout(), Layout::kStripe);
  EXPECT_TRUE(v->return_lse);
  EXPECT_TRUE(v->options.causal);
  EXPECT_EQ(v->options.softmax_scale, 0.05f);
  // window_left 50 over 7 positions sees every key: clamped to the sequence (WindowSides...).
  EXPECT_EQ(v->options.window_size, std::make_pair(int64_t{7}, int64_t{-1}));
  EXPECT_EQ(v->options.softcap, 30.0f);
  ASSERT_EQ(v->options.alibi_slopes.size(), 8u);
  EXPECT_EQ(v->options.alibi_slopes[0], 0.5f);
  EXPECT_EQ(v->options.dropout_p, 0.0f);
}

// Window sides past the sequence are clamped to it (same keys, no overflow downstream: a
// window_right near INT64_MAX once overflowed the kernels' q + window_right into zero rows);
// unbounded (-1) and sides within the sequence stay as sent.
TEST(AttendRequestTest, WindowSidesPastTheSequenceAreClampedToIt) {
  struct Case {
    int64_t left, right, want_left, want_right;
  };
  for (const Case& c : {Case{INT64_MAX, INT64_MAX - 1, 37, 37}, Case{-1, 38, -1, 37},
                        Case{36, 0, 36, 0}, Case{37, -1, 37, -1}}) {
    v1::AttendRequest r = MakeRequest(1, 37, 4, 4, 64);
    r.mutable_options()->set_window_left(c.left);
    r.mutable_options()->set_window_right(c.right);
    absl::StatusOr<ValidatedAttend> v = ValidateAttendRequest(r, AttendLimits{});
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->options.window_size, std::make_pair(c.want_left, c.want_right))
        << c.left << ", " << c.right;
  }
}

TEST(AttendRequestTest, AutoLayoutIsZigzagWhenCausal) {
  v1::AttendRequest r = MakeRequest(1, 7, 5, 5, 64);
  r.mutable_options()->set_causal(true);
  absl::StatusOr<ValidatedAttend> v = ValidateAttendRequest(r, AttendLimits{});
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_FALSE(v->layout.has_value());
  EXPECT_EQ(v->ResolvedLayout(), Layout::kZigzag);
}

TEST(AttendRequestTest, NaNAndInfDataAreNotAnError) {
  v1::AttendRequest r = MakeRequest(1, 7, 2, 2, 64, v1::DTYPE_FP32);
  const float specials[] = {NAN, INFINITY, -INFINITY};
  std::string* q = r.mutable_q()->mutable_data();
  for (size_t i = 0; i < q->size() / sizeof(float); ++i) {
    std::memcpy(q->data() + i * sizeof(float), &specials[i % 3], sizeof(float));
  }
  EXPECT_TRUE(ValidateAttendRequest(r, AttendLimits{}).ok());
}

TEST(AttendRequestTest, EmptyRequestIdIsAccepted) {
  v1::AttendRequest r = MakeRequest(1, 7, 5, 5, 64);
  r.clear_request_id();
  absl::StatusOr<ValidatedAttend> v = ValidateAttendRequest(r, AttendLimits{});
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->request_id, "");
}

// ---- Streaming header ----------------------------------------------------------------------

v1::AttendRequest StripData(v1::AttendRequest r) {
  r.mutable_q()->clear_data();
  r.mutable_k()->clear_data();
  r.mutable_v()->clear_data();
  return r;
}

TEST(AttendHeaderTest, ReturnsTheExpectedBytes) {
  const v1::AttendRequest h = StripData(MakeRequest(2, 7, 8, 2, 64));
  absl::StatusOr<ValidatedAttend> v = ValidateAttendHeader(h, AttendLimits{});
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->shape.q_bytes(), 2u * 7 * 8 * 64 * 2);
  EXPECT_EQ(v->shape.kv_bytes(), 2u * 7 * 2 * 64 * 2);
  // The unary validator refuses the same header: its data is missing.
  EXPECT_EQ(ValidateAttendRequest(h, AttendLimits{}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(AttendHeaderTest, DataInTheHeaderIsInvalid) {
  v1::AttendRequest h = StripData(MakeRequest(1, 7, 5, 5, 64));
  h.mutable_k()->set_data("abc");
  absl::StatusOr<ValidatedAttend> v = ValidateAttendHeader(h, AttendLimits{});
  ASSERT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument) << v.status();
  EXPECT_THAT(std::string(v.status().message()),
              HasSubstr("k.data must be empty in an AttendStream header"));
}

TEST(AttendHeaderTest, ChecksShapesAndOptionsToo) {
  v1::AttendRequest h = StripData(MakeRequest(1, 7, 5, 2, 64));
  EXPECT_THAT(std::string(ValidateAttendHeader(h, AttendLimits{}).status().message()),
              HasSubstr("q.shape[2] (heads) 5 must be a multiple of k.shape[2] (heads_k) 2"));
  h = StripData(MakeRequest(1, 7, 5, 5, 64));
  h.mutable_options()->set_dropout_p(1.5f);
  EXPECT_THAT(std::string(ValidateAttendHeader(h, AttendLimits{}).status().message()),
              HasSubstr("options.dropout_p must be in [0, 1)"));
}

// ---- Conversions ---------------------------------------------------------------------------

TEST(ConversionTest, DTypeRoundTrips) {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16}) {
    absl::StatusOr<DType> back = DTypeFromProto(DTypeToProto(d));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, d);
  }
  absl::StatusOr<DType> bad = DTypeFromProto(v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("DTYPE_UNSPECIFIED"));
}

TEST(ConversionTest, LayoutRoundTrips) {
  for (Layout l : {Layout::kContiguous, Layout::kZigzag, Layout::kStripe}) {
    absl::StatusOr<std::optional<Layout>> back = LayoutFromProto(LayoutToProto(l));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, l);
  }
  absl::StatusOr<std::optional<Layout>> autol = LayoutFromProto(v1::LAYOUT_AUTO);
  ASSERT_TRUE(autol.ok());
  EXPECT_FALSE(autol->has_value());
  EXPECT_EQ(ResolveLayout(std::nullopt, /*causal=*/true), Layout::kZigzag);
  EXPECT_EQ(ResolveLayout(std::nullopt, /*causal=*/false), Layout::kContiguous);
  EXPECT_EQ(ResolveLayout(Layout::kStripe, /*causal=*/true), Layout::kStripe);
  EXPECT_FALSE(LayoutFromProto(static_cast<v1::Layout>(-1)).ok());
}

TEST(ConversionTest, OptionsRoundTrip) {
  RingAttentionOptions o;
  o.causal = true;
  o.softmax_scale = 0.1f;
  o.window_size = {128, 0};
  o.alibi_slopes = {0.5f, 0.25f, 0.125f};
  o.softcap = 20.0f;
  o.seq_bounds = {0, 5, 5, 100};
  const v1::AttentionOptions p = OptionsToProto(o);
  EXPECT_TRUE(p.has_window_left());
  EXPECT_TRUE(p.has_window_right());
  const RingAttentionOptions back = OptionsFromProto(p);
  EXPECT_EQ(back.causal, o.causal);
  EXPECT_EQ(back.softmax_scale, o.softmax_scale);
  EXPECT_EQ(back.window_size, o.window_size);
  EXPECT_EQ(back.alibi_slopes, o.alibi_slopes);
  EXPECT_EQ(back.softcap, o.softcap);
  EXPECT_EQ(back.dropout_p, o.dropout_p);
  EXPECT_EQ(back.seq_bounds, o.seq_bounds);
}

TEST(ConversionTest, AbsentOptionsAreDefaults) {
  const RingAttentionOptions o = OptionsFromProto(v1::AttentionOptions());
  EXPECT_FALSE(o.causal);
  EXPECT_FALSE(o.softmax_scale.has_value());
  EXPECT_EQ(o.window_size, std::make_pair(int64_t{-1}, int64_t{-1}));
  EXPECT_TRUE(o.alibi_slopes.empty());
  EXPECT_EQ(o.softcap, 0.0f);
  // And back: unbounded windows and an unset scale stay absent.
  const v1::AttentionOptions p = OptionsToProto(o);
  EXPECT_FALSE(p.has_window_left());
  EXPECT_FALSE(p.has_window_right());
  EXPECT_FALSE(p.has_softmax_scale());
  // An explicit -1 means the same as absent.
  v1::AttentionOptions explicit_unbounded;
  explicit_unbounded.set_window_left(-1);
  EXPECT_EQ(OptionsFromProto(explicit_unbounded).window_size.first, -1);
}

TEST(ConversionTest, ShardPlanToProto) {
  absl::StatusOr<ShardPlan> plan = PlanShards(7, 3, Layout::kZigzag);
  ASSERT_TRUE(plan.ok());
  const v1::ShardPlan p = ShardPlanToProto(*plan);
  EXPECT_EQ(p.layout(), v1::LAYOUT_ZIGZAG);
  EXPECT_EQ(p.world_size(), 3);
  ASSERT_EQ(p.rows_per_rank_size(), 3);
  int64_t total = 0;
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(p.rows_per_rank(r), plan->shards[r].rows);
    total += p.rows_per_rank(r);
  }
  EXPECT_EQ(total, 7);
}

// ---- Shards --------------------------------------------------------------------------------

class ShardBytesTest
    : public ::testing::TestWithParam<std::tuple<Layout, int64_t /*seqlen*/, int /*world*/>> {};

TEST_P(ShardBytesTest, ExtractThenInsertRebuildsTheWhole) {
  const auto [layout, seqlen, world] = GetParam();
  absl::StatusOr<ShardPlan> plan = PlanShards(seqlen, world, layout);
  ASSERT_TRUE(plan.ok()) << plan.status();
  constexpr int64_t kOuter = 3;     // e.g. batch
  constexpr size_t kRowBytes = 10;  // e.g. heads * head_dim * element size
  // whole: [outer, seqlen, row_bytes], every byte distinct enough to catch a misplaced row.
  std::string whole(kOuter * seqlen * kRowBytes, '\0');
  for (size_t i = 0; i < whole.size(); ++i) whole[i] = static_cast<char>(i % 251);
  std::string rebuilt(whole.size(), '\xff');
  for (int rank = 0; rank < world; ++rank) {
    const std::string shard = ExtractShardBytes(*plan, rank, whole, kOuter, kRowBytes);
    ASSERT_EQ(shard.size(), kOuter * plan->shards[rank].rows * kRowBytes);
    ASSERT_TRUE(InsertShardBytes(*plan, rank, shard, kOuter, kRowBytes, &rebuilt).ok());
  }
  EXPECT_EQ(rebuilt, whole);
}

INSTANTIATE_TEST_SUITE_P(Layouts, ShardBytesTest,
                         ::testing::Combine(::testing::Values(Layout::kContiguous, Layout::kZigzag,
                                                              Layout::kStripe),
                                            ::testing::Values(int64_t{1}, int64_t{7}, int64_t{64}),
                                            ::testing::Values(1, 2, 3, 4)));

TEST(ShardBytesHelperTest, FirstRowOfZigzagRankZero) {
  absl::StatusOr<ShardPlan> plan = PlanShards(8, 2, Layout::kZigzag);  // rank 0: rows 0,1,6,7
  ASSERT_TRUE(plan.ok());
  const std::string whole = "abcdefgh";  // [1, 8, 1]
  EXPECT_EQ(ExtractShardBytes(*plan, 0, whole, 1, 1), "abgh");
  EXPECT_EQ(ExtractShardBytes(*plan, 1, whole, 1, 1), "cdef");
}

TEST(ShardBytesHelperTest, WrongShardSizeIsInternalAndWritesNothing) {
  absl::StatusOr<ShardPlan> plan = PlanShards(7, 2, Layout::kContiguous);
  ASSERT_TRUE(plan.ok());
  std::string whole(7 * 4, 'x');
  absl::Status s = InsertShardBytes(*plan, 1, std::string(5, 'y'), 1, 4, &whole);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(s.message()), HasSubstr("shard of rank 1 has 5 bytes; expected 12"));
  EXPECT_EQ(whole, std::string(7 * 4, 'x'));
  std::string short_whole(3, 'x');
  EXPECT_EQ(InsertShardBytes(*plan, 0, std::string(16, 'y'), 1, 4, &short_whole).code(),
            absl::StatusCode::kInternal);
  EXPECT_EQ(InsertShardBytes(*plan, 2, std::string(), 1, 4, &whole).code(),
            absl::StatusCode::kInternal);
}

// The LSE view: [batch, heads, seq] fp32 is outer = batch * heads, row_bytes = 4.
TEST(ShardBytesHelperTest, LseViewRoundTrips) {
  absl::StatusOr<ShardPlan> plan = PlanShards(7, 3, Layout::kStripe);
  ASSERT_TRUE(plan.ok());
  const int64_t outer = 2 * 5;
  std::vector<float> lse(outer * 7);
  std::iota(lse.begin(), lse.end(), 0.0f);
  std::string whole(reinterpret_cast<const char*>(lse.data()), lse.size() * sizeof(float));
  std::string rebuilt(whole.size(), '\0');
  for (int r = 0; r < 3; ++r) {
    ASSERT_TRUE(
        InsertShardBytes(*plan, r, ExtractShardBytes(*plan, r, whole, outer, 4), outer, 4, &rebuilt)
            .ok());
  }
  EXPECT_EQ(rebuilt, whole);
}

// ---- Status conversion ---------------------------------------------------------------------

TEST(StatusUtilTest, EveryCodeRoundTripsWithItsMessage) {
  for (int c = 1; c <= 16; ++c) {
    const absl::Status s(static_cast<absl::StatusCode>(c), "field x must be y");
    const grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), c);
    EXPECT_EQ(g.error_message(), "field x must be y");
    EXPECT_EQ(FromGrpcStatus(g), s);
  }
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
  EXPECT_EQ(ToGrpcStatus(absl::InvalidArgumentError("q is missing")).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::UNAVAILABLE, "worker 2 lost")),
            absl::UnavailableError("worker 2 lost"));
}

}  // namespace
}  // namespace ringattn
