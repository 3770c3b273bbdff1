// System shared memory through the service end to end: a client's POSIX shared-memory object
// registered with the coordinator, requests that refer to it for their inputs and outputs, real
// `ringattn worker` processes reading and writing it themselves (or, with --shared_memory=false,
// the coordinator moving the bytes for them); checked against the fp64 reference and against
// the same request with bytes. Bad regions and references are refused naming the field while the
// service keeps serving.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <climits>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ringattn_config.h"
#if RINGATTN_SHM_GPU
#include <cuda_runtime_api.h>
#endif
#include "base/error_metrics.h"
#include "base/shared_memory.h"
#include "base/shm_test_object.h"
#include "gtest/gtest.h"
#include "kernels/cpu/reference_attention.h"
#include "ringattn/v1/attention.grpc.pb.h"
#include "server/coordinator.h"
#include "client/attention_client.h"
#include "client/shared_memory_session.h"
#include "tests/service_fixture.h"

namespace ringattn {
namespace {

using test::MakeRequest;
using test::Shape;
using test::WorkerBinary;

// A client's shared-memory object, mapped, unlinked at the end.
class ClientObject : public test::ShmObject {
 public:
  explicit ClientObject(int64_t bytes)
      : ShmObject(bytes), mapping_(SharedMemoryMapping::Open(key(), 0, bytes, "test").value()) {}
  char* data() { return mapping_->data(); }

 private:
  std::shared_ptr<SharedMemoryMapping> mapping_;
};

// Lays tensors out one after another (64-byte aligned) in a region.
class Placer {
 public:
  Placer(ClientObject* obj, std::string region) : obj_(obj), region_(std::move(region)) {}
  // Moves t's data into the region and refers to it.
  void Input(v1::Tensor* t) {
    v1::SharedMemoryRef* ref = t->mutable_shm();
    Take(static_cast<int64_t>(t->data().size()), ref);
    std::memcpy(obj_->data() + ref->offset(), t->data().data(), t->data().size());
    t->clear_data();
  }
  // Room for an output of `bytes`.
  v1::SharedMemoryRef Output(int64_t bytes) {
    v1::SharedMemoryRef ref;
    Take(bytes, &ref);
    std::memset(obj_->data() + ref.offset(), 0x7f, bytes);  // not what any result would be
    return ref;
  }
  std::string Read(const v1::SharedMemoryRef& ref) const {
    return std::string(obj_->data() + ref.offset(), ref.byte_size());
  }

 private:
  void Take(int64_t bytes, v1::SharedMemoryRef* ref) {
    ref->set_region(region_);
    ref->set_offset(next_);
    ref->set_byte_size(bytes);
    next_ = (next_ + bytes + 63) / 64 * 64;
    EXPECT_LE(next_, obj_->bytes());
  }
  ClientObject* obj_;
  std::string region_;
  int64_t next_ = 0;
};

class ShmService : public test::LocalService {
 public:
  ShmService(int world, bool workers_map, const std::string& kernel = "cpu")
      : LocalService(world, {}, kernel,
                     workers_map ? std::vector<std::string>{}
                                 : std::vector<std::string>{"--shared_memory=false"}) {
    if (!start_status().ok()) return;
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(INT_MAX);
    args.SetMaxSendMessageSize(INT_MAX);
    stub_ = v1::AttentionService::NewStub(
        grpc::CreateCustomChannel(address(), grpc::InsecureChannelCredentials(), args));
  }
  ~ShmService() { Stop(); }

  grpc::Status Register(const std::string& name, const ClientObject& obj, int64_t offset = 0,
                        int64_t bytes = -1) {
    v1::RegisterSystemSharedMemoryRequest r;
    r.set_name(name);
    r.set_key(obj.key());
    r.set_offset(offset);
    r.set_byte_size(bytes < 0 ? obj.bytes() - offset : bytes);
    v1::RegisterSystemSharedMemoryResponse resp;
    grpc::ClientContext ctx;
    return stub_->RegisterSystemSharedMemory(&ctx, r, &resp);
  }
  grpc::Status Unregister(const std::string& name) {
    v1::UnregisterSystemSharedMemoryRequest r;
    r.set_name(name);
    v1::UnregisterSystemSharedMemoryResponse resp;
    grpc::ClientContext ctx;
    return stub_->UnregisterSystemSharedMemory(&ctx, r, &resp);
  }
  grpc::Status Status(const std::string& name, v1::SystemSharedMemoryStatusResponse* resp) {
    v1::SystemSharedMemoryStatusRequest r;
    r.set_name(name);
    grpc::ClientContext ctx;
    return stub_->SystemSharedMemoryStatus(&ctx, r, resp);
  }
  grpc::Status Attend(const v1::AttendRequest& req, v1::AttendResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
    return stub_->Attend(&ctx, req, resp);
  }
  grpc::Status AttendBackward(const v1::AttendBackwardRequest& req,
                              v1::AttendBackwardResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
    return stub_->AttendBackward(&ctx, req, resp);
  }
  v1::AttentionService::Stub& stub() { return *stub_; }

 private:
  std::unique_ptr<v1::AttentionService::Stub> stub_;
};

int64_t Bytes(const v1::Tensor& t) { return static_cast<int64_t>(t.data().size()); }

#if RINGATTN_SHM_GPU
bool GpuAvailable() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e == cudaSuccess && count > 0;
}
#endif

// dq of two runs of one backward: the same bytes on CPU workers; on GPU workers dq is summed by
// fp32 atomics in no fixed order, so the two agree to the dtype's rounding, not bit for bit (dk
// and dv are deterministic everywhere).
void ExpectSameDq(const std::string& got, const std::string& want, v1::DType dtype) {
#if RINGATTN_SHM_GPU
  ASSERT_EQ(got.size(), want.size());
  const DType d = test::ToDType(dtype);
  const int64_t n = static_cast<int64_t>(want.size() / DTypeSize(d));
  std::vector<float> w(n);
  for (int64_t i = 0; i < n; ++i) w[i] = LoadAsFloat(want.data(), i, d);
  const ErrorStats e = CompareTensor(got.data(), d, w.data(), n);
  EXPECT_TRUE(e.Within(1e-2, 1.0)) << "dq of two runs: " << e.ToString();
#else
  (void)dtype;
  EXPECT_EQ(got, want);
#endif
}

// AttendBackward with its inputs, dq and dk in shared memory (dv as bytes) gives the bytes of
// the same request sent as bytes.
void ExpectBackwardThroughSharedMemoryEqualsBytes(ShmService& svc, const Shape& shape) {
  v1::AttendRequest fwd = MakeRequest(shape);
  fwd.mutable_options()->set_causal(true);
  v1::AttendResponse f;
  ASSERT_TRUE(svc.Attend(fwd, &f).ok());
  v1::AttendBackwardRequest plain;
  *plain.mutable_q() = fwd.q();
  *plain.mutable_k() = fwd.k();
  *plain.mutable_v() = fwd.v();
  *plain.mutable_out() = f.out();
  *plain.mutable_lse() = f.lse();
  *plain.mutable_dout() = fwd.q();  // any q-shaped tensor
  *plain.mutable_options() = fwd.options();
  v1::AttendBackwardResponse want;
  ASSERT_TRUE(svc.AttendBackward(plain, &want).ok());

  ClientObject obj(32 << 20);
  ASSERT_TRUE(svc.Register("g", obj).ok());
  v1::AttendBackwardRequest req = plain;
  Placer place(&obj, "g");
  for (v1::Tensor* t : {req.mutable_q(), req.mutable_k(), req.mutable_v(), req.mutable_out(),
                        req.mutable_dout(), req.mutable_lse()}) {
    place.Input(t);
  }
  (*req.mutable_output_shm())["dq"] = place.Output(Bytes(plain.q()));
  (*req.mutable_output_shm())["dk"] = place.Output(Bytes(plain.k()));
  // dv in the response, as bytes.
  v1::AttendBackwardResponse got;
  grpc::Status s = svc.AttendBackward(req, &got);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ExpectSameDq(place.Read(req.output_shm().at("dq")), want.dq().data(), shape.dtype);
  EXPECT_EQ(place.Read(req.output_shm().at("dk")), want.dk().data());
  EXPECT_TRUE(got.dq().data().empty());
  EXPECT_EQ(got.dv().data(), want.dv().data());
  ASSERT_TRUE(svc.Unregister("g").ok());
}

// out and lse (from the region) against the fp64 reference of the request's inputs.
void ExpectMatchesReference(const v1::AttendRequest& with_bytes, const std::string& out,
                            const std::string& lse) {
  std::vector<float> slopes;
  AttentionParams p = test::ReferenceParams(with_bytes.q(), with_bytes.k(), with_bytes.v(),
                                            with_bytes.options(), &slopes);
  char unused;
  p.o = &unused;
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
  ASSERT_TRUE(ref.ok()) << ref.status();
  const int64_t n = static_cast<int64_t>(ref->o.size());
  ASSERT_EQ(out.size(), static_cast<size_t>(n) * DTypeSize(p.dtype));
  const double tol = p.dtype == DType::kF32 ? 1e-5 : 1e-2;
  const ErrorStats e = CompareTensor(out.data(), p.dtype, ref->o.data(), n);
  EXPECT_TRUE(e.Within(tol, 1.0)) << "out vs fp64: " << e.ToString();
  ASSERT_EQ(lse.size(), ref->lse.size() * sizeof(float));
  const ErrorStats l = CompareTensor(lse.data(), DType::kF32, ref->lse.data(),
                                     static_cast<int64_t>(ref->lse.size()));
  EXPECT_TRUE(l.Within(1e-5, 1e-4)) << "lse vs fp64: " << l.ToString();
}

// world, whether the workers map the memory themselves, and their kernel (GPU kernels: the
// worker pins the client's pages and copies rows between them and the device directly).
class ShmWorlds : public ::testing::TestWithParam<std::tuple<int, bool, std::string>> {};

TEST_P(ShmWorlds, InputsAndOutputsInSharedMemoryMatchTheReference) {
#if RINGATTN_SHM_GPU
  if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
#endif
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  const auto [world, workers_map, kernel] = GetParam();
  ShmService svc(world, workers_map, kernel);
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  struct Case {
    const char* name;
    Shape shape;
    bool causal;
  };
  // GPU kernels take 16-bit inputs only.
  const v1::DType f32 = kernel == "cpu" ? v1::DTYPE_FP32 : v1::DTYPE_BF16;
  const Case cases[] = {
      {"seq7_h5_mqa_causal", {1, 7, 5, 1, 64, f32}, true},
      {"seq1", {1, 1, 5, 5, 64, f32}, true},
      {"b2_seq37_gqa_bf16", {2, 37, 8, 2, 128, v1::DTYPE_BF16}, false},
      {"seq300_zigzag", {1, 300, 4, 2, 64, f32}, true},
      {"b2_seq3816_h5_gqa_fp16", {2, 3816, 5, 1, 64, v1::DTYPE_FP16}, true},
  };
  ClientObject obj(64 << 20);
  ASSERT_TRUE(svc.Register("mine", obj).ok());
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    // The long case is for the GPU's copies in pieces (2 batches, 2 zigzag chunks each), once
    // (its fp64 reference takes seconds); on CPU workers it would only cost CI minutes.
    if ((kernel == "cpu" || !workers_map) && c.shape.seqlen > 1000) continue;
    const v1::AttendRequest with_bytes = MakeRequest(c.shape);
    v1::AttendRequest req = with_bytes;
    req.mutable_options()->set_causal(c.causal);
    v1::AttendRequest ref_req = req;
    Placer place(&obj, "mine");
    place.Input(req.mutable_q());
    place.Input(req.mutable_k());
    place.Input(req.mutable_v());
    const v1::SharedMemoryRef out = place.Output(Bytes(with_bytes.q()));
    const int64_t lse_bytes = int64_t{c.shape.batch} * c.shape.heads * c.shape.seqlen * 4;
    const v1::SharedMemoryRef lse = place.Output(lse_bytes);
    (*req.mutable_output_shm())["out"] = out;
    (*req.mutable_output_shm())["lse"] = lse;
    v1::AttendResponse resp;
    grpc::Status s = svc.Attend(req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    // The response describes the outputs but carries none of their bytes.
    EXPECT_TRUE(resp.out().data().empty());
    EXPECT_TRUE(resp.lse().data().empty());
    EXPECT_EQ(resp.out().shape_size(), 4);
    EXPECT_EQ(resp.lse().dtype(), v1::DTYPE_FP32);
    ExpectMatchesReference(ref_req, place.Read(out), place.Read(lse));
    for (const v1::WorkerTiming& w : resp.timings().workers()) {
      EXPECT_EQ(w.shared_memory_read_seconds() > 0, workers_map) << w.rank();
    }

    // The same request with bytes gives the same bytes.
    v1::AttendResponse plain;
    ASSERT_TRUE(svc.Attend(ref_req, &plain).ok());
    EXPECT_EQ(plain.out().data(), place.Read(out));
    EXPECT_EQ(plain.lse().data(), place.Read(lse));
    // Bytes reach workers on this host through the coordinator's arena, not as shard messages.
    for (const v1::WorkerTiming& w : plain.timings().workers()) {
      EXPECT_EQ(w.shared_memory_read_seconds() > 0, workers_map) << w.rank();
    }
  }
}

const auto ShmWorldName = [](const auto& info) {
  return absl::StrCat(std::get<2>(info.param), "_w", std::get<0>(info.param),
                      std::get<1>(info.param) ? "_workers_map" : "_coordinator_moves");
};

#if RINGATTN_SHM_GPU
// One GPU: one worker (NCCL refuses two ranks on one device).
INSTANTIATE_TEST_SUITE_P(, ShmWorlds,
                         ::testing::Values(std::make_tuple(1, true, std::string("cuda")),
                                           std::make_tuple(1, false, std::string("cuda"))
#if RINGATTN_HAVE_CUDNN
                                               ,
                                           std::make_tuple(1, true, std::string("cudnn"))
#endif
                                               ),
                         ShmWorldName);
#else
INSTANTIATE_TEST_SUITE_P(, ShmWorlds,
                         ::testing::Values(std::make_tuple(1, true, std::string("cpu")),
                                           std::make_tuple(3, true, std::string("cpu")),
                                           std::make_tuple(2, false, std::string("cpu"))),
                         ShmWorldName);

class ShmServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
    svc_ = std::make_unique<ShmService>(2, true);
    ASSERT_TRUE(svc_->start_status().ok()) << svc_->start_status();
  }
  void TearDown() override { svc_.reset(); }

  // A request whose q, k, v are in `obj` under `region`, and whose out and lse go there too.
  v1::AttendRequest Placed(ClientObject* obj, const std::string& region, Shape shape = {}) {
    v1::AttendRequest req = MakeRequest(shape);
    Placer place(obj, region);
    const int64_t q = Bytes(req.q());
    place.Input(req.mutable_q());
    place.Input(req.mutable_k());
    place.Input(req.mutable_v());
    (*req.mutable_output_shm())["out"] = place.Output(q);
    (*req.mutable_output_shm())["lse"] =
        place.Output(int64_t{shape.batch} * shape.heads * shape.seqlen * 4);
    return req;
  }

  // The request is refused with INVALID_ARGUMENT naming `words`, then a good one is answered.
  void ExpectRefused(const v1::AttendRequest& bad, const std::string& words,
                     grpc::StatusCode code = grpc::StatusCode::INVALID_ARGUMENT) {
    v1::AttendResponse resp;
    grpc::Status s = svc_->Attend(bad, &resp);
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    EXPECT_NE(s.error_message().find(words), std::string::npos)
        << "want '" << words << "' in: " << s.error_message();
    v1::AttendResponse good;
    EXPECT_TRUE(svc_->Attend(MakeRequest(Shape{}), &good).ok()) << "the service stopped serving";
  }

  std::unique_ptr<ShmService> svc_;
};

TEST_F(ShmServiceTest, RegistrationStatusAndUnregistration) {
  ClientObject obj(1 << 20);
  ASSERT_TRUE(svc_->Register("a", obj, 4096, 8192).ok());
  ASSERT_TRUE(svc_->Register("b", obj).ok());
  EXPECT_EQ(svc_->Register("a", obj).error_code(), grpc::StatusCode::ALREADY_EXISTS);
  v1::SystemSharedMemoryStatusResponse st;
  ASSERT_TRUE(svc_->Status("", &st).ok());
  ASSERT_EQ(st.regions_size(), 2);
  EXPECT_EQ(st.regions(0).name(), "a");
  EXPECT_EQ(st.regions(0).key(), obj.key());
  EXPECT_EQ(st.regions(0).offset(), 4096);
  EXPECT_EQ(st.regions(0).byte_size(), 8192);
  v1::SystemSharedMemoryStatusResponse one;
  EXPECT_EQ(svc_->Status("zzz", &one).error_code(), grpc::StatusCode::NOT_FOUND);
  ASSERT_TRUE(svc_->Unregister("a").ok());
  EXPECT_EQ(svc_->Unregister("a").error_code(), grpc::StatusCode::NOT_FOUND);
  ASSERT_TRUE(svc_->Unregister("").ok());
  v1::SystemSharedMemoryStatusResponse none;
  ASSERT_TRUE(svc_->Status("", &none).ok());
  EXPECT_EQ(none.regions_size(), 0);
  // Bad registrations name the field.
  grpc::Status s = svc_->Register("c", obj, 0, 2 << 20);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("exceeds"), std::string::npos) << s.error_message();
  v1::RegisterSystemSharedMemoryRequest r;
  r.set_name("d");
  r.set_key("/ringattn_svc_no_such_object");
  r.set_byte_size(1);
  v1::RegisterSystemSharedMemoryResponse resp;
  grpc::ClientContext ctx;
  EXPECT_EQ(svc_->stub().RegisterSystemSharedMemory(&ctx, r, &resp).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(ShmServiceTest, CudaRegionsAreKeptButRefusedToHostWorkers) {
  const auto reg = [&](const std::string& name, std::string handle, int64_t bytes) {
    v1::RegisterCudaSharedMemoryRequest r;
    r.set_name(name);
    r.set_raw_handle(std::move(handle));
    r.set_byte_size(bytes);
    v1::RegisterCudaSharedMemoryResponse resp;
    grpc::ClientContext ctx;
    return svc_->stub().RegisterCudaSharedMemory(&ctx, r, &resp);
  };
  // The coordinator keeps the handle without opening it (it needs no GPU).
  ASSERT_TRUE(reg("gpu", std::string(64, '\x01'), 1 << 20).ok());
  grpc::Status s = reg("short", std::string(10, '\x01'), 1 << 20);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("raw_handle"), std::string::npos) << s.error_message();
  s = reg("empty", std::string(64, '\x01'), 0);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("byte_size"), std::string::npos) << s.error_message();
  EXPECT_EQ(reg("gpu", std::string(64, '\x02'), 1).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);

  // Listed as a CUDA region, not as a system one; unregistered only as what it is.
  {
    v1::CudaSharedMemoryStatusRequest r;
    v1::CudaSharedMemoryStatusResponse st;
    grpc::ClientContext ctx;
    ASSERT_TRUE(svc_->stub().CudaSharedMemoryStatus(&ctx, r, &st).ok());
    ASSERT_EQ(st.regions_size(), 1);
    EXPECT_EQ(st.regions(0).name(), "gpu");
    EXPECT_EQ(st.regions(0).byte_size(), 1 << 20);
    v1::SystemSharedMemoryStatusResponse sys;
    ASSERT_TRUE(svc_->Status("", &sys).ok());
    EXPECT_EQ(sys.regions_size(), 0);
    EXPECT_EQ(svc_->Unregister("gpu").error_code(), grpc::StatusCode::NOT_FOUND);
  }

  // A request with a tensor there is refused before any worker runs: these are CPU workers.
  v1::AttendRequest req = MakeRequest(Shape{});
  const int64_t q_bytes = Bytes(req.q());
  req.mutable_q()->clear_data();
  v1::SharedMemoryRef* ref = req.mutable_q()->mutable_shm();
  ref->set_region("gpu");
  ref->set_offset(0);
  ref->set_byte_size(q_bytes);
  ExpectRefused(req, "q is in CUDA shared memory", grpc::StatusCode::FAILED_PRECONDITION);
  ExpectRefused(req, "has no GPU", grpc::StatusCode::FAILED_PRECONDITION);
  // Out of its range: INVALID_ARGUMENT naming the field, as for system memory.
  ref->set_offset((1 << 20) - 2);
  ExpectRefused(req, "q.shm.offset");

  v1::UnregisterCudaSharedMemoryRequest u;
  u.set_name("gpu");
  v1::UnregisterCudaSharedMemoryResponse ur;
  grpc::ClientContext ctx;
  EXPECT_TRUE(svc_->stub().UnregisterCudaSharedMemory(&ctx, u, &ur).ok());
}

TEST_F(ShmServiceTest, BadReferencesAreRefusedNamingTheField) {
  ClientObject obj(1 << 20);
  ASSERT_TRUE(svc_->Register("r", obj).ok());
  const v1::AttendRequest good = Placed(&obj, "r");
  {
    v1::AttendResponse resp;
    ASSERT_TRUE(svc_->Attend(good, &resp).ok());
  }
  v1::AttendRequest bad = good;
  bad.mutable_q()->mutable_shm()->set_region("nobody");
  ExpectRefused(bad, "q.shm.region 'nobody' is not registered");
  bad = good;
  bad.mutable_k()->mutable_shm()->set_offset((1 << 20) - 10);
  ExpectRefused(bad, "k.shm.offset");
  bad = good;
  bad.mutable_v()->mutable_shm()->set_byte_size(good.v().shm().byte_size() - 4);
  ExpectRefused(bad, "v.shm.byte_size");
  bad = good;
  bad.mutable_q()->set_data("x");
  ExpectRefused(bad, "q.data must be empty when q.shm is set");
  bad = good;
  (*bad.mutable_output_shm())["dq"] = good.output_shm().at("out");
  ExpectRefused(bad, "output_shm['dq']: Attend has no output 'dq'");
  bad = good;
  bad.set_return_lse(false);
  ExpectRefused(bad, "output_shm['lse']: the request does not ask for lse");
  bad = good;
  (*bad.mutable_output_shm())["lse"].set_offset(good.q().shm().offset() + 64);
  ExpectRefused(bad, "output_shm['lse'] overlaps q.shm");
  bad = good;
  (*bad.mutable_output_shm())["out"].set_offset(good.output_shm().at("lse").offset() - 64);
  ExpectRefused(bad, "output_shm['out'] overlaps output_shm['lse']");
  bad = good;
  (*bad.mutable_output_shm())["lse"].set_byte_size(8);
  ExpectRefused(bad, "output_shm['lse'].byte_size");

  // A stream header refuses references (its bytes come as chunks).
  grpc::ClientContext ctx;
  auto stream = svc_->stub().AttendStream(&ctx);
  v1::AttendStreamRequest header;
  *header.mutable_header() = good;
  header.mutable_header()->clear_output_shm();
  ASSERT_TRUE(stream->Write(header));
  stream->WritesDone();
  v1::AttendStreamResponse ignored;
  while (stream->Read(&ignored)) {
  }
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("q.shm must be unset in an AttendStream header"),
            std::string::npos) << s.error_message();
}

TEST_F(ShmServiceTest, ARegionThatShrankFailsThatRequestOnly) {
  auto obj = std::make_unique<ClientObject>(1 << 20);
  ASSERT_TRUE(svc_->Register("r", *obj).ok());
  const v1::AttendRequest req = Placed(obj.get(), "r");
  obj->Truncate(4096);
  ExpectRefused(req, "shrank, vanished or was replaced", grpc::StatusCode::FAILED_PRECONDITION);
  // Unlinked: the workers cannot open it any more.
  obj.reset();
  ExpectRefused(req, "shrank, vanished or was replaced", grpc::StatusCode::FAILED_PRECONDITION);
}

TEST_F(ShmServiceTest, BackwardWithSharedMemoryEqualsBackwardWithBytes) {
  ExpectBackwardThroughSharedMemoryEqualsBytes(*svc_, Shape{1, 37, 5, 1, 64, v1::DTYPE_FP32});
}
#endif  // RINGATTN_SHM_GPU

#if RINGATTN_SHM_GPU
// Attend and AttendBackward with their tensors in this process's GPU memory (CUDA IPC): the
// same bytes as the requests sent as bytes, and the forward within the fp64 tolerance.
TEST(ShmGpuTest, CudaSharedMemoryGivesTheBytesOfTheMessages) {
  if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  ShmService svc(1, true, "cuda");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  absl::StatusOr<ConnectedClient> c = ConnectAndGetInfo(svc.address(), absl::Seconds(10));
  ASSERT_TRUE(c.ok()) << c.status();
  AttentionClient& client = *c->client;
  const absl::Duration timeout = absl::Seconds(60);
  for (const Shape& shape : {Shape{1, 7, 5, 1, 64, v1::DTYPE_BF16},
                             Shape{1, 3816, 5, 1, 128, v1::DTYPE_FP16}}) {
    SCOPED_TRACE(shape.seqlen);
    v1::AttendRequest request = MakeRequest(shape);
    request.mutable_options()->set_causal(true);
    request.set_return_lse(true);
    absl::StatusOr<v1::AttendResponse> plain = client.Attend(request, timeout);
    ASSERT_TRUE(plain.ok()) << plain.status();
    absl::StatusOr<std::unique_ptr<SharedMemorySession>> session = SharedMemorySession::OpenFor(
        client, request, timeout, SharedMemorySession::Kind::kCuda, 0);
    ASSERT_TRUE(session.ok()) << session.status();
    absl::StatusOr<v1::AttendResponse> got = (*session)->Attend(request, timeout);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->out().data(), plain->out().data());
    EXPECT_EQ(got->lse().data(), plain->lse().data());
    ExpectMatchesReference(request, got->out().data(), got->lse().data());
    // In place: the worker read and wrote the client's GPU memory, no host copy on its side.
    for (const v1::WorkerTiming& w : got->timings().workers()) {
      EXPECT_EQ(w.host_to_device_seconds(), 0) << w.rank();
    }

    v1::AttendBackwardRequest backward;
    *backward.mutable_q() = request.q();
    *backward.mutable_k() = request.k();
    *backward.mutable_v() = request.v();
    *backward.mutable_out() = plain->out();
    *backward.mutable_lse() = plain->lse();
    *backward.mutable_dout() = request.q();
    *backward.mutable_options() = request.options();
    absl::StatusOr<v1::AttendBackwardResponse> want = client.AttendBackward(backward, timeout);
    ASSERT_TRUE(want.ok()) << want.status();
    absl::StatusOr<std::unique_ptr<SharedMemorySession>> grads = SharedMemorySession::OpenFor(
        client, backward, timeout, SharedMemorySession::Kind::kCuda, 0);
    ASSERT_TRUE(grads.ok()) << grads.status();
    absl::StatusOr<v1::AttendBackwardResponse> g = (*grads)->AttendBackward(backward, timeout);
    ASSERT_TRUE(g.ok()) << g.status();
    ExpectSameDq(g->dq().data(), want->dq().data(), shape.dtype);
    EXPECT_EQ(g->dk().data(), want->dk().data());
    EXPECT_EQ(g->dv().data(), want->dv().data());
  }
}

TEST(ShmGpuTest, BackwardWithSharedMemoryEqualsBackwardWithBytes) {
  if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  ASSERT_FALSE(WorkerBinary().empty()) << "RINGATTN_BIN not set";
  ShmService svc(1, true, "cuda");
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();
  ExpectBackwardThroughSharedMemoryEqualsBytes(svc, Shape{2, 1000, 5, 1, 64, v1::DTYPE_BF16});
}
#endif

}  // namespace
}  // namespace ringattn
