// Human-readable reports of one Attend call: the table of where its time went, and a progress
// bar for long transfers.
#pragma once

#include <cstdint>
#include <iostream>
#include <ostream>
#include <string>

#include "absl/time/time.h"
#include "client/shared_memory_session.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

// Floating-point operations of the request's attention as ForwardFlops counts them (halved when
// causal); 0 when q or k is not 4-D.
double RequestFlops(const v1::AttendRequest& request);

// A table of the response's request id, shard plan (layout, world size, rows per rank), the
// phases (queue, receive, scatter, gather, send, total) in ms and each worker's rows, backend,
// compute, communication wait and ring time. With `flops` > 0 (RequestFlops of the request: the
// response alone does not tell whether the attention was causal) it ends with the throughput
// over the total time and over the slowest worker's ring. With `shm_copies` (a call through
// system shared memory) the client phases end with shm_in and shm_out, the client-local times of
// the copies into and out of the region, outside the client library's call (`client`).
std::string FormatTimings(const v1::AttendResponse& response, double flops = 0,
                          const SharedMemoryCopyTimes* shm_copies = nullptr);
// The same table from its parts (an AttendBackwardResponse has the same three).
std::string FormatTimings(const std::string& request_id, const v1::ShardPlan& plan,
                          const v1::Timings& timings, double flops = 0,
                          const SharedMemoryCopyTimes* shm_copies = nullptr);

// A transfer progress bar drawn on one line with carriage returns. Nothing is drawn until
// `delay` has passed since construction, so fast transfers print nothing.
class ProgressBar {
 public:
  explicit ProgressBar(std::string label, std::ostream* out = &std::cerr,
                       absl::Duration delay = absl::Seconds(1));
  ~ProgressBar();

  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // `done` of `total` bytes moved (a ProgressFn).
  void Update(int64_t done, int64_t total);
  // Ends the line if the bar was drawn. Called by the destructor.
  void Finish();

 private:
  const std::string label_;
  std::ostream* const out_;
  const absl::Duration delay_;
  const absl::Time start_;
  absl::Time last_draw_ = absl::InfinitePast();
  bool drawn_ = false;
  size_t last_width_ = 0;
};

}  // namespace ringattn
