// Unary compute calls whose tensors go through shared memory instead of the messages (same-host
// clients; as Triton Inference Server's extensions): a region this process creates (a POSIX
// shared-memory object, or a GPU allocation exported by CUDA IPC), registered with the service
// for the session's lifetime, and Attend / AttendBackward calls that place their tensors in it
// (client/shared_memory_placement.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/attention_client.h"
#include "client/shared_memory_placement.h"
#include "client/shared_memory_region.h"
#include "ringattn/v1/attention.pb.h"

namespace ringattn {

// The client-side time of one call through shared memory that the client library's call
// (Timings.client_seconds) does not cover. Client-local: not in the response.
struct SharedMemoryCopyTimes {
  double in_seconds = 0;   // the request built and its inputs copied into the region
  double out_seconds = 0;  // the outputs copied from the region into the response
};

// The memory behind a session: where its bytes are, how to copy between them and host memory,
// and how to register it with the service.
class SessionMemory {
 public:
  virtual ~SessionMemory() = default;
  virtual absl::Span<char> bytes() = 0;  // host addresses, or device addresses for CUDA
  virtual const RegionCopier& copier() const = 0;  // null: host memory (ParallelCopy)
  virtual std::string Describe() const = 0;        // "/key" or "cuda:0"
  virtual absl::Status Register(AttentionClient& client, const std::string& name,
                                absl::Duration timeout) = 0;
  virtual absl::Status Unregister(AttentionClient& client, const std::string& name,
                                  absl::Duration timeout) = 0;
};

// One call at a time: a call's slots are the next call's (a session per thread).
class SharedMemorySession {
 public:
  enum class Kind { kSystem, kCuda };
  // Creates a region of `byte_size` bytes under a fresh key (MakeSharedMemoryKey) and registers
  // it whole with the service through `client` (which must outlive the session), named after
  // the key without its '/'. The region's or the registration's error (the service refuses
  // callers not on its host); the object is unlinked on failure.
  static absl::StatusOr<std::unique_ptr<SharedMemorySession>> Open(AttentionClient& client,
                                                                   int64_t byte_size,
                                                                   absl::Duration timeout);
  // A session over `byte_size` bytes of GPU `device` (cudaMalloc), exported by CUDA IPC and
  // registered with RegisterCudaSharedMemory under a fresh name. UNIMPLEMENTED in a build
  // without CUDA; the CUDA error when there is no such device.
  static absl::StatusOr<std::unique_ptr<SharedMemorySession>> OpenCuda(AttentionClient& client,
                                                                       int64_t byte_size,
                                                                       int device,
                                                                       absl::Duration timeout);
  // Open or OpenCuda (`kind`) with a region of the size `request`'s placement needs.
  static absl::StatusOr<std::unique_ptr<SharedMemorySession>> OpenFor(
      AttentionClient& client, const v1::AttendRequest& request, absl::Duration timeout,
      Kind kind = Kind::kSystem, int device = 0);
  static absl::StatusOr<std::unique_ptr<SharedMemorySession>> OpenFor(
      AttentionClient& client, const v1::AttendBackwardRequest& request, absl::Duration timeout,
      Kind kind = Kind::kSystem, int device = 0);

  // Close (within 5 s, its status ignored) unless it ran; then frees the memory (a system
  // region's object is unlinked).
  ~SharedMemorySession();
  SharedMemorySession(const SharedMemorySession&) = delete;
  SharedMemorySession& operator=(const SharedMemorySession&) = delete;

  // Unregisters the region; later calls return OK without calling the service.
  absl::Status Close(absl::Duration timeout);

  const std::string& name() const { return name_; }
  // The region's object key ("/name") or its GPU ("cuda:0"), and its bytes.
  std::string where() const { return memory_->Describe(); }
  int64_t size() const { return static_cast<int64_t>(memory_->bytes().size()); }

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
  SharedMemorySession(AttentionClient& client, std::unique_ptr<SessionMemory> memory,
                      std::string name);
  static absl::StatusOr<std::unique_ptr<SharedMemorySession>> Registered(
      AttentionClient& client, std::unique_ptr<SessionMemory> memory, std::string name,
      absl::Duration timeout);
  template <typename Request, typename Call>
  auto CallThrough(const Request& request, SharedMemoryCopyTimes* copies, const Call& call)
      -> decltype(call(request));
  template <typename Request>
  absl::StatusOr<Request> PlaceIn(const Request& request);

  AttentionClient& client_;
  std::unique_ptr<SessionMemory> memory_;
  std::string name_;
  bool registered_ = false;
};

}  // namespace ringattn
