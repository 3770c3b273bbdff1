// Identity and transport security end to end (issue #14): TLS on the public API and on the
// internal plane, mTLS, bearer tokens, regions owned by the authenticated client, and admission
// by bytes, fair between clients. Certificates are made at test time by
// tests/make_test_certs.sh (openssl); without openssl the TLS cases skip, saying so.
#include <grpcpp/grpcpp.h>
#include <sys/wait.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/attention_client.h"
#include "client/shared_memory_region.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/cluster_auth.h"
#include "ringattn/v1/worker.grpc.pb.h"
#include "server/coordinator.h"
#include "tests/service_fixture.h"

namespace ringattn {
namespace {

using test::MakeRequest;
using test::Shape;
using ::testing::HasSubstr;

constexpr char kAliceToken[] = "alice-token-0123456789";
constexpr char kAliceRotatedToken[] = "alice-rotated-token-01";
constexpr char kBobToken[] = "bob-token-0123456789ab";

// The certificates of tests/make_test_certs.sh and a tokens file, made once per process.
struct TestFiles {
  bool ok = false;
  std::string why;  // when not ok
  std::string dir;
  std::string path(const std::string& name) const { return dir + "/" + name; }
  std::string tokens() const { return path("tokens"); }
};

const TestFiles& Files() {
  static const TestFiles* const files = [] {
    auto* f = new TestFiles;
    f->dir = ::testing::TempDir() + "/trust_test_" + std::to_string(getpid());
    const std::string command =
        absl::StrCat(RINGATTN_SOURCE_DIR, "/tests/make_test_certs.sh ", f->dir, " >/dev/null");
    const int rc = std::system(command.c_str());
    if (!WIFEXITED(rc) || WEXITSTATUS(rc) != 0) {
      f->why = WIFEXITED(rc) && WEXITSTATUS(rc) == 77
                   ? "openssl not found: the TLS cases need it to make their certificates"
                   : absl::StrCat("tests/make_test_certs.sh failed (", rc, ")");
      return f;
    }
    std::ofstream(f->tokens()) << "# the test's clients\n"
                               << kAliceToken << " alice\n"
                               << kAliceRotatedToken << " alice\n"
                               << kBobToken << " bob\n";
    f->ok = true;
    return f;
  }();
  return *files;
}

#define REQUIRE_CERTIFICATES()                                   \
  do {                                                           \
    if (!Files().ok) GTEST_SKIP() << "skipped: " << Files().why; \
  } while (0)

// A coordinator without workers: its ring never forms, so the dispatcher holds each request it
// takes for `ring_wait` and then fails it UNAVAILABLE; everything before the ring (credentials,
// validation, admission) is as with workers.
std::unique_ptr<Coordinator> StartAlone(Coordinator::Options o) {
  o.world_size = 1;
  auto c = std::make_unique<Coordinator>(o);
  const absl::Status s = c->BuildAndStart();
  EXPECT_TRUE(s.ok()) << s;
  return c;
}

std::string AddressOf(const Coordinator& c) { return absl::StrCat("127.0.0.1:", c.port()); }

// A client of `address` (connecting on its first call).
std::unique_ptr<AttentionClient> Client(const std::string& address, ClientCredentials creds) {
  absl::StatusOr<std::unique_ptr<AttentionClient>> c =
      AttentionClient::Connect(address, absl::ZeroDuration(), creds);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

ClientCredentials Tls(const std::string& token = "") {
  ClientCredentials c;
  c.tls_ca = Files().path("ca.pem");
  c.token = token;
  return c;
}

ClientCredentials TlsWithCertificate(const std::string& name) {
  ClientCredentials c = Tls();
  c.tls_cert = Files().path(name + ".pem");
  c.tls_key = Files().path(name + ".key");
  return c;
}

ClientCredentials Token(const std::string& token) {
  ClientCredentials c;
  c.token = token;
  return c;
}

absl::StatusCode InfoCode(AttentionClient& client) {
  return client.GetInfo(absl::Seconds(5)).status().code();
}

std::vector<std::string> InternalTlsArgs() {
  return {"--internal_tls_cert=" + Files().path("server.pem"),
          "--internal_tls_key=" + Files().path("server.key"),
          "--internal_tls_ca=" + Files().path("ca.pem")};
}

// TLS on both planes and bearer tokens, with a ring of 2 workers that registered and formed
// over the internal plane's mTLS: a plaintext client cannot talk to the service, a TLS client
// without a token or with a wrong one is UNAUTHENTICATED (health excepted), and the right token
// gets right answers, unary and streamed; the internal port refuses plaintext too.
TEST(Trust, TlsOnBothPlanesAndBearerTokens) {
  REQUIRE_CERTIFICATES();
  ASSERT_FALSE(test::WorkerBinary().empty()) << "RINGATTN_BIN not set";
  Coordinator::Options o;
  o.tls = {Files().path("server.pem"), Files().path("server.key"), ""};
  o.internal_tls = {Files().path("server.pem"), Files().path("server.key"), Files().path("ca.pem")};
  o.api_tokens_file = Files().tokens();
  o.health_listen_address = "127.0.0.1:0";
  test::LocalService svc(2, o, "cpu", InternalTlsArgs());
  ASSERT_TRUE(svc.start_status().ok()) << svc.start_status();

  // Plaintext to the TLS port: no connection, whatever the token.
  auto plain = Client(svc.address(), Token(kAliceToken));
  EXPECT_EQ(InfoCode(*plain), absl::StatusCode::kUnavailable);
  // A server certificate from a CA the client does not trust.
  ClientCredentials untrusted = Token(kAliceToken);
  untrusted.tls_ca = Files().path("rogue_ca.pem");
  EXPECT_EQ(InfoCode(*Client(svc.address(), untrusted)), absl::StatusCode::kUnavailable);

  Shape s{1, 37, 5, 1, 64, v1::DTYPE_FP32};
  const v1::AttendRequest req = MakeRequest(s);
  auto anonymous = Client(svc.address(), Tls());
  for (const absl::Status& st :
       {anonymous->GetInfo(absl::Seconds(10)).status(),
        anonymous->Attend(req, absl::Seconds(30)).status(),
        anonymous->AttendStreaming(req, absl::Seconds(30), 4096).status(),
        anonymous->SystemSharedMemoryStatus("", absl::Seconds(10)).status()}) {
    EXPECT_EQ(st.code(), absl::StatusCode::kUnauthenticated) << st;
    EXPECT_THAT(st.message(), HasSubstr("'authorization: Bearer <token>'"));
  }
  // Health needs no token (probes carry none); it turns SERVING within the coordinator's 50 ms
  // status poll of the ring.
  const TlsPem ca = *ReadTlsFiles({"", "", Files().path("ca.pem")}, "--tls");
  const auto health =
      grpc::CreateCustomChannel(svc.address(), TlsChannelCredentials(ca), grpc::ChannelArguments());
  const std::string kServing("\x08\x01", 2);
  std::string status = test::HealthStatus(health);
  for (int i = 0; i < 40 && status != kServing; ++i) {
    absl::SleepFor(absl::Milliseconds(50));
    status = test::HealthStatus(health);
  }
  EXPECT_EQ(status, kServing);
  // The same on the plaintext health port, which serves nothing else.
  const std::string health_address = absl::StrCat("127.0.0.1:", svc.coordinator().health_port());
  EXPECT_EQ(
      test::HealthStatus(grpc::CreateChannel(health_address, grpc::InsecureChannelCredentials())),
      kServing);
  EXPECT_EQ(InfoCode(*Client(health_address, Token(kAliceToken))),
            absl::StatusCode::kUnimplemented);

  auto forged = Client(svc.address(), Tls("alice-token-0123456780"));
  const absl::Status wrong = forged->Attend(req, absl::Seconds(30)).status();
  EXPECT_EQ(wrong.code(), absl::StatusCode::kUnauthenticated) << wrong;
  EXPECT_THAT(wrong.message(), HasSubstr("not valid"));

  auto alice = Client(svc.address(), Tls(kAliceToken));
  absl::StatusOr<v1::AttendResponse> unary = alice->Attend(req, absl::Seconds(60));
  ASSERT_TRUE(unary.ok()) << unary.status();
  test::ExpectMatchesReference(req, *unary);
  absl::StatusOr<v1::AttendResponse> streamed =
      alice->AttendStreaming(req, absl::Seconds(60), 4096);
  ASSERT_TRUE(streamed.ok()) << streamed.status();
  test::ExpectMatchesReference(req, *streamed);

  // The internal port with the right secret but without TLS: no connection.
  const ClusterSecret plain_secret = *ClusterSecret::FromString(svc.coordinator().cluster_secret());
  auto internal = v1::CoordinatorService::NewStub(
      ClusterChannel(svc.coordinator().internal_address(), grpc::ChannelArguments(), plain_secret));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  v1::RegisterRequest rogue;
  rogue.set_address("127.0.0.1:1");
  v1::RegisterResponse unused;
  EXPECT_EQ(internal->Register(&ctx, rogue, &unused).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(svc.coordinator().worker_addresses().size(), 2u);
}

// mTLS: a client without a certificate, or with one from another CA, cannot connect; with one
// the CA signed it can, and its certificate's name is its identity: one client's shared-memory
// regions are not another's.
TEST(Trust, MutualTlsNeedsAClientCertificateThatNamesTheCaller) {
  REQUIRE_CERTIFICATES();
  Coordinator::Options o;
  o.tls = {Files().path("server.pem"), Files().path("server.key"), Files().path("ca.pem")};
  std::unique_ptr<Coordinator> c = StartAlone(o);
  const std::string address = AddressOf(*c);
  EXPECT_EQ(InfoCode(*Client(address, Tls())), absl::StatusCode::kUnavailable);
  EXPECT_EQ(InfoCode(*Client(address, TlsWithCertificate("rogue"))),
            absl::StatusCode::kUnavailable);
  auto alice = Client(address, TlsWithCertificate("alice"));
  auto bob = Client(address, TlsWithCertificate("bob"));
  ASSERT_EQ(InfoCode(*alice), absl::StatusCode::kOk);
  ASSERT_EQ(InfoCode(*bob), absl::StatusCode::kOk);

  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> region =
      SharedMemoryRegion::Create(MakeSharedMemoryKey(), 4096);
  ASSERT_TRUE(region.ok()) << region.status();
  ASSERT_TRUE(
      alice->RegisterSystemSharedMemory("r", (*region)->key(), 0, 4096, absl::Seconds(10)).ok());
  EXPECT_EQ(alice->SystemSharedMemoryStatus("r", absl::Seconds(10))->size(), 1u);
  EXPECT_EQ(bob->SystemSharedMemoryStatus("r", absl::Seconds(10)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(bob->SystemSharedMemoryStatus("", absl::Seconds(10))->empty());
}

// Tokens name clients: a region registered by one client is invisible to another (listing,
// unregistering and referring to it in a request all fail as for an unknown name), the same
// name is free for the other, and another token of the same client sees it.
TEST(Trust, RegionsBelongToTheTokensClient) {
  REQUIRE_CERTIFICATES();  // for the tokens file
  Coordinator::Options o;
  o.api_tokens_file = Files().tokens();
  o.ring_wait = absl::Milliseconds(100);
  std::unique_ptr<Coordinator> c = StartAlone(o);
  const std::string address = AddressOf(*c);
  auto alice = Client(address, Token(kAliceToken));
  auto alice_rotated = Client(address, Token(kAliceRotatedToken));
  auto bob = Client(address, Token(kBobToken));
  auto anonymous = Client(address, {});

  Shape s{1, 16, 4, 4, 64, v1::DTYPE_FP32};
  const int64_t bytes = 16 * 4 * 64 * 4;
  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> region =
      SharedMemoryRegion::Create(MakeSharedMemoryKey(), bytes);
  ASSERT_TRUE(region.ok()) << region.status();
  const std::string key = (*region)->key();
  EXPECT_EQ(anonymous->RegisterSystemSharedMemory("r", key, 0, bytes, absl::Seconds(10)).code(),
            absl::StatusCode::kUnauthenticated);
  ASSERT_TRUE(alice->RegisterSystemSharedMemory("r", key, 0, bytes, absl::Seconds(10)).ok());
  EXPECT_EQ(alice_rotated->SystemSharedMemoryStatus("r", absl::Seconds(10))->size(), 1u);

  EXPECT_EQ(bob->SystemSharedMemoryStatus("r", absl::Seconds(10)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(bob->UnregisterSystemSharedMemory("r", absl::Seconds(10)).code(),
            absl::StatusCode::kNotFound);
  v1::AttendRequest uses_alices = MakeRequest(s);
  uses_alices.mutable_q()->clear_data();
  v1::SharedMemoryRef* ref = uses_alices.mutable_q()->mutable_shm();
  ref->set_region("r");
  ref->set_byte_size(bytes);
  const absl::Status refused = bob->Attend(uses_alices, absl::Seconds(10)).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
  EXPECT_THAT(refused.message(), HasSubstr("not registered by this caller"));
  // Alice's own reference passes every check (and waits for the ring this test has not).
  EXPECT_EQ(alice->Attend(uses_alices, absl::Seconds(10)).status().code(),
            absl::StatusCode::kUnavailable);

  ASSERT_TRUE(bob->RegisterSystemSharedMemory("r", key, 0, bytes, absl::Seconds(10)).ok());
  ASSERT_TRUE(bob->UnregisterSystemSharedMemory("r", absl::Seconds(10)).ok());
  EXPECT_EQ(alice->SystemSharedMemoryStatus("r", absl::Seconds(10))->size(), 1u);
}

// Waits up to 10 s for `pred` of the coordinator's admission state.
template <typename Pred>
bool AdmissionReaches(const Coordinator& c, Pred pred) {
  const absl::Time stop_by = absl::Now() + absl::Seconds(10);
  while (!pred(c.admission())) {
    if (absl::Now() >= stop_by) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

// A client flooding the queue is refused past its share while another client's request is
// admitted and taken before the flooder's next one. The ring is never formed: the dispatcher
// holds each request for ring_wait, so the queue's contents are known at every step, and the
// calls end (UNAVAILABLE) one ring_wait apart in the order they were taken.
TEST(Trust, AFloodingClientDoesNotBlockAnother) {
  REQUIRE_CERTIFICATES();  // for the tokens file
  Coordinator::Options o;
  o.api_tokens_file = Files().tokens();
  o.max_queue = 4;  // 2 per client
  o.ring_wait = absl::Seconds(2);
  std::unique_ptr<Coordinator> c = StartAlone(o);
  const std::string address = AddressOf(*c);
  auto alice = Client(address, Token(kAliceToken));
  auto bob = Client(address, Token(kBobToken));
  const v1::AttendRequest req = MakeRequest(Shape{1, 16, 4, 4, 64, v1::DTYPE_FP32});

  struct Call {
    std::string name;
    absl::Status status;
    int ended = -1;  // the order in which the calls ended
  };
  std::vector<std::unique_ptr<Call>> calls;
  std::vector<std::thread> threads;
  std::atomic<int> ended{0};
  auto send = [&](AttentionClient& client, const std::string& name) {
    calls.push_back(std::make_unique<Call>());
    Call* call = calls.back().get();
    call->name = name;
    threads.emplace_back([&client, &req, &ended, call] {
      call->status = client.Attend(req, absl::Seconds(60)).status();
      call->ended = ended++;
    });
  };
  send(*alice, "a1");
  ASSERT_TRUE(AdmissionReaches(*c, [](auto s) { return s.running && s.queued == 0; }));
  send(*alice, "a2");
  ASSERT_TRUE(AdmissionReaches(*c, [](auto s) { return s.queued == 1; }));
  send(*alice, "a3");
  ASSERT_TRUE(AdmissionReaches(*c, [](auto s) { return s.queued == 2; }));
  const absl::Status flood = alice->Attend(req, absl::Seconds(10)).status();
  EXPECT_EQ(flood.code(), absl::StatusCode::kResourceExhausted) << flood;
  EXPECT_THAT(flood.message(), HasSubstr("client 'client:alice' has 2 requests waiting"));
  EXPECT_THAT(flood.message(), HasSubstr("--max_client_share"));
  send(*bob, "b1");
  ASSERT_TRUE(AdmissionReaches(*c, [](auto s) { return s.queued == 3; }))
      << "bob's request was not admitted beside alice's";
  for (std::thread& t : threads) t.join();
  std::vector<std::string> order(calls.size());
  for (const auto& call : calls) {
    EXPECT_EQ(call->status.code(), absl::StatusCode::kUnavailable) << call->name << call->status;
    order[call->ended] = call->name;
  }
  EXPECT_THAT(order, ::testing::ElementsAre("a1", "b1", "a2", "a3"));
  EXPECT_TRUE(AdmissionReaches(*c, [](auto s) { return s.held_bytes == 0; }));
}

// Past the byte budget a request is refused, unary or streamed (the stream at its header, before
// its chunks), naming --max_queued_bytes; one within it is admitted; nothing stays held.
TEST(Trust, RequestBytesPastTheBudgetAreRefused) {
  Coordinator::Options o;
  o.max_queued_bytes = 64 << 10;  // 32 KiB per client
  o.ring_wait = absl::Milliseconds(100);
  std::unique_ptr<Coordinator> c = StartAlone(o);
  auto client = Client(AddressOf(*c), {});
  const v1::AttendRequest big = MakeRequest(Shape{1, 16, 4, 4, 64, v1::DTYPE_FP32});  // 48 KiB
  for (const absl::Status& st : {client->Attend(big, absl::Seconds(10)).status(),
                                 client->AttendStreaming(big, absl::Seconds(10), 4096).status()}) {
    EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
    EXPECT_THAT(st.message(), HasSubstr("exceed what one client may hold: 32768 bytes"));
    EXPECT_THAT(st.message(), HasSubstr("--max_queued_bytes 65536"));
  }
  const v1::AttendRequest small = MakeRequest(Shape{1, 16, 2, 2, 64, v1::DTYPE_FP32});  // 24 KiB
  EXPECT_EQ(client->Attend(small, absl::Seconds(10)).status().code(),
            absl::StatusCode::kUnavailable);  // admitted; no ring
  EXPECT_TRUE(AdmissionReaches(*c, [](auto s) { return s.held_bytes == 0; }));
}

}  // namespace
}  // namespace ringattn
