// Unary compute calls whose tensors go through system shared memory instead of the messages
// (same-host clients; as Triton Inference Server's extension): a region this process creates,
// registered with the service for the session's lifetime, and Attend / AttendBackward calls
// that place their tensors in it (client/shared_memory_placement.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/attention_client.h"
#include "client/shared_memory_region.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

// The client-side time of one call through shared memory that the client library's call
// (Timings.client_seconds) does not cover. Client-local: not in the response.
struct SharedMemoryCopyTimes {
  double in_seconds = 0;   // the request built and its inputs copied into the region
  double out_seconds = 0;  // the outputs copied from the region into the response
};

// One call at a time: a call's slots are the next call's (a session per thread).
class SharedMemorySession {
 public:
  // Creates a region of `byte_size` bytes under a fresh key (MakeSharedMemoryKey) and registers
  // it whole with the service through `client` (which must outlive the session), named after
  // the key without its '/'. The region's or the registration's error (the service refuses
  // callers not on its host); the object is unlinked on failure.
  static absl::StatusOr<std::unique_ptr<SharedMemorySession>> Open(AttentionClient& client,
                                                                   int64_t byte_size,
                                                                   absl::Duration timeout);
  // Open with a region of the size `request`'s placement needs.
  static absl::StatusOr<std::unique_ptr<SharedMemorySession>> OpenFor(
      AttentionClient& client, const v1::AttendRequest& request, absl::Duration timeout);
  static absl::StatusOr<std::unique_ptr<SharedMemorySession>> OpenFor(
      AttentionClient& client, const v1::AttendBackwardRequest& request, absl::Duration timeout);

  // Close (within 5 s, its status ignored) unless it ran; then unlinks the object.
  ~SharedMemorySession();
  SharedMemorySession(const SharedMemorySession&) = delete;
  SharedMemorySession& operator=(const SharedMemorySession&) = delete;

  // Unregisters the region; later calls return OK without calling the service.
  absl::Status Close(absl::Duration timeout);

  const std::string& name() const { return name_; }
  const SharedMemoryRegion& region() const { return *region_; }

  // The call with `request`'s tensors (which carry data) in the region: inputs copied in, the
  // outputs written there by the service and copied back into the response, which then reads
  // as an ordinary one. INVALID_ARGUMENT when the request's placement does not fit the region;
  // otherwise the call's status. `copies` (may be null) gets the copies' times.
  absl::StatusOr<v1::AttendResponse> Attend(const v1::AttendRequest& request,
                                            absl::Duration timeout,
                                            SharedMemoryCopyTimes* copies = nullptr);
  absl::StatusOr<v1::AttendBackwardResponse> AttendBackward(
      const v1::AttendBackwardRequest& request, absl::Duration timeout,
      SharedMemoryCopyTimes* copies = nullptr);

  // For a client whose tensors live in the region: copies `request`'s inputs into their slots
  // once and returns the request to send (references only, outputs named in output_shm). Each
  // call of it through the client leaves the outputs in the region (the response carries none)
  // and costs no copy on this side. Errors as Attend's placement.
  absl::StatusOr<v1::AttendRequest> PlaceResident(const v1::AttendRequest& request);
  absl::StatusOr<v1::AttendBackwardRequest> PlaceResident(
      const v1::AttendBackwardRequest& request);

 private:
  SharedMemorySession(AttentionClient& client, std::unique_ptr<SharedMemoryRegion> region);
  template <typename Request, typename Call>
  auto CallThrough(const Request& request, SharedMemoryCopyTimes* copies, const Call& call)
      -> decltype(call(request));

  AttentionClient& client_;
  std::unique_ptr<SharedMemoryRegion> region_;
  std::string name_;
  bool registered_ = false;
};

}  // namespace ringattn
