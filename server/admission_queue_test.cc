// AdmissionQueue: the bounds by requests and by bytes, each client's share of them, and the
// order in which clients are served.
#include "server/admission_queue.h"

#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;

std::shared_ptr<AttendJob> Job(const std::string& client, const std::string& id) {
  auto job = std::make_shared<AttendJob>();
  job->client = client;
  job->request_id = id;
  return job;
}

// The ids of the jobs popped until the queue is empty.
std::vector<std::string> Drain(AdmissionQueue& q) {
  std::vector<std::string> ids;
  while (std::shared_ptr<AttendJob> job = q.Pop(absl::ZeroDuration()))
    ids.push_back(job->request_id);
  return ids;
}

TEST(AdmissionQueue, ServesTheClientServedLeastRecentlyFirst) {
  AdmissionQueue q({/*max_jobs=*/16, /*max_bytes=*/0, /*client_share=*/1.0});
  ASSERT_TRUE(q.Push(Job("alice", "a1")).ok());
  EXPECT_EQ(q.Pop(absl::ZeroDuration())->request_id, "a1");  // alice runs a1
  for (const char* id : {"a2", "a3", "a4"}) ASSERT_TRUE(q.Push(Job("alice", id)).ok());
  ASSERT_TRUE(q.Push(Job("bob", "b1")).ok());
  ASSERT_TRUE(q.Push(Job("bob", "b2")).ok());
  ASSERT_TRUE(q.Push(Job("carol", "c1")).ok());
  // bob and carol were never served: first, in arrival order; then one each in turn.
  EXPECT_THAT(Drain(q), ::testing::ElementsAre("b1", "c1", "a2", "b2", "a3", "a4"));
}

TEST(AdmissionQueue, OneClientAloneIsServedInArrivalOrder) {
  AdmissionQueue q({16, 0, 1.0});
  for (const char* id : {"1", "2", "3"}) ASSERT_TRUE(q.Push(Job("alice", id)).ok());
  EXPECT_THAT(Drain(q), ::testing::ElementsAre("1", "2", "3"));
  EXPECT_EQ(q.depth(), 0u);
}

TEST(AdmissionQueue, AClientTakesAtMostItsShareOfTheQueue) {
  AdmissionQueue q({/*max_jobs=*/5, 0, /*client_share=*/0.5});
  EXPECT_EQ(q.client_max_jobs(), 3u);  // ceil(5 x 0.5)
  for (const char* id : {"a1", "a2", "a3"}) ASSERT_TRUE(q.Push(Job("alice", id)).ok());
  const absl::Status flood = q.Push(Job("alice", "a4"));
  EXPECT_EQ(flood.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(flood.message(), HasSubstr("client 'alice' has 3 requests waiting"));
  EXPECT_THAT(flood.message(), HasSubstr("--max_client_share"));
  ASSERT_TRUE(q.Push(Job("bob", "b1")).ok());
  ASSERT_TRUE(q.Push(Job("bob", "b2")).ok());
  const absl::Status full = q.Push(Job("carol", "c1"));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.message(), HasSubstr("admission queue full (5 requests waiting, --max_queue)"));
  // A job taken out (cancelled) frees its client's place.
  auto gone = Job("alice", "a-gone");
  ASSERT_TRUE(q.Remove(q.Pop(absl::ZeroDuration())) == false);  // popped: not in the queue
  ASSERT_TRUE(q.Push(gone).ok());                               // alice's place (a1 left)
  EXPECT_TRUE(q.Remove(gone));
  EXPECT_FALSE(q.Remove(gone));
  EXPECT_TRUE(q.Push(Job("alice", "a5")).ok());
  EXPECT_EQ(q.Push(Job("alice", "a6")).code(), absl::StatusCode::kResourceExhausted);
}

TEST(AdmissionQueue, AQueueOfOneStillAdmitsOne) {
  AdmissionQueue q({/*max_jobs=*/1, 0, 0.5});
  EXPECT_EQ(q.client_max_jobs(), 1u);
  EXPECT_TRUE(q.Push(Job("alice", "a1")).ok());
  EXPECT_EQ(q.Push(Job("bob", "b1")).code(), absl::StatusCode::kResourceExhausted);
}

TEST(AdmissionQueue, BytesAreBoundedInAllAndPerClient) {
  AdmissionQueue q({16, /*max_bytes=*/100, /*client_share=*/0.5});
  EXPECT_EQ(q.client_max_bytes(), 50);
  absl::StatusOr<std::unique_ptr<AdmissionQueue::Hold>> a = q.HoldBytes("alice", 40);
  ASSERT_TRUE(a.ok()) << a.status();
  const absl::StatusOr<std::unique_ptr<AdmissionQueue::Hold>> a_more = q.HoldBytes("alice", 11);
  EXPECT_EQ(a_more.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(a_more.status().message(), HasSubstr("client 'alice' holds 40 bytes"));
  EXPECT_THAT(a_more.status().message(), HasSubstr("--max_queued_bytes 100"));
  absl::StatusOr<std::unique_ptr<AdmissionQueue::Hold>> b = q.HoldBytes("bob", 50);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(q.held_bytes(), 90);
  const absl::StatusOr<std::unique_ptr<AdmissionQueue::Hold>> c = q.HoldBytes("carol", 11);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(c.status().message(), HasSubstr("the service holds 90 bytes"));
  const absl::StatusOr<std::unique_ptr<AdmissionQueue::Hold>> huge = q.HoldBytes("dave", 51);
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(huge.status().message(), HasSubstr("exceed what one client may hold: 50 bytes"));
  a->reset();  // alice's call ended
  EXPECT_EQ(q.held_bytes(), 50);
  EXPECT_TRUE(q.HoldBytes("carol", 11).ok());  // held and released at once
  EXPECT_TRUE(q.HoldBytes("alice", 50).ok());
  b->reset();
  EXPECT_EQ(q.held_bytes(), 0);
}

TEST(AdmissionQueue, NoByteBoundWhenZero) {
  AdmissionQueue q({16, /*max_bytes=*/0, 0.5});
  absl::StatusOr<std::unique_ptr<AdmissionQueue::Hold>> h = q.HoldBytes("alice", int64_t{1} << 50);
  EXPECT_TRUE(h.ok()) << h.status();
}

TEST(AdmissionQueue, ClosedRefusesAndPopReturnsNull) {
  AdmissionQueue q({16, 0, 1.0});
  q.Close();
  EXPECT_EQ(q.Push(Job("alice", "a1")).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(q.Pop(absl::Milliseconds(1)), nullptr);
}

}  // namespace
}  // namespace ringattn
