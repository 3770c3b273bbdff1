// `ringattn attend --shm` and `ringattn bench --shm` against the real service: an in-process
// coordinator with three `ringattn worker` processes (CPU kernel, Gloo over loopback), the
// outputs and gradients checked against the fp64 reference, and the service's registration RPCs
// as the client library calls them.
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "cli/attend_command.h"
#include "cli/bench_command.h"
#include "cli/shared_memory_test_util.h"
#include "client/attention_client.h"
#include "client/npy.h"
#include "client/shared_memory_region.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/service_fixture.h"

namespace ringattn {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr absl::Duration kTimeout = absl::Seconds(60);

class ShmServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    service_ = new test::LocalService(3, Coordinator::Options(), "cpu");
  }
  static void TearDownTestSuite() {
    delete service_;
    service_ = nullptr;
  }
  void SetUp() override {
    ASSERT_FALSE(test::WorkerBinary().empty()) << "set RINGATTN_BIN to the ringattn binary";
    ASSERT_TRUE(service_->start_status().ok()) << service_->start_status();
  }
  void TearDown() override { EXPECT_THAT(OurSharedMemoryObjects(), ::testing::IsEmpty()); }

  static AttendCommandOptions Command() {
    AttendCommandOptions o;
    o.target = service_->address();
    o.batch = 1;
    o.head_dim = 64;
    o.check = true;
    o.shm = true;
    o.timeout_seconds = 120;
    return o;
  }

  static test::LocalService* service_;
};

test::LocalService* ShmServiceTest::service_ = nullptr;

// fp32 q [1, 37, 5, 64] and GQA k, v [1, 37, 1, 64], causal, on `o` (attend's or bench's).
template <typename Options>
void SetGqaProblem(Options* o) {
  o->batch = 1;
  o->seqlen = 37;
  o->heads = 5;
  o->heads_k = 1;
  o->head_dim = 64;
  o->dtype = "fp32";
  o->causal = true;
}

TEST_F(ShmServiceTest, AttendAndItsGradientsPassTheCheckAtAwkwardSizes) {
  struct Case {
    int batch;
    int64_t seqlen;
    int heads, heads_k;
    const char* dtype;
    bool causal, options;  // options: window, ALiBi and softcap
  };
  for (const Case c :
       {Case{1, 37, 5, 1, "fp32", true, false}, Case{2, 7, 5, 5, "bf16", false, false},
        Case{1, 37, 4, 2, "fp16", true, true}}) {
    AttendCommandOptions o = Command();
    o.batch = c.batch;
    o.seqlen = c.seqlen;
    o.heads = c.heads;
    o.heads_k = c.heads_k;
    o.dtype = c.dtype;
    o.causal = c.causal;
    if (c.options) {
      o.window_left = 20;
      o.alibi = true;
      o.softcap = 30;
    }
    o.backward = true;
    const std::string label =
        absl::StrCat("seq ", c.seqlen, ", heads ", c.heads, "/", c.heads_k, ", ", c.dtype);
    std::ostringstream out;
    EXPECT_EQ(RunAttendCommand(o, out), 0) << label << "\n" << out.str();
    EXPECT_THAT(out.str(), AllOf(HasSubstr("via Attend (unary, system shared memory)"),
                                 HasSubstr("check: PASS"), HasSubstr("check gradients: PASS"),
                                 HasSubstr("  shm_in "), HasSubstr("  shm_out ")))
        << label;
  }
}

TEST_F(ShmServiceTest, SharedMemoryGivesTheSameBytesAsTheMessages) {
  std::vector<std::string> outputs;
  for (const bool shm : {false, true}) {
    AttendCommandOptions o = Command();
    SetGqaProblem(&o);
    o.shm = shm;
    o.backward = true;
    o.out_npy = absl::StrCat(::testing::TempDir(), "/shm_service_test_out_", shm, ".npy");
    o.grads_npy_prefix = absl::StrCat(::testing::TempDir(), "/shm_service_test_", shm, "_");
    std::ostringstream out;
    ASSERT_EQ(RunAttendCommand(o, out), 0) << out.str();
    std::string bytes;
    for (const std::string& path : {o.out_npy, o.grads_npy_prefix + "dq.npy",
                                    o.grads_npy_prefix + "dk.npy", o.grads_npy_prefix + "dv.npy"}) {
      absl::StatusOr<NpyArray> a = ReadNpy(path);
      ASSERT_TRUE(a.ok()) << a.status();
      bytes += a->data;
    }
    outputs.push_back(bytes);
  }
  // The same ring on the same inputs: identical results either way.
  EXPECT_TRUE(outputs[0] == outputs[1]);
}

TEST_F(ShmServiceTest, BenchForwardAndBackward) {
  for (const bool backward : {false, true}) {
    BenchOptions o;
    o.target = service_->address();
    o.concurrency = 2;
    o.requests = 6;
    SetGqaProblem(&o);
    o.backward = backward;
    o.shm = true;
    o.timeout_seconds = 120;
    std::ostringstream out;
    EXPECT_EQ(RunBenchCommand(o, out), 0) << out.str();
    EXPECT_THAT(out.str(), AllOf(HasSubstr("6 sent, 6 ok, 0 failed"),
                                 HasSubstr("shared memory: 2 regions of "),
                                 HasSubstr("system shared memory)"), HasSubstr("  shm_in ")));
  }
}

TEST_F(ShmServiceTest, TheClientLibraryRegistersListsAndUnregisters) {
  absl::StatusOr<ConnectedClient> c = ConnectAndGetInfo(service_->address(), kTimeout);
  ASSERT_TRUE(c.ok()) << c.status();
  AttentionClient& client = *c->client;
  absl::StatusOr<std::unique_ptr<SharedMemoryRegion>> region =
      SharedMemoryRegion::Create(MakeSharedMemoryKey(), 8192);
  ASSERT_TRUE(region.ok()) << region.status();
  const std::string& key = (*region)->key();
  ASSERT_TRUE(client.RegisterSystemSharedMemory("whole", key, 0, 8192, kTimeout).ok());
  ASSERT_TRUE(client.RegisterSystemSharedMemory("tail", key, 4096, 4096, kTimeout).ok());
  // A name taken, a range past the object's end.
  EXPECT_FALSE(client.RegisterSystemSharedMemory("whole", key, 0, 64, kTimeout).ok());
  EXPECT_FALSE(client.RegisterSystemSharedMemory("past", key, 4096, 8192, kTimeout).ok());

  absl::StatusOr<std::vector<v1::SystemSharedMemoryRegion>> tail =
      client.SystemSharedMemoryStatus("tail", kTimeout);
  ASSERT_TRUE(tail.ok()) << tail.status();
  ASSERT_EQ(tail->size(), 1u);
  EXPECT_EQ((*tail)[0].key(), key);
  EXPECT_EQ((*tail)[0].offset(), 4096);
  EXPECT_EQ((*tail)[0].byte_size(), 4096);
  absl::StatusOr<std::vector<v1::SystemSharedMemoryRegion>> all =
      client.SystemSharedMemoryStatus("", kTimeout);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), 2u);

  EXPECT_TRUE(client.UnregisterSystemSharedMemory("tail", kTimeout).ok());
  EXPECT_TRUE(client.UnregisterSystemSharedMemory("", kTimeout).ok());
  all = client.SystemSharedMemoryStatus("", kTimeout);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_TRUE(all->empty());
}

}  // namespace
}  // namespace ringattn
