// The client's shared-memory pieces without a service: an owned region (created exclusively,
// mode 0600, unlinked on destruction) and the placement of a request's tensors in one region
// (aligned, non-overlapping slots of the right sizes; the bytes' round trip both ways).
#include "client/shared_memory_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/shared_memory.h"
#include "client/shared_memory_placement.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;

// ---- The region -------------------------------------------------------------------------------

TEST(SharedMemoryRegionTest, CreatesAZeroedPrivateObjectThatOthersCanMap) {
  const std::string key = MakeSharedMemoryKey();
  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> region =
      SharedMemoryRegion::Create(key, 5000);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ((*region)->key(), key);
  EXPECT_EQ((*region)->size(), 5000);
  for (int i = 0; i < 5000; ++i) ASSERT_EQ((*region)->data()[i], 0) << i;

  // Mode 0600, exactly the asked size.
  const int fd = shm_open(key.c_str(), O_RDONLY, 0);
  ASSERT_GE(fd, 0);
  struct stat st;
  ASSERT_EQ(fstat(fd, &st), 0);
  close(fd);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(st.st_size, 5000);

  // Another mapping of the object (as the service makes one) sees the writes, both ways.
  absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> other =
      SharedMemoryMapping::Open(key, 4000, 1000, "other");
  ASSERT_TRUE(other.ok()) << other.status();
  (*region)->data()[4321] = 17;
  EXPECT_EQ((*other)->data()[321], 17);
  (*other)->data()[999] = 42;
  EXPECT_EQ((*region)->data()[4999], 42);
}

TEST(SharedMemoryRegionTest, DestructionUnlinksTheName) {
  const std::string key = MakeSharedMemoryKey();
  {
    absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> region =
        SharedMemoryRegion::Create(key, 64);
    ASSERT_TRUE(region.ok()) << region.status();
  }
  errno = 0;
  EXPECT_LT(shm_open(key.c_str(), O_RDONLY, 0), 0);
  EXPECT_EQ(errno, ENOENT);
  EXPECT_EQ(SharedMemoryMapping::Open(key, 0, 64, "r").status().code(),
            absl::StatusCode::kNotFound);
  // The name is free again.
  EXPECT_TRUE(SharedMemoryRegion::Create(key, 64).ok());
}

TEST(SharedMemoryRegionTest, RefusesAnExistingNameBadKeysAndSizes) {
  const std::string key = MakeSharedMemoryKey();
  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> first = SharedMemoryRegion::Create(key, 64);
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> second = SharedMemoryRegion::Create(key, 64);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kAlreadyExists) << second.status();
  EXPECT_THAT(second.status().message(), HasSubstr(key));
  // The refused second creation leaves the first object alone.
  (*first)->data()[0] = 5;
  EXPECT_EQ(SharedMemoryMapping::Open(key, 0, 64, "r").value()->data()[0], 5);

  for (const std::string bad : {"", "/", "noslash", "/a/b"}) {
    EXPECT_EQ(SharedMemoryRegion::Create(bad, 64).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
  for (const int64_t size : {int64_t{0}, int64_t{-1}}) {
    EXPECT_EQ(SharedMemoryRegion::Create(MakeSharedMemoryKey(), size).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

TEST(SharedMemoryRegionTest, KeysAreDistinctNamesOfThisProcess) {
  std::set<std::string> keys;
  for (int i = 0; i < 100; ++i) {
    const std::string key = MakeSharedMemoryKey();
    EXPECT_TRUE(absl::StartsWith(key, absl::StrCat("/ringattn_", getpid(), "_"))) << key;
    EXPECT_TRUE(CheckSharedMemoryKey(key, "key").ok()) << key;
    keys.insert(key);
  }
  EXPECT_EQ(keys.size(), 100u);
}

// ---- The placement ----------------------------------------------------------------------------

// A tensor of `shape` and `dtype` whose byte i is (seed + 7 i) mod 251.
v1::Tensor PatternTensor(v1::DType dtype, std::vector<int64_t> shape, int seed) {
  v1::Tensor t;
  t.set_dtype(dtype);
  int64_t bytes = dtype == v1::DTYPE_FP32 ? 4 : 2;
  for (const int64_t d : shape) {
    t.add_shape(d);
    bytes *= d;
  }
  std::string* data = t.mutable_data();
  data->resize(static_cast<size_t>(bytes));
  for (int64_t i = 0; i < bytes; ++i) (*data)[i] = static_cast<char>((seed + 7 * i) % 251);
  return t;
}

// Attend over q [batch, seq, heads, dim] and k, v [batch, seq, heads_k, dim] of `dtype`.
v1::AttendRequest AttendOf(v1::DType dtype, int64_t batch, int64_t seq, int64_t heads,
                           int64_t heads_k, int64_t dim, bool return_lse) {
  v1::AttendRequest r;
  r.set_request_id("placed");
  *r.mutable_q() = PatternTensor(dtype, {batch, seq, heads, dim}, 1);
  *r.mutable_k() = PatternTensor(dtype, {batch, seq, heads_k, dim}, 2);
  *r.mutable_v() = PatternTensor(dtype, {batch, seq, heads_k, dim}, 3);
  r.mutable_options()->set_causal(true);
  r.set_layout(v1::LAYOUT_ZIGZAG);
  r.set_return_lse(return_lse);
  return r;
}

// The slots by name, and that they are aligned, within bytes() and pairwise disjoint.
std::map<std::string, SharedMemoryPlacement::Slot> CheckedSlots(const SharedMemoryPlacement& p) {
  std::vector<SharedMemoryPlacement::Slot> all = p.inputs();
  all.insert(all.end(), p.outputs().begin(), p.outputs().end());
  std::map<std::string, SharedMemoryPlacement::Slot> by_name;
  for (const SharedMemoryPlacement::Slot& s : all) {
    EXPECT_EQ(s.offset % kSharedMemoryAlignment, 0) << s.name;
    EXPECT_GE(s.offset, 0) << s.name;
    EXPECT_LE(s.offset + s.byte_size, p.bytes()) << s.name;
    EXPECT_TRUE(by_name.emplace(s.name, s).second) << "two slots named " << s.name;
  }
  std::sort(all.begin(), all.end(),
            [](const auto& a, const auto& b) { return a.offset < b.offset; });
  for (size_t i = 1; i < all.size(); ++i) {
    EXPECT_LE(all[i - 1].offset + all[i - 1].byte_size, all[i].offset)
        << all[i - 1].name << " overlaps " << all[i].name;
  }
  EXPECT_EQ(p.bytes() % kSharedMemoryAlignment, 0);
  return by_name;
}

// A request's placement and a region of its size.
struct Placed {
  SharedMemoryPlacement placement;
  std::unique_ptr<SharedMemoryRegion> region;
  absl::Span<char> bytes() const {
    return absl::Span<char>(region->data(), static_cast<size_t>(region->size()));
  }
};

absl::StatusOr<Placed> PlaceInNewRegion(const v1::AttendRequest& request) {
  absl::StatusOr<SharedMemoryPlacement> p = SharedMemoryPlacement::Of(request);
  if (!p.ok()) return p.status();
  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> region =
      SharedMemoryRegion::Create(MakeSharedMemoryKey(), p->bytes());
  if (!region.ok()) return region.status();
  return Placed{*std::move(p), *std::move(region)};
}

std::vector<std::string> Names(const std::vector<SharedMemoryPlacement::Slot>& slots) {
  std::vector<std::string> names;
  for (const auto& s : slots) names.push_back(s.name);
  return names;
}

TEST(SharedMemoryPlacementTest, SizesGqaSlotsAndAsksForTheLseOnlyWhenWanted) {
  // fp16 q [2, 37, 5, 64] = 47360 bytes; k, v [2, 37, 1, 64] = 9472; lse [2, 5, 37] fp32 = 1480.
  for (const bool lse : {false, true}) {
    absl::StatusOr<SharedMemoryPlacement> p =
        SharedMemoryPlacement::Of(AttendOf(v1::DTYPE_FP16, 2, 37, 5, 1, 64, lse));
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_THAT(Names(p->inputs()), ::testing::ElementsAre("q", "k", "v"));
    if (lse) {
      EXPECT_THAT(Names(p->outputs()), ::testing::ElementsAre("out", "lse"));
    } else {
      EXPECT_THAT(Names(p->outputs()), ::testing::ElementsAre("out"));
    }
    std::map<std::string, SharedMemoryPlacement::Slot> slots = CheckedSlots(*p);
    EXPECT_EQ(slots["q"].byte_size, 2 * 37 * 5 * 64 * 2);
    EXPECT_EQ(slots["k"].byte_size, 2 * 37 * 1 * 64 * 2);
    EXPECT_EQ(slots["v"].byte_size, 2 * 37 * 1 * 64 * 2);
    EXPECT_EQ(slots["out"].byte_size, 2 * 37 * 5 * 64 * 2);
    if (lse) EXPECT_EQ(slots["lse"].byte_size, 2 * 5 * 37 * 4);
    // Packed: nothing but the alignment between slots.
    const int64_t payload = 47360 * 2 + 9472 * 2 + (lse ? 1480 : 0);
    EXPECT_GE(p->bytes(), payload);
    EXPECT_LT(p->bytes(), payload + 5 * kSharedMemoryAlignment);
  }
}

TEST(SharedMemoryPlacementTest, OddSizesStayAligned) {
  // fp32 q [1, 7, 3, 8] = 672 bytes (not a multiple of 256), k/v [1, 7, 1, 8] = 224, lse 84.
  absl::StatusOr<SharedMemoryPlacement> p =
      SharedMemoryPlacement::Of(AttendOf(v1::DTYPE_FP32, 1, 7, 3, 1, 8, true));
  ASSERT_TRUE(p.ok()) << p.status();
  std::map<std::string, SharedMemoryPlacement::Slot> slots = CheckedSlots(*p);
  EXPECT_EQ(slots["q"].offset, 0);
  EXPECT_EQ(slots["k"].offset, 768);  // 672 rounded up to 256
  EXPECT_EQ(slots["lse"].byte_size, 84);
}

TEST(SharedMemoryPlacementTest, PlacesInputsAndCollectsOutputsThroughTheRegion) {
  const v1::AttendRequest request = AttendOf(v1::DTYPE_BF16, 1, 37, 5, 1, 64, true);
  absl::StatusOr<Placed> placed = PlaceInNewRegion(request);
  ASSERT_TRUE(placed.ok()) << placed.status();
  const SharedMemoryPlacement& p = placed->placement;
  const absl::Span<char> bytes = placed->bytes();

  absl::StatusOr<v1::AttendRequest> sent = p.Place(request, "mine", bytes);
  ASSERT_TRUE(sent.ok()) << sent.status();
  // Everything but the tensors' bytes as in the request.
  EXPECT_EQ(sent->request_id(), "placed");
  EXPECT_TRUE(sent->options().causal());
  EXPECT_EQ(sent->layout(), v1::LAYOUT_ZIGZAG);
  EXPECT_TRUE(sent->return_lse());
  std::map<std::string, SharedMemoryPlacement::Slot> slots = CheckedSlots(p);

  // What the service sees through its own mapping: each input at its ref.
  absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> service =
      SharedMemoryMapping::Open(placed->region->key(), 0, p.bytes(), "service");
  ASSERT_TRUE(service.ok()) << service.status();
  for (const auto& [name, tensor, as_sent] :
       {std::tuple{"q", &request.q(), &sent->q()}, std::tuple{"k", &request.k(), &sent->k()},
        std::tuple{"v", &request.v(), &sent->v()}}) {
    EXPECT_TRUE(as_sent->data().empty()) << name;
    EXPECT_EQ(as_sent->dtype(), tensor->dtype()) << name;
    EXPECT_EQ(as_sent->shape_size(), 4) << name;
    EXPECT_EQ(as_sent->shm().region(), "mine") << name;
    EXPECT_EQ(as_sent->shm().offset(), slots[name].offset) << name;
    EXPECT_EQ(as_sent->shm().byte_size(), static_cast<int64_t>(tensor->data().size())) << name;
    EXPECT_EQ(std::string((*service)->data() + as_sent->shm().offset(), tensor->data().size()),
              tensor->data())
        << name;
  }
  ASSERT_EQ(sent->output_shm_size(), 2);
  for (const char* name : {"out", "lse"}) {
    const v1::SharedMemoryRef& ref = sent->output_shm().at(name);
    EXPECT_EQ(ref.region(), "mine");
    EXPECT_EQ(ref.offset(), slots[name].offset);
    EXPECT_EQ(ref.byte_size(), slots[name].byte_size);
  }

  // The service writes out and lse at their refs and answers with dtype and shape only.
  const v1::Tensor out = PatternTensor(v1::DTYPE_BF16, {1, 37, 5, 64}, 11);
  const v1::Tensor lse = PatternTensor(v1::DTYPE_FP32, {1, 5, 37}, 12);
  std::memcpy((*service)->data() + sent->output_shm().at("out").offset(), out.data().data(),
              out.data().size());
  std::memcpy((*service)->data() + sent->output_shm().at("lse").offset(), lse.data().data(),
              lse.data().size());
  v1::AttendResponse response;
  *response.mutable_out() = out;
  response.mutable_out()->clear_data();
  *response.mutable_lse() = lse;
  response.mutable_lse()->clear_data();
  ASSERT_TRUE(p.Collect(bytes, &response).ok());
  EXPECT_EQ(response.out().data(), out.data());
  EXPECT_EQ(response.lse().data(), lse.data());
}

TEST(SharedMemoryPlacementTest, BackwardPlacesSixInputsAndThreeGradients) {
  // q [1, 37, 5, 64] fp32 and GQA k, v [1, 37, 1, 64].
  const v1::AttendRequest forward = AttendOf(v1::DTYPE_FP32, 1, 37, 5, 1, 64, true);
  v1::AttendBackwardRequest request;
  *request.mutable_q() = forward.q();
  *request.mutable_k() = forward.k();
  *request.mutable_v() = forward.v();
  *request.mutable_out() = PatternTensor(v1::DTYPE_FP32, {1, 37, 5, 64}, 4);
  *request.mutable_dout() = PatternTensor(v1::DTYPE_FP32, {1, 37, 5, 64}, 5);
  *request.mutable_lse() = PatternTensor(v1::DTYPE_FP32, {1, 5, 37}, 6);
  absl::StatusOr<SharedMemoryPlacement> p = SharedMemoryPlacement::Of(request);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_THAT(Names(p->inputs()), ::testing::ElementsAre("q", "k", "v", "out", "dout", "lse"));
  EXPECT_THAT(Names(p->outputs()), ::testing::ElementsAre("dq", "dk", "dv"));
  std::map<std::string, SharedMemoryPlacement::Slot> slots = CheckedSlots(*p);
  EXPECT_EQ(slots["dq"].byte_size, 37 * 5 * 64 * 4);
  EXPECT_EQ(slots["dk"].byte_size, 37 * 1 * 64 * 4);
  EXPECT_EQ(slots["dv"].byte_size, 37 * 1 * 64 * 4);
  EXPECT_EQ(slots["lse"].byte_size, 5 * 37 * 4);

  std::vector<char> region(static_cast<size_t>(p->bytes()));
  absl::StatusOr<v1::AttendBackwardRequest> sent =
      p->Place(request, "grads", absl::MakeSpan(region));
  ASSERT_TRUE(sent.ok()) << sent.status();
  EXPECT_TRUE(sent->dout().data().empty());
  EXPECT_EQ(std::string(region.data() + sent->dout().shm().offset(), request.dout().data().size()),
            request.dout().data());
  EXPECT_EQ(sent->output_shm().size(), 3u);

  // Gradients written at their refs come back in the response.
  v1::AttendBackwardResponse response;
  for (const auto& [name, like, seed] :
       {std::tuple{"dq", &request.q(), 21}, std::tuple{"dk", &request.k(), 22},
        std::tuple{"dv", &request.v(), 23}}) {
    const v1::Tensor g = PatternTensor(
        v1::DTYPE_FP32, std::vector<int64_t>(like->shape().begin(), like->shape().end()), seed);
    std::memcpy(region.data() + sent->output_shm().at(name).offset(), g.data().data(),
                g.data().size());
    v1::Tensor* t = name == std::string("dq")   ? response.mutable_dq()
                    : name == std::string("dk") ? response.mutable_dk()
                                                : response.mutable_dv();
    *t = g;
    t->clear_data();
  }
  ASSERT_TRUE(p->Collect(absl::MakeConstSpan(region), &response).ok());
  EXPECT_EQ(response.dq().data(), PatternTensor(v1::DTYPE_FP32, {1, 37, 5, 64}, 21).data());
  EXPECT_EQ(response.dv().data(), PatternTensor(v1::DTYPE_FP32, {1, 37, 1, 64}, 23).data());
}

TEST(SharedMemoryPlacementTest, RefusesInconsistentRequestsRegionsAndResponses) {
  v1::AttendRequest request = AttendOf(v1::DTYPE_FP32, 1, 7, 3, 1, 8, false);
  // An input whose bytes do not match its shape.
  v1::AttendRequest short_k = request;
  short_k.mutable_k()->mutable_data()->pop_back();
  absl::StatusOr<SharedMemoryPlacement> bad = SharedMemoryPlacement::Of(short_k);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("k has 223 bytes"));
  // q that does not give the output's size.
  v1::AttendRequest flat_q = request;
  flat_q.mutable_q()->clear_shape();
  flat_q.mutable_q()->add_shape(168);
  EXPECT_EQ(SharedMemoryPlacement::Of(flat_q).status().code(), absl::StatusCode::kOk);
  flat_q.set_return_lse(true);
  EXPECT_THAT(SharedMemoryPlacement::Of(flat_q).status().message(), HasSubstr("cannot size lse"));

  absl::StatusOr<SharedMemoryPlacement> p = SharedMemoryPlacement::Of(request);
  ASSERT_TRUE(p.ok()) << p.status();
  std::vector<char> region(static_cast<size_t>(p->bytes()));
  // A region too small, another request's inputs.
  EXPECT_THAT(
      p->Place(request, "r", absl::MakeSpan(region.data(), region.size() - 1)).status().message(),
      HasSubstr("need"));
  v1::AttendRequest other = AttendOf(v1::DTYPE_FP32, 1, 8, 3, 1, 8, false);
  EXPECT_EQ(p->Place(other, "r", absl::MakeSpan(region)).status().code(),
            absl::StatusCode::kInvalidArgument);
  v1::AttendRequest without_v = request;
  without_v.clear_v();
  EXPECT_THAT(p->Place(without_v, "r", absl::MakeSpan(region)).status().message(),
              HasSubstr("request v is absent"));

  // A response that carries the output anyway, or one of another shape.
  v1::AttendResponse with_data;
  *with_data.mutable_out() = request.q();
  EXPECT_EQ(p->Collect(absl::MakeConstSpan(region), &with_data).code(),
            absl::StatusCode::kInternal);
  v1::AttendResponse wrong_shape;
  *wrong_shape.mutable_out() = request.k();
  wrong_shape.mutable_out()->clear_data();
  absl::Status s = p->Collect(absl::MakeConstSpan(region), &wrong_shape);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("its shared-memory slot has 672"));
}

TEST(SharedMemoryPlacementTest, ARegionTruncatedUnderTheCopyIsAFailedPrecondition) {
  const v1::AttendRequest request = AttendOf(v1::DTYPE_FP32, 1, 64, 4, 4, 64, false);
  absl::StatusOr<Placed> placed = PlaceInNewRegion(request);
  ASSERT_TRUE(placed.ok()) << placed.status();
  const int fd = shm_open(placed->region->key().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 0), 0);  // another process of this user shrinks it
  close(fd);
  const absl::StatusOr<v1::AttendRequest> sent =
      placed->placement.Place(request, "r", placed->bytes());
  EXPECT_EQ(sent.status().code(), absl::StatusCode::kFailedPrecondition) << sent.status();
}

}  // namespace
}  // namespace ringattn
