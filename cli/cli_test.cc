// Tests of the client library: .npy files, the AttendStream chunk protocol both ways against a
// fake AttentionService on loopback, the timing table, the progress bar, the reference check and
// `ringattn attend` end to end.
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/server_context.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cli/attend_command.h"
#include "cli/cli_parse.h"
#include "cli/exit_codes.h"
#include "cli/loopback_server_test_util.h"
#include "cli/shared_memory_test_util.h"
#include "cli/timing_table.h"
#include "client/attention_client.h"
#include "client/npy.h"
#include "client/shared_memory_session.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "ringattn/v1/attention.grpc.pb.h"

namespace ringattn {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr absl::Duration kTimeout = absl::Seconds(30);

// ---- .npy ------------------------------------------------------------------------------------

std::string TempPath(const std::string& name) {
  return absl::StrCat(::testing::TempDir(), "/client_test_", name);
}

NpyArray MakeArray(DType dtype, std::vector<int64_t> shape) {
  NpyArray a;
  a.dtype = dtype;
  a.shape = std::move(shape);
  a.data.resize(static_cast<size_t>(a.num_elements() * DTypeSize(dtype)));
  for (int64_t i = 0; i < a.num_elements(); ++i) {
    StoreFromFloat(a.data.data(), i, dtype, 0.25f * static_cast<float>(i) - 3.0f);
  }
  return a;
}

// A version 1.0 file with the given header text, padded as NumPy pads it, then `data`.
std::string NpyV1(const std::string& dict, const std::string& data) {
  std::string header = dict;
  while ((10 + header.size() + 1) % 64 != 0) header.push_back(' ');
  header.push_back('\n');
  std::string file("\x93NUMPY\x01\x00", 8);
  file.push_back(static_cast<char>(header.size() & 0xff));
  file.push_back(static_cast<char>(header.size() >> 8));
  return file + header + data;
}

TEST(NpyTest, RoundTripsFp32InEveryVersion) {
  const NpyArray a = MakeArray(DType::kF32, {2, 3, 4, 5});
  for (const int version : {0, 1, 2}) {
    absl::StatusOr<std::string> bytes = EncodeNpy(a, version);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    EXPECT_EQ((*bytes)[6], version == 2 ? 2 : 1);
    // NumPy aligns the data to 64 bytes.
    EXPECT_EQ((bytes->size() - a.data.size()) % 64, 0u);
    absl::StatusOr<NpyArray> b = ParseNpy(*bytes, "mem.npy");
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(b->dtype, DType::kF32);
    EXPECT_EQ(b->shape, a.shape);
    EXPECT_EQ(b->data, a.data);
  }
}

TEST(NpyTest, RoundTripsFp16AndOddShapesThroughFiles) {
  for (const std::vector<int64_t>& shape :
       std::vector<std::vector<int64_t>>{{1, 7, 3, 64}, {5}, {}, {2, 0, 3}}) {
    const NpyArray a = MakeArray(DType::kF16, shape);
    for (const int version : {1, 2}) {
      const std::string path = TempPath(absl::StrCat("fp16_v", version, ".npy"));
      ASSERT_TRUE(WriteNpy(path, a, version).ok());
      absl::StatusOr<NpyArray> b = ReadNpy(path);
      ASSERT_TRUE(b.ok()) << b.status();
      EXPECT_EQ(b->dtype, DType::kF16);
      EXPECT_EQ(b->shape, a.shape);
      EXPECT_EQ(b->data, a.data);
    }
  }
}

TEST(NpyTest, ParsesHeadersAsNumpyWritesThem) {
  const std::string data(24, '\x01');
  absl::StatusOr<NpyArray> a =
      ParseNpy(NpyV1("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", data), "a");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  // Key order, quotes, no trailing comma and a 1-tuple.
  a = ParseNpy(NpyV1("{\"shape\": (12,), \"fortran_order\": False, \"descr\": \"<f2\"}", data),
               "b");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->dtype, DType::kF16);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{12}));
}

TEST(NpyTest, RejectsMalformedFilesNamingTheFileAndTheProblem) {
  const std::string ok_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  const std::string data(24, '\0');
  const std::string good = NpyV1(ok_dict, data);
  std::string bad_version = good;
  bad_version[6] = 4;
  const std::pair<std::string, std::string> cases[] = {
      {"not numpy at all", "not a .npy file"},
      {good.substr(0, 9), "truncated"},
      {good.substr(0, 40), "truncated"},
      {bad_version, "version 4.0"},
      {NpyV1("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", data),
       "fortran_order is True"},
      {NpyV1("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", data), "'>f4'"},
      {NpyV1("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", data),
       "'<f8' is not supported"},
      {NpyV1("{'descr': '<f4', 'fortran_order': False, }", data), "no 'shape'"},
      {NpyV1("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }", data),
       "non-negative integer"},
      {NpyV1("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}", data),
       "unexpected or repeated key 'x'"},
      {NpyV1("{'descr': '<f4' 'fortran_order': False, 'shape': (2, 3)}", data), "expected ','"},
      {NpyV1("[1, 2]", data), "not a dict"},
      {NpyV1(ok_dict, data.substr(0, 20)), "data has 20 bytes"},
      {NpyV1(ok_dict, data + "xx"), "needs 24"},
  };
  for (const auto& [bytes, what] : cases) {
    absl::StatusOr<NpyArray> a = ParseNpy(bytes, "bad.npy");
    ASSERT_FALSE(a.ok()) << what;
    EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument) << a.status();
    EXPECT_THAT(a.status().message(), AllOf(HasSubstr("bad.npy: "), HasSubstr(what)));
  }
  // The same checks reading from a file.
  const std::string path = TempPath("fortran.npy");
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    const std::string bytes =
        NpyV1("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", data);
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
  }
  absl::StatusOr<NpyArray> a = ReadNpy(path);
  ASSERT_FALSE(a.ok());
  EXPECT_THAT(a.status().message(), AllOf(HasSubstr(path), HasSubstr("fortran_order")));
}

TEST(NpyTest, MissingFileIsNotFoundAndBf16IsNotWritten) {
  absl::StatusOr<NpyArray> a = ReadNpy(TempPath("does_not_exist.npy"));
  EXPECT_EQ(a.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(a.status().message(), HasSubstr("does_not_exist.npy"));

  NpyArray bf16 = MakeArray(DType::kF32, {4});
  bf16.dtype = DType::kBF16;
  EXPECT_THAT(EncodeNpy(bf16).status().message(), HasSubstr("no bf16"));
  NpyArray short_data = MakeArray(DType::kF32, {4});
  short_data.data.pop_back();
  EXPECT_FALSE(EncodeNpy(short_data).ok());
}

// ---- A fake AttentionService -----------------------------------------------------------------

using ComputeFn = std::function<grpc::Status(const v1::AttendRequest&, v1::AttendResponse*)>;

void FillPlanAndTimings(int64_t seqlen, v1::AttendResponse* response) {
  v1::ShardPlan* plan = response->mutable_plan();
  plan->set_layout(v1::LAYOUT_ZIGZAG);
  plan->set_world_size(2);
  plan->add_rows_per_rank(seqlen - seqlen / 2);
  plan->add_rows_per_rank(seqlen / 2);
  v1::Timings* t = response->mutable_timings();
  t->set_queue_seconds(0.001);
  t->set_receive_seconds(0.002);
  t->set_scatter_seconds(0.003);
  t->set_gather_seconds(0.004);
  t->set_send_seconds(0.005);
  t->set_validate_seconds(0.0005);
  t->set_ring_wait_seconds(0.0005);
  t->set_workers_seconds(0.4);
  t->set_respond_seconds(0.0001);
  t->set_total_seconds(0.5);  // 83.9 ms in no phase
  t->set_client_seconds(0.6);
  t->set_client_wire_seconds(0.1);
  for (int r = 0; r < 2; ++r) {
    v1::WorkerTiming* w = t->add_workers();
    w->set_rank(r);
    w->set_rows(plan->rows_per_rank(r));
    w->set_compute_seconds(0.3);
    w->set_comm_wait_seconds(0.01);
    w->set_ring_seconds(0.25 + 0.05 * r);
    w->set_device_seconds(0.24);
    w->set_launch_seconds(0.0125);
    w->set_backend("cpu");
    w->set_receive_seconds(0.001);
    w->set_send_seconds(0.002);
    w->set_handler_seconds(0.31 + 0.05 * r);
    w->set_call_seconds(0.35 + 0.05 * r);  // wire 40 ms
    for (int step = 0; step < 2; ++step) {
      v1::StepTiming* st = w->add_steps();
      st->set_compute_seconds(0.15);
      st->set_comm_wait_seconds(step == 0 ? 0.01 : 0.0);
    }
  }
}

// out = q; lse [batch, heads, seq] fp32 with element i = i / 8 when asked for.
grpc::Status EchoCompute(const v1::AttendRequest& request, v1::AttendResponse* response) {
  response->set_request_id(request.request_id().empty() ? "fake-id" : request.request_id());
  *response->mutable_out() = request.q();
  const int64_t seqlen = request.q().shape_size() == 4 ? request.q().shape(1) : 0;
  if (request.return_lse()) {
    v1::Tensor* lse = response->mutable_lse();
    lse->set_dtype(v1::DTYPE_FP32);
    lse->add_shape(request.q().shape(0));
    lse->add_shape(request.q().shape(2));
    lse->add_shape(seqlen);
    const int64_t n = request.q().shape(0) * request.q().shape(2) * seqlen;
    std::vector<float> values(n);
    for (int64_t i = 0; i < n; ++i) values[i] = static_cast<float>(i) / 8;
    lse->set_data(values.data(), values.size() * sizeof(float));
  }
  FillPlanAndTimings(seqlen, response);
  return grpc::Status::OK;
}

// The fp64 reference, rounded as a service would return it.
grpc::Status ReferenceCompute(const v1::AttendRequest& request, v1::AttendResponse* response) {
  absl::StatusOr<ReferenceResult> ref = ReferenceForRequest(request);
  if (!ref.ok()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "bad request");
  const DType dtype = request.q().dtype() == v1::DTYPE_FP32   ? DType::kF32
                      : request.q().dtype() == v1::DTYPE_FP16 ? DType::kF16
                                                              : DType::kBF16;
  v1::AttendRequest without_lse = request;
  without_lse.set_return_lse(false);
  EchoCompute(without_lse, response);
  std::string* out = response->mutable_out()->mutable_data();
  for (size_t i = 0; i < ref->o.size(); ++i) {
    StoreFromFloat(out->data(), static_cast<int64_t>(i), dtype, static_cast<float>(ref->o[i]));
  }
  if (request.return_lse()) {
    v1::Tensor* lse = response->mutable_lse();
    lse->set_dtype(v1::DTYPE_FP32);
    for (const int i : {0, 2, 1}) lse->add_shape(request.q().shape(i));
    std::vector<float> values(ref->lse.begin(), ref->lse.end());
    lse->set_data(values.data(), values.size() * sizeof(float));
  }
  return grpc::Status::OK;
}

class FakeAttentionService final : public FakeServiceWithSharedMemory {
 public:
  // How AttendStream's answer breaks the protocol.
  enum class Corruption { kNone, kGapInOut, kShortOut, kExtraLse, kChunkBeforeHeader };

  explicit FakeAttentionService(ComputeFn compute) : compute_(std::move(compute)) {}

  // Knobs; set before any call.
  int64_t response_chunk_bytes = 777;
  int64_t max_unary_bytes = 0;
  Corruption corruption = Corruption::kNone;
  bool refuse_after_header = false;  // INVALID_ARGUMENT without reading any chunk
  bool ignore_output_shm = false;    // answer with the outputs' data whatever output_shm says

  int unary_calls() const { return unary_calls_; }
  int backward_calls() const { return backward_calls_; }
  int stream_calls() const { return stream_calls_; }
  int request_chunks() const { return request_chunks_; }
  int64_t largest_request_chunk() const {
    std::lock_guard<std::mutex> lock(mu_);
    return largest_chunk_;
  }

  grpc::Status Attend(grpc::ServerContext*, const v1::AttendRequest* request,
                      v1::AttendResponse* response) override {
    ++unary_calls_;
    v1::AttendRequest resolved = *request;
    if (grpc::Status s = shm.ReadInputs(AttendRpc(), &resolved); !s.ok()) return s;
    if (grpc::Status s = compute_(resolved, response); !s.ok()) return s;
    if (ignore_output_shm) return grpc::Status::OK;
    return shm.WriteOutputs(request->output_shm(), response);
  }

  // Gradients that echo the inputs (dq = q, dk = k, dv = v), so a test can follow their bytes.
  grpc::Status AttendBackward(grpc::ServerContext*, const v1::AttendBackwardRequest* request,
                              v1::AttendBackwardResponse* response) override {
    ++backward_calls_;
    v1::AttendBackwardRequest resolved = *request;
    if (grpc::Status s = shm.ReadInputs(AttendBackwardRpc(), &resolved); !s.ok()) return s;
    *response->mutable_dq() = resolved.q();
    *response->mutable_dk() = resolved.k();
    *response->mutable_dv() = resolved.v();
    response->mutable_timings()->set_total_seconds(0.001);
    return shm.WriteOutputs(request->output_shm(), response);
  }

  grpc::Status AttendStream(grpc::ServerContext*,
                            grpc::ServerReaderWriter<v1::AttendStreamResponse,
                                                     v1::AttendStreamRequest>* stream) override {
    ++stream_calls_;
    v1::AttendStreamRequest in;
    if (!stream->Read(&in) || !in.has_header()) return Invalid("the header must come first");
    v1::AttendRequest request = std::move(*in.mutable_header());
    std::string* parts[] = {request.mutable_q()->mutable_data(),
                            request.mutable_k()->mutable_data(),
                            request.mutable_v()->mutable_data()};
    for (const std::string* p : parts) {
      if (!p->empty()) return Invalid("the header carries tensor data");
    }
    if (refuse_after_header) return Invalid("refused after the header");
    int current = 0;
    while (stream->Read(&in)) {
      if (!in.has_chunk()) return Invalid("a second header");
      const int which = static_cast<int>(in.chunk().tensor()) - v1::TensorChunk::WHICH_Q;
      if (which < current || which > 2) return Invalid("chunk of the wrong tensor or order");
      current = which;
      if (in.chunk().offset() != static_cast<int64_t>(parts[which]->size())) {
        return Invalid("non-contiguous chunk");
      }
      parts[which]->append(in.chunk().data());
      const int64_t size = static_cast<int64_t>(in.chunk().data().size());
      ++request_chunks_;
      std::lock_guard<std::mutex> lock(mu_);
      largest_chunk_ = std::max(largest_chunk_, size);
    }
    for (const v1::Tensor* t : {&request.q(), &request.k(), &request.v()}) {
      if (static_cast<int64_t>(t->data().size()) != ExpectedTensorBytes(*t)) {
        return Invalid("a tensor's chunks do not add up to its shape");
      }
    }
    v1::AttendResponse response;
    if (grpc::Status s = compute_(request, &response); !s.ok()) return s;
    return SendResponse(std::move(response), stream);
  }

  grpc::Status GetInfo(grpc::ServerContext*, const v1::InfoRequest*,
                       v1::InfoResponse* response) override {
    response->set_version("fake");
    response->set_world_size(2);
    response->set_ready(true);
    response->set_transport("none");
    response->set_max_unary_bytes(max_unary_bytes);
    response->set_max_request_bytes(int64_t{1} << 40);
    return grpc::Status::OK;
  }

 private:
  static grpc::Status Invalid(const std::string& what) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, what);
  }

  grpc::Status SendResponse(
      v1::AttendResponse response,
      grpc::ServerReaderWriter<v1::AttendStreamResponse, v1::AttendStreamRequest>* stream) {
    const std::string out = std::move(*response.mutable_out()->mutable_data());
    const std::string lse = std::move(*response.mutable_lse()->mutable_data());
    response.mutable_out()->clear_data();
    response.mutable_lse()->clear_data();
    std::vector<v1::AttendStreamResponse> messages;
    const auto add_chunk = [&](v1::TensorChunk::Which which, const std::string& bytes,
                               int64_t offset, int64_t n) {
      v1::AttendStreamResponse m;
      m.mutable_chunk()->set_tensor(which);
      m.mutable_chunk()->set_offset(offset);
      m.mutable_chunk()->set_data(bytes.substr(offset, n));
      messages.push_back(std::move(m));
    };
    if (corruption == Corruption::kChunkBeforeHeader) {
      add_chunk(v1::TensorChunk::WHICH_OUT, out, 0, 1);
    }
    messages.emplace_back();
    *messages.back().mutable_header() = response;
    const int64_t chunk = response_chunk_bytes;
    int out_chunks = 0;
    for (int64_t off = 0; off < static_cast<int64_t>(out.size()); off += chunk) {
      ++out_chunks;
      const bool last = off + chunk >= static_cast<int64_t>(out.size());
      if (corruption == Corruption::kGapInOut && out_chunks == 2) continue;
      if (corruption == Corruption::kShortOut && last) continue;
      add_chunk(v1::TensorChunk::WHICH_OUT, out, off, chunk);
    }
    for (int64_t off = 0; off < static_cast<int64_t>(lse.size()); off += chunk) {
      add_chunk(v1::TensorChunk::WHICH_LSE, lse, off, chunk);
    }
    if (corruption == Corruption::kExtraLse) {
      v1::AttendStreamResponse m;
      m.mutable_chunk()->set_tensor(v1::TensorChunk::WHICH_LSE);
      m.mutable_chunk()->set_offset(static_cast<int64_t>(lse.size()));
      m.mutable_chunk()->set_data("xxxx");
      messages.push_back(std::move(m));
    }
    for (const v1::AttendStreamResponse& m : messages) {
      if (!stream->Write(m)) return grpc::Status(grpc::StatusCode::CANCELLED, "client gone");
    }
    return grpc::Status::OK;
  }

  const ComputeFn compute_;
  std::atomic<int> unary_calls_{0};
  std::atomic<int> backward_calls_{0};
  std::atomic<int> stream_calls_{0};
  std::atomic<int> request_chunks_{0};
  mutable std::mutex mu_;
  int64_t largest_chunk_ = 0;  // guarded by mu_
};

// The fake service listening on 127.0.0.1 (a free port).
class FakeServer : public LoopbackServer<FakeAttentionService> {
 public:
  explicit FakeServer(ComputeFn compute = EchoCompute)
      : LoopbackServer<FakeAttentionService>(std::move(compute)) {}

  std::unique_ptr<AttentionClient> Client() {
    absl::StatusOr<std::unique_ptr<AttentionClient>> client =
        AttentionClient::Connect(target(), absl::Seconds(10));
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? std::move(*client) : nullptr;
  }
};

// A small request with distinct values: q 3552 bytes, k and v 1184 bytes each.
v1::AttendRequest SmallRequest(bool return_lse) {
  v1::AttendRequest request = MakeSyntheticRequest(1, 37, 3, 1, 8, DType::kF32, 7);
  request.set_request_id("req-1");
  request.set_return_lse(return_lse);
  request.mutable_options()->set_causal(true);
  return request;
}

bool SameMessage(const google::protobuf::Message& a, const google::protobuf::Message& b) {
  return google::protobuf::util::MessageDifferencer::Equals(a, b);
}

// ---- The chunk protocol ------------------------------------------------------------------------

struct ChunkSizes {
  int64_t request;   // the client's chunks
  int64_t response;  // the server's chunks
};

class StreamingTest : public ::testing::TestWithParam<ChunkSizes> {};

TEST_P(StreamingTest, ReassemblesChunksBothWays) {
  FakeServer server;
  ASSERT_TRUE(server.started());
  server.service().response_chunk_bytes = GetParam().response;
  std::unique_ptr<AttentionClient> client = server.Client();
  ASSERT_NE(client, nullptr);

  const v1::AttendRequest request = SmallRequest(/*return_lse=*/true);
  std::vector<std::pair<int64_t, int64_t>> progress;
  absl::StatusOr<v1::AttendResponse> response = client->AttendStreaming(
      request, kTimeout, GetParam().request,
      [&](int64_t done, int64_t total) { progress.emplace_back(done, total); });
  ASSERT_TRUE(response.ok()) << response.status();

  // The server saw every byte, in chunks no larger than asked for.
  const int64_t request_bytes = 3552 + 1184 + 1184;
  const int64_t chunk = GetParam().request;
  EXPECT_LE(server.service().largest_request_chunk(), chunk);
  EXPECT_EQ(server.service().request_chunks(),
            (3552 + chunk - 1) / chunk + 2 * ((1184 + chunk - 1) / chunk));
  // The client reassembled out (= q) and lse from the server's chunks.
  EXPECT_EQ(response->request_id(), "req-1");
  EXPECT_EQ(response->out().data(), request.q().data());
  EXPECT_EQ(response->out().dtype(), v1::DTYPE_FP32);
  EXPECT_THAT(response->out().shape(), ::testing::ElementsAre(1, 37, 3, 8));
  ASSERT_EQ(response->lse().data().size(), 3u * 37 * 4);
  float lse[3 * 37];
  std::memcpy(lse, response->lse().data().data(), sizeof(lse));
  for (int i = 0; i < 3 * 37; ++i) ASSERT_EQ(lse[i], static_cast<float>(i) / 8) << i;
  EXPECT_EQ(response->timings().workers_size(), 2);

  // Progress rises to the total of both directions.
  ASSERT_FALSE(progress.empty());
  const int64_t total = request_bytes + 3552 + 3 * 37 * 4;
  EXPECT_EQ(progress.back(), std::make_pair(total, total));
  for (size_t i = 1; i < progress.size(); ++i) {
    EXPECT_GE(progress[i].first, progress[i - 1].first);
  }
}

// Chunk sizes smaller than the tensors and not multiples of the element size (4), and one larger
// than everything.
INSTANTIATE_TEST_SUITE_P(ChunkSizes, StreamingTest,
                         ::testing::Values(ChunkSizes{1001, 777}, ChunkSizes{7, 13},
                                           ChunkSizes{3, 5}, ChunkSizes{1 << 20, 1 << 20}));

TEST(ClientTest, UnaryAndStreamingGiveTheSameResponse) {
  FakeServer server;
  std::unique_ptr<AttentionClient> client = server.Client();
  ASSERT_NE(client, nullptr);
  for (const bool lse : {false, true}) {
    const v1::AttendRequest request = SmallRequest(lse);
    absl::StatusOr<v1::AttendResponse> unary = client->Attend(request, kTimeout);
    absl::StatusOr<v1::AttendResponse> streamed = client->AttendStreaming(request, kTimeout, 999);
    ASSERT_TRUE(unary.ok()) << unary.status();
    ASSERT_TRUE(streamed.ok()) << streamed.status();
    // The client stamps its own call's time on each (the server's total is inside it); those
    // differ by call, the rest is the server's answer.
    for (v1::AttendResponse* r : {&*unary, &*streamed}) {
      v1::Timings* t = r->mutable_timings();
      EXPECT_GT(t->client_seconds(), 0);
      // (the fake server's total is made up: the wire is never negative)
      EXPECT_DOUBLE_EQ(t->client_wire_seconds(),
                       std::max(0.0, t->client_seconds() - t->total_seconds()));
      t->clear_client_seconds();
      t->clear_client_wire_seconds();
    }
    EXPECT_TRUE(SameMessage(*unary, *streamed))
        << unary->ShortDebugString().substr(0, 400) << "\nvs\n"
        << streamed->ShortDebugString().substr(0, 400);
  }
  EXPECT_EQ(server.service().unary_calls(), 2);
  EXPECT_EQ(server.service().stream_calls(), 2);
}

TEST(ClientTest, AttendAutoStreamsAboveTheUnaryLimit) {
  FakeServer server;
  std::unique_ptr<AttentionClient> client = server.Client();
  ASSERT_NE(client, nullptr);
  const v1::AttendRequest request = SmallRequest(false);
  const int64_t size = static_cast<int64_t>(request.ByteSizeLong());

  EXPECT_FALSE(NeedsStreaming(request, 0));  // unknown limit
  EXPECT_FALSE(NeedsStreaming(request, size));
  EXPECT_TRUE(NeedsStreaming(request, size - 1));

  ASSERT_TRUE(client->AttendAuto(request, kTimeout, size).ok());
  EXPECT_EQ(server.service().unary_calls(), 1);
  EXPECT_EQ(server.service().stream_calls(), 0);
  // Above the limit it streams, and keeps chunks within the limit.
  absl::StatusOr<v1::AttendResponse> r = client->AttendAuto(request, kTimeout, 500, 4096);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->out().data(), request.q().data());
  EXPECT_EQ(server.service().stream_calls(), 1);
  EXPECT_LE(server.service().largest_request_chunk(), 500);
}

TEST(ClientTest, ServerErrorsKeepTheirCodeAndMessage) {
  FakeServer server([](const v1::AttendRequest&, v1::AttendResponse*) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "queue full (16 waiting)");
  });
  std::unique_ptr<AttentionClient> client = server.Client();
  ASSERT_NE(client, nullptr);
  const v1::AttendRequest request = SmallRequest(false);
  for (const bool streaming : {false, true}) {
    absl::StatusOr<v1::AttendResponse> r = streaming
                                               ? client->AttendStreaming(request, kTimeout, 100)
                                               : client->Attend(request, kTimeout);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_EQ(r.status().message(), "queue full (16 waiting)");
  }
}

TEST(ClientTest, ServerRefusingMidUploadEndsTheCallWithItsStatus) {
  FakeServer server;
  server.service().refuse_after_header = true;
  std::unique_ptr<AttentionClient> client = server.Client();
  ASSERT_NE(client, nullptr);
  // 16 MiB in 4 KiB chunks: far more than flow control lets through unread.
  const v1::AttendRequest request = MakeSyntheticRequest(1, 4096, 8, 8, 64, DType::kF32, 1);
  absl::StatusOr<v1::AttendResponse> r = client->AttendStreaming(request, kTimeout, 4096);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(), "refused after the header");
}

TEST(ClientTest, ResponsesBreakingTheChunkProtocolAreInternal) {
  using Corruption = FakeAttentionService::Corruption;
  const std::pair<Corruption, std::string> cases[] = {
      {Corruption::kGapInOut, "out chunk at offset 1554, expected 777"},
      {Corruption::kShortOut, "incomplete: out has 3108 of the 3552 bytes"},
      {Corruption::kExtraLse, "lse chunks exceed the 444 bytes"},
      {Corruption::kChunkBeforeHeader, "chunk before the header"},
  };
  for (const auto& [corruption, message] : cases) {
    FakeServer server;
    server.service().corruption = corruption;
    std::unique_ptr<AttentionClient> client = server.Client();
    ASSERT_NE(client, nullptr);
    absl::StatusOr<v1::AttendResponse> r =
        client->AttendStreaming(SmallRequest(true), kTimeout, 1000);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal) << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr(message));
  }
}

TEST(ClientTest, UnaryResponseWithWrongSizeIsInternal) {
  FakeServer server([](const v1::AttendRequest& request, v1::AttendResponse* response) {
    EchoCompute(request, response);
    response->mutable_out()->mutable_data()->pop_back();
    return grpc::Status::OK;
  });
  std::unique_ptr<AttentionClient> client = server.Client();
  ASSERT_NE(client, nullptr);
  absl::StatusOr<v1::AttendResponse> r = client->Attend(SmallRequest(false), kTimeout);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(r.status().message(), HasSubstr("response out has 3551 bytes"));
}

TEST(ClientTest, DeadlineExceeded) {
  FakeServer server([](const v1::AttendRequest& request, v1::AttendResponse* response) {
    absl::SleepFor(absl::Milliseconds(500));
    return EchoCompute(request, response);
  });
  std::unique_ptr<AttentionClient> client = server.Client();
  ASSERT_NE(client, nullptr);
  for (const bool streaming : {false, true}) {
    absl::StatusOr<v1::AttendResponse> r =
        streaming ? client->AttendStreaming(SmallRequest(false), absl::Milliseconds(100), 1000)
                  : client->Attend(SmallRequest(false), absl::Milliseconds(100));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  }
}

TEST(ClientTest, GetInfoAndConnectFailure) {
  FakeServer server;
  server.service().max_unary_bytes = 12345;
  std::unique_ptr<AttentionClient> client = server.Client();
  ASSERT_NE(client, nullptr);
  absl::StatusOr<v1::InfoResponse> info = client->GetInfo(kTimeout);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->version(), "fake");
  EXPECT_EQ(info->max_unary_bytes(), 12345);

  // Port 1 on loopback: nothing listens there.
  absl::StatusOr<std::unique_ptr<AttentionClient>> none =
      AttentionClient::Connect("127.0.0.1:1", absl::Milliseconds(300));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(none.status().message(), HasSubstr("127.0.0.1:1"));
  EXPECT_EQ(AttentionClient::Connect("", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ClientTest, RejectsNonPositiveChunkSize) {
  AttentionClient client(grpc::CreateChannel("127.0.0.1:1", grpc::InsecureChannelCredentials()));
  EXPECT_EQ(client.AttendStreaming(SmallRequest(false), kTimeout, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- Reports -----------------------------------------------------------------------------------

TEST(TimingTableTest, ListsThePlanEveryPhaseAndWorkerAndTheThroughput) {
  v1::AttendResponse response;
  response.set_request_id("abc123");
  FillPlanAndTimings(37, &response);
  const v1::AttendRequest request = MakeSyntheticRequest(1, 4096, 8, 8, 64, DType::kBF16, 1);
  const double flops = RequestFlops(request);
  EXPECT_DOUBLE_EQ(flops, 4.0 * 8 * 4096 * 4096 * 64);
  const std::string table = FormatTimings(response, flops);
  for (const char* s :
       {"request id abc123", "layout zigzag", "world 2", "rows per rank 19 18", "queue", "receive",
        "scatter", "gather", "send", "total", "500.000", "compute_ms", "comm_wait_ms", "ring_ms", "device_ms", "launch_ms", "240.000", "12.500",
        "steps (compute/wait ms): 150.000/10.000 150.000/0.000",
        "cpu", "GFLOP/s over the total", "over the slowest ring", "validate", "ring_wait",
        "workers       400.000", "respond", "(other)        83.900", "client_wire   100.000",
        "client        600.000",
        "handler ms: receive 1.000, h2d 0.000, ring 250.000, d2h 0.000, send 2.000; "
        "handler 310.000, call 350.000 (wire 40.000)"}) {
    EXPECT_THAT(table, HasSubstr(s));
  }
  // A worker that read and wrote shared memory (the coordinator's arena or a client's region)
  // says how long that took.
  v1::WorkerTiming* w0 = response.mutable_timings()->mutable_workers(0);
  w0->set_shared_memory_read_seconds(0.003);
  w0->set_shared_memory_write_seconds(0.004);
  EXPECT_THAT(FormatTimings(response, flops),
              HasSubstr("handler ms: receive 1.000, shm_read 3.000, h2d 0.000, ring 250.000, "
                        "d2h 0.000, shm_write 4.000, send 2.000; handler 310.000"));
  EXPECT_THAT(FormatTimings(response), Not(HasSubstr("throughput")));
  v1::AttendRequest causal = request;
  causal.mutable_options()->set_causal(true);
  EXPECT_DOUBLE_EQ(RequestFlops(causal), flops / 2);
}

TEST(CliParseTest, CuSeqlens) {
  EXPECT_EQ(*ParseCuSeqlens(""), std::vector<int64_t>{});
  EXPECT_EQ(*ParseCuSeqlens("0,1,7,7,381"), (std::vector<int64_t>{0, 1, 7, 7, 381}));
  for (const char* bad : {"0,,3", "0,-1", "a", "0,1.5", ","}) {
    const absl::StatusOr<std::vector<int64_t>> r = ParseCuSeqlens(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.status().message().find("--cu_seqlens"), std::string::npos) << r.status();
  }
}

TEST(ProgressBarTest, SilentForFastTransfersAndDrawnForSlowOnes) {
  std::ostringstream fast;
  {
    ProgressBar bar("attend", &fast);  // one second before anything is drawn
    for (int i = 0; i <= 10; ++i) bar.Update(i * 100, 1000);
  }
  EXPECT_EQ(fast.str(), "");

  std::ostringstream slow;
  {
    ProgressBar bar("attend", &slow, absl::ZeroDuration());
    bar.Update(250, 1000);
    bar.Update(1000, 1000);
  }
  EXPECT_THAT(slow.str(), AllOf(HasSubstr("\rattend"), HasSubstr("100.0%")));
  EXPECT_EQ(slow.str().back(), '\n');
}

// ---- The reference check -----------------------------------------------------------------------

TEST(ReferenceCheckTest, AcceptsTheReferenceAndFlagsACorruptedOutput) {
  v1::AttendRequest request = MakeSyntheticRequest(2, 33, 4, 2, 64, DType::kF16, 3);
  request.set_return_lse(true);
  request.mutable_options()->set_causal(true);
  v1::AttendResponse response;
  ASSERT_TRUE(ReferenceCompute(request, &response).ok());

  absl::StatusOr<ReferenceErrors> errors = CompareWithReference(request, response);
  ASSERT_TRUE(errors.ok()) << errors.status();
  EXPECT_LT(errors->out.rel_l2, OutputTolerance(DType::kF16));
  ASSERT_TRUE(errors->lse.has_value());
  EXPECT_LT(errors->lse->rel_l2, 1e-6);

  v1::AttendResponse corrupted = response;
  std::string* out = corrupted.mutable_out()->mutable_data();
  StoreFromFloat(out->data(), 100, DType::kF16, LoadAsFloat(out->data(), 100, DType::kF16) + 4);
  absl::StatusOr<ErrorStats> bad = CheckAgainstReference(request, corrupted);
  ASSERT_TRUE(bad.ok()) << bad.status();
  EXPECT_GT(bad->rel_l2, OutputTolerance(DType::kF16));
  EXPECT_GT(bad->max_abs, 3.9);

  StoreFromFloat(out->data(), 7, DType::kF16, std::numeric_limits<float>::quiet_NaN());
  bad = CheckAgainstReference(request, corrupted);
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(bad->nan_count, 1);
}

TEST(ReferenceCheckTest, RejectsResponsesThatDoNotMatchTheRequest) {
  const v1::AttendRequest request = MakeSyntheticRequest(1, 16, 2, 2, 64, DType::kF32, 3);
  v1::AttendResponse response;
  ASSERT_TRUE(ReferenceCompute(request, &response).ok());
  v1::AttendResponse wrong_dtype = response;
  wrong_dtype.mutable_out()->set_dtype(v1::DTYPE_BF16);
  EXPECT_THAT(CheckAgainstReference(request, wrong_dtype).status().message(),
              HasSubstr("expected q's shape [1, 16, 2, 64]"));
  v1::AttendRequest bad_alibi = request;
  bad_alibi.mutable_options()->add_alibi_slopes(0.5f);
  EXPECT_THAT(CheckAgainstReference(bad_alibi, response).status().message(),
              HasSubstr("alibi_slopes has 1 slopes"));
  v1::AttendRequest bad_k = request;
  bad_k.mutable_k()->set_shape(1, 15);
  EXPECT_EQ(CheckAgainstReference(bad_k, response).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- `ringattn attend` ----------------------------------------------------------------------

AttendCommandOptions SmallCommand(const std::string& target) {
  AttendCommandOptions o;
  o.target = target;
  o.batch = 2;
  o.seqlen = 45;
  o.heads = 4;
  o.heads_k = 2;
  o.head_dim = 64;
  o.dtype = "fp16";
  o.causal = true;
  o.window_left = 20;
  o.alibi = true;
  o.softcap = 30;
  o.check = true;
  o.return_lse = true;
  o.timeout_seconds = 30;
  return o;
}

TEST(AttendCommandTest, PassesTheCheckUnaryAndStreaming) {
  FakeServer server(ReferenceCompute);
  server.service().max_unary_bytes = 1 << 20;
  for (const bool streaming : {false, true}) {
    AttendCommandOptions o = SmallCommand(server.target());
    o.streaming = streaming;
    o.chunk_bytes = 1001;
    std::ostringstream out;
    EXPECT_EQ(RunAttendCommand(o, out), 0) << out.str();
    EXPECT_THAT(out.str(), AllOf(HasSubstr(streaming ? "via AttendStream" : "via Attend (unary)"),
                                 HasSubstr("out [2, 45, 4, 64] fp16"), HasSubstr("NaN: 0"),
                                 HasSubstr("lse [2, 4, 45] fp32"), HasSubstr("scatter"),
                                 HasSubstr("throughput"), HasSubstr("check: PASS")));
  }
  EXPECT_EQ(server.service().unary_calls(), 1);
  EXPECT_EQ(server.service().stream_calls(), 1);
}

TEST(AttendCommandTest, StreamsWhenTheRequestExceedsTheServersUnaryLimit) {
  FakeServer server(ReferenceCompute);
  server.service().max_unary_bytes = 10000;
  std::ostringstream out;
  EXPECT_EQ(RunAttendCommand(SmallCommand(server.target()), out), 0) << out.str();
  EXPECT_THAT(out.str(), HasSubstr("AttendStream (chunks of 10000 bytes)"));
  EXPECT_EQ(server.service().stream_calls(), 1);
}

TEST(AttendCommandTest, FailsTheCheckOnAWrongOutput) {
  FakeServer server(EchoCompute);  // out = q: not attention
  AttendCommandOptions o = SmallCommand(server.target());
  o.return_lse = false;
  std::ostringstream out;
  EXPECT_EQ(RunAttendCommand(o, out), kExitCheckFailed) << out.str();
  EXPECT_THAT(out.str(), HasSubstr("check: FAIL"));
}

TEST(AttendCommandTest, PrintsServerErrorsWithTheirCode) {
  FakeServer server([](const v1::AttendRequest&, v1::AttendResponse*) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "q.shape[3] (head_dim) must be 64");
  });
  std::ostringstream out;
  EXPECT_EQ(RunAttendCommand(SmallCommand(server.target()), out), kExitRpcFailed);
  EXPECT_THAT(out.str(), HasSubstr("error: INVALID_ARGUMENT: q.shape[3] (head_dim) must be 64\n"));

  AttendCommandOptions nowhere = SmallCommand("127.0.0.1:1");
  nowhere.connect_timeout_seconds = 0.3;
  std::ostringstream out2;
  EXPECT_EQ(RunAttendCommand(nowhere, out2), kExitUnavailable);
  EXPECT_THAT(out2.str(), HasSubstr("error: UNAVAILABLE: cannot connect to 127.0.0.1:1"));
}

// A call past its deadline is worth retrying, as an unreachable server is.
TEST(AttendCommandTest, ADeadlineExceededExitsAsUnavailable) {
  FakeServer server([](const v1::AttendRequest&, v1::AttendResponse*) {
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "too slow");
  });
  std::ostringstream out;
  EXPECT_EQ(RunAttendCommand(SmallCommand(server.target()), out), kExitUnavailable) << out.str();
}

TEST(AttendCommandTest, BadOptionsExitWithTwo) {
  AttendCommandOptions o = SmallCommand("127.0.0.1:1");
  o.dtype = "fp8";
  std::ostringstream out;
  EXPECT_EQ(RunAttendCommand(o, out), 2);
  EXPECT_THAT(out.str(), HasSubstr("--dtype must be fp32, fp16 or bf16, got 'fp8'"));
  o = SmallCommand("127.0.0.1:1");
  o.q_npy = "q.npy";
  EXPECT_EQ(RunAttendCommand(o, out), 2);
  o = SmallCommand("127.0.0.1:1");
  o.layout = "spiral";
  EXPECT_EQ(RunAttendCommand(o, out), 2);
}

TEST(AttendCommandTest, ReadsNpyInputsConvertsThemAndWritesTheOutput) {
  FakeServer server(ReferenceCompute);
  // fp32 inputs in files, sent as bf16.
  const v1::AttendRequest source = MakeSyntheticRequest(1, 40, 4, 1, 64, DType::kF32, 9);
  AttendCommandOptions o = SmallCommand(server.target());
  const std::pair<const v1::Tensor*, std::string*> files[] = {
      {&source.q(), &o.q_npy}, {&source.k(), &o.k_npy}, {&source.v(), &o.v_npy}};
  int i = 0;
  for (const auto& [tensor, path] : files) {
    NpyArray a;
    a.dtype = DType::kF32;
    a.shape.assign(tensor->shape().begin(), tensor->shape().end());
    a.data = tensor->data();
    *path = TempPath(absl::StrCat("input", i++, ".npy"));
    ASSERT_TRUE(WriteNpy(*path, a).ok());
  }
  o.dtype = "bf16";
  o.out_npy = TempPath("out.npy");
  std::ostringstream out;
  EXPECT_EQ(RunAttendCommand(o, out), 0) << out.str();
  EXPECT_THAT(out.str(), AllOf(HasSubstr("q [1, 40, 4, 64] k/v [1, 40, 1, 64] bf16"),
                               HasSubstr("check: PASS")));
  absl::StatusOr<NpyArray> written = ReadNpy(o.out_npy);
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_EQ(written->dtype, DType::kF32);  // bf16 is written as fp32
  EXPECT_EQ(written->shape, (std::vector<int64_t>{1, 40, 4, 64}));

  // A missing input file is an error naming it.
  o.k_npy = TempPath("missing_k.npy");
  std::ostringstream out2;
  EXPECT_EQ(RunAttendCommand(o, out2), kExitFailure);
  EXPECT_THAT(out2.str(), HasSubstr("error: NOT_FOUND: "));
  EXPECT_THAT(out2.str(), HasSubstr("missing_k.npy"));
}

// ---- System shared memory ----------------------------------------------------------------------

TEST(SharedMemoryClientTest, RegistersListsAndUnregistersRegions) {
  FakeServer server;
  std::unique_ptr<AttentionClient> client = server.Client();
  ASSERT_NE(client, nullptr);
  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> region =
      SharedMemoryRegion::Create(MakeSharedMemoryKey(), 4096);
  ASSERT_TRUE(region.ok()) << region.status();
  const std::string& key = (*region)->key();
  ASSERT_TRUE(client->RegisterSystemSharedMemory("a", key, 0, 4096, kTimeout).ok());
  ASSERT_TRUE(client->RegisterSystemSharedMemory("b", key, 1024, 2048, kTimeout).ok());
  // The service's refusals keep their code.
  EXPECT_EQ(client->RegisterSystemSharedMemory("a", key, 0, 64, kTimeout).code(),
            absl::StatusCode::kAlreadyExists);

  absl::StatusOr<std::vector<v1::SystemSharedMemoryRegion>> all =
      client->SystemSharedMemoryStatus("", kTimeout);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), 2u);
  absl::StatusOr<std::vector<v1::SystemSharedMemoryRegion>> b =
      client->SystemSharedMemoryStatus("b", kTimeout);
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(b->size(), 1u);
  EXPECT_EQ((*b)[0].name(), "b");
  EXPECT_EQ((*b)[0].key(), key);
  EXPECT_EQ((*b)[0].offset(), 1024);
  EXPECT_EQ((*b)[0].byte_size(), 2048);

  EXPECT_TRUE(client->UnregisterSystemSharedMemory("a", kTimeout).ok());
  EXPECT_EQ(client->UnregisterSystemSharedMemory("a", kTimeout).code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(client->UnregisterSystemSharedMemory("", kTimeout).ok());  // all
  EXPECT_TRUE(client->SystemSharedMemoryStatus("", kTimeout)->empty());
}

TEST(SharedMemoryClientTest, SessionsSendRefsAndReturnOrdinaryResponses) {
  FakeServer server;  // out = q, lse element i = i / 8; gradients dq = q, dk = k, dv = v
  std::unique_ptr<AttentionClient> client = server.Client();
  ASSERT_NE(client, nullptr);
  const v1::AttendRequest request = SmallRequest(/*return_lse=*/true);
  {
    absl::StatusOr<std::unique_ptr<SharedMemorySession>> session =
        SharedMemorySession::OpenFor(*client, request, kTimeout);
    ASSERT_TRUE(session.ok()) << session.status();
    EXPECT_EQ(server.service().shm.registered(), 1);
    EXPECT_EQ("/" + (*session)->name(), (*session)->where());
    absl::StatusOr<v1::AttendResponse> response;
    for (int call = 0; call < 2; ++call) {  // one region, call after call
      SharedMemoryCopyTimes copies;
      response = (*session)->Attend(request, kTimeout, &copies);
      ASSERT_TRUE(response.ok()) << response.status();
      EXPECT_EQ(response->request_id(), "req-1");
      EXPECT_EQ(response->out().data(), request.q().data());
      ASSERT_EQ(response->lse().data().size(), 3u * 37 * 4);
      float lse5;
      std::memcpy(&lse5, response->lse().data().data() + 5 * sizeof(float), sizeof(float));
      EXPECT_EQ(lse5, 5.0f / 8);
      EXPECT_GT(copies.in_seconds, 0);
      EXPECT_GT(copies.out_seconds, 0);
      EXPECT_GT(response->timings().client_seconds(), 0);
    }
    EXPECT_EQ(server.service().shm.calls_with_shm(), 2);

    // The backward through a session sized for it: the echoed gradients come back.
    const v1::AttendBackwardRequest backward = MakeBackwardRequest(request, *response, 1);
    absl::StatusOr<std::unique_ptr<SharedMemorySession>> grads_session =
        SharedMemorySession::OpenFor(*client, backward, kTimeout);
    ASSERT_TRUE(grads_session.ok()) << grads_session.status();
    EXPECT_GT((*grads_session)->size(), (*session)->size());
    absl::StatusOr<v1::AttendBackwardResponse> grads =
        (*grads_session)->AttendBackward(backward, kTimeout);
    ASSERT_TRUE(grads.ok()) << grads.status();
    EXPECT_EQ(grads->dq().data(), request.q().data());
    EXPECT_EQ(grads->dk().data(), request.k().data());
    EXPECT_EQ(grads->dv().data(), request.v().data());
    EXPECT_EQ(server.service().shm.calls_with_shm(), 3);

    // A request larger than the region is refused before any call.
    const int calls = server.service().unary_calls();
    const v1::AttendRequest larger = MakeSyntheticRequest(1, 100, 3, 1, 8, DType::kF32, 7);
    EXPECT_EQ((*session)->Attend(larger, kTimeout).status().code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(server.service().unary_calls(), calls);
    EXPECT_EQ(server.service().shm.registered(), 2);
  }
  // The sessions are gone: unregistered at the service, unlinked here.
  EXPECT_EQ(server.service().shm.registered(), 0);
  EXPECT_THAT(OurSharedMemoryObjects(), ::testing::IsEmpty());
}

TEST(SharedMemoryClientTest, AnOutputSentDespiteOutputShmIsInternal) {
  FakeServer server;
  server.service().ignore_output_shm = true;
  std::unique_ptr<AttentionClient> client = server.Client();
  ASSERT_NE(client, nullptr);
  const v1::AttendRequest request = SmallRequest(false);
  absl::StatusOr<std::unique_ptr<SharedMemorySession>> session =
      SharedMemorySession::OpenFor(*client, request, kTimeout);
  ASSERT_TRUE(session.ok()) << session.status();
  absl::StatusOr<v1::AttendResponse> r = (*session)->Attend(request, kTimeout);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(r.status().message(),
              HasSubstr("response out carries 3552 bytes; the request placed it in shared memory"));
}

TEST(TimingTableTest, ListsTheSharedMemoryCopiesWhenGiven) {
  v1::AttendResponse response;
  FillPlanAndTimings(37, &response);
  EXPECT_THAT(FormatTimings(response), Not(HasSubstr("shm_")));
  const SharedMemoryCopyTimes copies{0.0015, 0.0025};
  const std::string table = FormatTimings(response, 0, &copies);
  EXPECT_THAT(
      table, AllOf(HasSubstr("  shm_in          1.500\n"), HasSubstr("  shm_out         2.500\n")));
  // After the client's own rows.
  EXPECT_LT(table.find("client "), table.find("shm_in"));
}

TEST(AttendCommandTest, SharedMemoryPassesTheCheckAtAwkwardSizes) {
  FakeServer server(ReferenceCompute);
  server.service().max_unary_bytes = 1000;  // tensors past it: only the refs travel
  struct Case {
    int64_t seqlen;
    int heads, heads_k;
    const char* dtype;
  };
  for (const Case c : {Case{37, 5, 1, "fp32"}, Case{7, 5, 5, "bf16"}, Case{37, 4, 2, "fp16"}}) {
    AttendCommandOptions o = SmallCommand(server.target());
    o.seqlen = c.seqlen;
    o.heads = c.heads;
    o.heads_k = c.heads_k;
    o.dtype = c.dtype;
    o.shm = true;
    std::ostringstream out;
    EXPECT_EQ(RunAttendCommand(o, out), 0) << out.str();
    EXPECT_THAT(out.str(),
                AllOf(HasSubstr("via Attend (unary, system shared memory)"),
                      HasSubstr("shared memory: region ringattn_"), HasSubstr("check: PASS"),
                      HasSubstr("  shm_in "), HasSubstr("  shm_out ")));
  }
  EXPECT_EQ(server.service().stream_calls(), 0);
  EXPECT_EQ(server.service().shm.calls_with_shm(), 3);
  EXPECT_EQ(server.service().shm.registrations(), 3);
  EXPECT_EQ(server.service().shm.registered(), 0);
  EXPECT_THAT(OurSharedMemoryObjects(), ::testing::IsEmpty());
}

TEST(AttendCommandTest, SharedMemoryBackwardReturnsTheGradientsBytes) {
  FakeServer server(ReferenceCompute);  // the backward echoes dq = q, dk = k, dv = v
  AttendCommandOptions o = SmallCommand(server.target());
  o.dtype = "fp32";
  o.shm = true;
  o.backward = true;
  o.check = false;  // the echoed gradients are no gradients
  o.grads_npy_prefix = TempPath("shm_");
  std::ostringstream out;
  EXPECT_EQ(RunAttendCommand(o, out), 0) << out.str();
  EXPECT_EQ(server.service().backward_calls(), 1);
  EXPECT_EQ(server.service().shm.calls_with_shm(), 2);  // forward and backward
  EXPECT_EQ(server.service().shm.registrations(), 2);   // a region each
  EXPECT_EQ(server.service().shm.registered(), 0);
  EXPECT_THAT(OurSharedMemoryObjects(), ::testing::IsEmpty());
  // The backward's timing table has the copies too.
  const std::string text = out.str();
  const size_t gradients = text.find("gradients in");
  ASSERT_NE(gradients, std::string::npos) << text;
  EXPECT_NE(text.find("  shm_in ", gradients), std::string::npos) << text;
  const v1::AttendRequest sent =
      MakeSyntheticRequest(o.batch, o.seqlen, o.heads, o.heads_k, o.head_dim, DType::kF32, o.seed);
  for (const auto& [name, like] : {std::pair{"dq", &sent.q()}, std::pair{"dv", &sent.v()}}) {
    absl::StatusOr<NpyArray> g = ReadNpy(absl::StrCat(o.grads_npy_prefix, name, ".npy"));
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_EQ(g->data, like->data()) << name;
  }
}

TEST(AttendCommandTest, SharedMemoryRefusedByTheServiceLeavesNothingBehind) {
  FakeServer server(ReferenceCompute);
  server.service().shm.refuse = true;
  AttendCommandOptions o = SmallCommand(server.target());
  o.shm = true;
  std::ostringstream out;
  EXPECT_EQ(RunAttendCommand(o, out), kExitRpcFailed) << out.str();
  EXPECT_THAT(out.str(), HasSubstr("error: PERMISSION_DENIED: not on this host\n"));
  EXPECT_EQ(server.service().unary_calls(), 0);
  EXPECT_THAT(OurSharedMemoryObjects(), ::testing::IsEmpty());
}

TEST(AttendCommandTest, SharedMemoryAndStreamExcludeEachOther) {
  AttendCommandOptions o = SmallCommand("127.0.0.1:1");
  o.shm = true;
  o.streaming = true;
  std::ostringstream out;
  EXPECT_EQ(RunAttendCommand(o, out), 2);
  EXPECT_THAT(out.str(), HasSubstr("--shm and --stream exclude each other"));
}

}  // namespace
}  // namespace ringattn
