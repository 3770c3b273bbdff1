// The chunk protocol: a stream cut by ChunkCursor reassembles to the same bytes, and every breach
// of the protocol is refused with the receiver's code, naming the tensor and the offset or size.
#include "proto/chunk_codec.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "base/status_macros.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;
using Which = v1::TensorChunk;

v1::AttendStreamRequest Header() {
  v1::AttendStreamRequest m;
  v1::AttendRequest* h = m.mutable_header();
  h->set_request_id("r");
  h->set_return_lse(true);
  h->mutable_q()->set_dtype(v1::DTYPE_FP32);
  h->mutable_q()->add_shape(3);
  h->mutable_k()->set_dtype(v1::DTYPE_FP32);
  return m;
}

v1::AttendStreamRequest Chunk(Which::Which which, int64_t offset, const std::string& data) {
  v1::AttendStreamRequest m;
  m.mutable_chunk()->set_tensor(which);
  m.mutable_chunk()->set_offset(offset);
  m.mutable_chunk()->set_data(data);
  return m;
}

// Expects q (10 bytes) and k (4 bytes).
absl::Status ExpectQk(StreamAssembler<v1::AttendStreamRequest>& a, v1::AttendRequest* h) {
  if (absl::Status s = a.chunks().Expect(Which::WHICH_Q, "q", h->mutable_q(), 10); !s.ok()) {
    return s;
  }
  return a.chunks().Expect(Which::WHICH_K, "k", h->mutable_k(), 4);
}

// Feeds `messages` to a fresh assembler; the first error, or Finish's status.
absl::Status Feed(std::vector<v1::AttendStreamRequest> messages,
                  absl::StatusCode code = absl::StatusCode::kInvalidArgument) {
  StreamAssembler<v1::AttendStreamRequest> a("AttendStream request", code);
  for (v1::AttendStreamRequest& m : messages) {
    absl::Status s = a.Add(&m, [&](v1::AttendRequest* h) { return ExpectQk(a, h); });
    if (!s.ok()) return s;
  }
  return a.Finish();
}

TEST(ChunkCodecTest, CursorAndAssemblerRoundTrip) {
  const std::string q = "0123456789";
  const std::string k = "abcd";
  const std::string empty;
  for (int64_t chunk_bytes : {1, 3, 4, 100}) {
    SCOPED_TRACE(chunk_bytes);
    ChunkCursor cursor({{Which::WHICH_Q, q}, {Which::WHICH_LSE, empty}, {Which::WHICH_K, k}},
                       chunk_bytes);
    EXPECT_EQ(cursor.total_bytes(), 14);
    StreamAssembler<v1::AttendStreamRequest> a("AttendStream request",
                                               absl::StatusCode::kInvalidArgument);
    v1::AttendStreamRequest header = Header();
    ASSERT_TRUE(a.Add(&header, [&](v1::AttendRequest* h) { return ExpectQk(a, h); }).ok());
    v1::AttendStreamRequest m;
    int chunks = 0;
    while (cursor.Next(m.mutable_chunk())) {
      EXPECT_LE(static_cast<int64_t>(m.chunk().data().size()), chunk_bytes);
      ASSERT_TRUE(a.Add(&m, [](v1::AttendRequest*) { return absl::OkStatus(); }).ok());
      ++chunks;
    }
    EXPECT_EQ(chunks, (10 + chunk_bytes - 1) / chunk_bytes + (4 + chunk_bytes - 1) / chunk_bytes);
    ASSERT_TRUE(a.Finish().ok()) << a.Finish();
    EXPECT_EQ(a.header()->q().data(), q);
    EXPECT_EQ(a.header()->k().data(), k);
    EXPECT_EQ(a.header()->request_id(), "r");
    EXPECT_EQ(a.chunks().received_bytes(), 14);
    EXPECT_EQ(a.chunks().expected_bytes(), 14);
  }
}

// Chunks of a tensor announced with ExpectInto land in the caller's memory, in order, and the
// same breaches are refused before a byte is written past the tensor.
TEST(ChunkCodecTest, ExpectIntoLandsChunksInCallersMemory) {
  std::string landing(12, '.');  // q at [0, 10), two guard bytes
  StreamAssembler<v1::AttendStreamRequest> a("AttendStream request",
                                             absl::StatusCode::kInvalidArgument);
  v1::AttendStreamRequest header = Header();
  ASSERT_TRUE(a.Add(&header, [&](v1::AttendRequest* h) -> absl::Status {
                 RA_RETURN_IF_ERROR(
                     a.chunks().ExpectInto(Which::WHICH_Q, "q", h->q(), landing.data(), 10));
                 return a.chunks().Expect(Which::WHICH_K, "k", h->mutable_k(), 4);
               }).ok());
  for (v1::AttendStreamRequest m : {Chunk(Which::WHICH_Q, 0, "0123"), Chunk(Which::WHICH_K, 0, "ab"),
                                    Chunk(Which::WHICH_Q, 4, "456789"),
                                    Chunk(Which::WHICH_K, 2, "cd")}) {
    ASSERT_TRUE(a.Add(&m, [](v1::AttendRequest*) { return absl::OkStatus(); }).ok());
  }
  v1::AttendStreamRequest past = Chunk(Which::WHICH_Q, 10, "X");
  const absl::Status s = a.Add(&past, [](v1::AttendRequest*) { return absl::OkStatus(); });
  EXPECT_THAT(std::string(s.message()), HasSubstr("q chunks exceed the 10 bytes"));
  EXPECT_EQ(landing, "0123456789..");
  EXPECT_TRUE(a.header()->q().data().empty());
  EXPECT_EQ(a.header()->k().data(), "abcd");
  EXPECT_TRUE(a.Finish().ok()) << a.Finish();
  EXPECT_EQ(a.chunks().received_bytes(), 14);

  std::string short_landing(10, '.');
  StreamAssembler<v1::AttendStreamRequest> b("AttendStream request",
                                             absl::StatusCode::kInvalidArgument);
  v1::AttendStreamRequest h2 = Header();
  ASSERT_TRUE(b.Add(&h2, [&](v1::AttendRequest* h) {
                 return b.chunks().ExpectInto(Which::WHICH_Q, "q", h->q(), short_landing.data(),
                                              10);
               }).ok());
  v1::AttendStreamRequest part = Chunk(Which::WHICH_Q, 0, "0123456");
  ASSERT_TRUE(b.Add(&part, [](v1::AttendRequest*) { return absl::OkStatus(); }).ok());
  EXPECT_THAT(std::string(b.Finish().message()), HasSubstr("incomplete: q has 7 of the 10 bytes"));
}

// A strided view (some bytes of every row) goes out as contiguous chunks of any size and lands
// in another strided view, touching nothing between its rows.
TEST(ChunkCodecTest, StridedRowsGoOutAndLandInPlace) {
  std::string whole = "abcdefghijklmnopqrstuvwx";  // 4 rows of 6; the view: bytes 2-4 of each
  const StridedRows from{whole.data() + 2, 4, 3, 6};
  for (int64_t chunk_bytes : {1, 2, 5, 100}) {
    SCOPED_TRACE(chunk_bytes);
    ChunkCursor cursor({{Which::WHICH_Q, {}, from}}, chunk_bytes);
    EXPECT_EQ(cursor.total_bytes(), 12);
    std::string landing(20, '.');  // 4 rows of 5; lands at bytes 1-3 of each
    StreamAssembler<v1::AttendStreamRequest> a("AttendStream request",
                                               absl::StatusCode::kInvalidArgument);
    v1::AttendStreamRequest header = Header();
    ASSERT_TRUE(a.Add(&header, [&](v1::AttendRequest* h) {
                   return a.chunks().ExpectInto(Which::WHICH_Q, "q", h->q(),
                                                StridedRows{landing.data() + 1, 4, 3, 5});
                 }).ok());
    v1::AttendStreamRequest m;
    while (cursor.Next(m.mutable_chunk())) {
      ASSERT_TRUE(a.Add(&m, [](v1::AttendRequest*) { return absl::OkStatus(); }).ok());
    }
    ASSERT_TRUE(a.Finish().ok()) << a.Finish();
    EXPECT_EQ(landing, ".cde..ijk..opq..uvw.");
  }
}

TEST(ChunkCodecTest, BreachesNameTheTensorAndOffset) {
  v1::AttendStreamRequest with_data = Header();
  with_data.mutable_header()->mutable_k()->set_data("zz");
  const struct {
    const char* name;
    std::vector<v1::AttendStreamRequest> messages;
    const char* expect;
  } cases[] = {
      {"nothing", {}, "AttendStream request: must start with a header message; got no message"},
      {"chunk first",
       {Chunk(Which::WHICH_Q, 0, "ab")},
       "must start with a header message; got a chunk before the header"},
      {"second header", {Header(), Header()}, "a second header; only one header is allowed"},
      {"data in the header", {with_data}, "header carries tensor data: 2 bytes of k"},
      {"tensor not taken",
       {Header(), Chunk(Which::WHICH_DQ, 0, "ab")},
       "chunk.tensor WHICH_DQ is not one this call takes (q, k)"},
      {"offset out of order",
       {Header(), Chunk(Which::WHICH_Q, 0, "ab"), Chunk(Which::WHICH_Q, 3, "c")},
       "q chunk at offset 3, expected 2"},
      {"too many bytes",
       {Header(), Chunk(Which::WHICH_K, 0, "abc"), Chunk(Which::WHICH_K, 3, "de")},
       "k chunks exceed the 4 bytes its shape needs (chunk at offset 3 of 2 bytes)"},
      {"short tensor",
       {Header(), Chunk(Which::WHICH_Q, 0, "0123456")},
       "incomplete: q has 7 of the 10 bytes its shape needs"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const absl::Status s = Feed(c.messages);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.expect));
  }
  // The client's receiver: the same checks, its own code.
  EXPECT_EQ(Feed({Header(), Chunk(Which::WHICH_Q, 1, "a")}, absl::StatusCode::kInternal).code(),
            absl::StatusCode::kInternal);
}

// A header declaring gigabytes holds at most 64 MiB until chunks arrive; the chunks then grow
// the tensor to exactly its bytes.
TEST(ChunkCodecTest, MemoryFollowsTheDataNotTheDeclaredSize) {
  ChunkAssembler a("test", absl::StatusCode::kInvalidArgument);
  v1::Tensor big, small;
  ASSERT_TRUE(a.Expect(v1::TensorChunk::WHICH_Q, "q", &big, int64_t{4} << 30).ok());
  EXPECT_LE(big.data().capacity(), size_t{64} << 20);
  ASSERT_TRUE(a.Expect(v1::TensorChunk::WHICH_K, "k", &small, 5).ok());
  EXPECT_GE(small.data().capacity(), 5u);
  v1::TensorChunk c;
  c.set_tensor(v1::TensorChunk::WHICH_K);
  c.set_data("abcde");
  ASSERT_TRUE(a.AddChunk(c).ok());
  EXPECT_EQ(small.data(), "abcde");
}

TEST(ChunkCodecTest, HeaderOfKeepsShapesAndDropsData) {
  v1::AttendBackwardRequest r;
  r.set_request_id("id");
  r.set_layout(v1::LAYOUT_STRIPE);
  r.mutable_options()->set_causal(true);
  r.mutable_q()->set_dtype(v1::DTYPE_BF16);
  r.mutable_q()->add_shape(1);
  r.mutable_q()->add_shape(2);
  r.mutable_q()->set_data("data");
  r.mutable_lse()->set_data("lse");
  const v1::AttendBackwardRequest h = HeaderOf(r);
  EXPECT_EQ(h.request_id(), "id");
  EXPECT_EQ(h.layout(), v1::LAYOUT_STRIPE);
  EXPECT_TRUE(h.options().causal());
  ASSERT_TRUE(h.has_q());
  EXPECT_EQ(h.q().dtype(), v1::DTYPE_BF16);
  EXPECT_THAT(h.q().shape(), ::testing::ElementsAre(1, 2));
  EXPECT_TRUE(h.q().data().empty());
  EXPECT_TRUE(h.has_lse());
  EXPECT_TRUE(h.lse().data().empty());
  EXPECT_FALSE(h.has_k());  // absent stays absent
  EXPECT_FALSE(h.has_dout());
}

}  // namespace
}  // namespace ringattn
