#include "client/shared_memory_session.h"

#include <utility>

#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "client/shared_memory_placement.h"

namespace ringattn {
namespace {

constexpr absl::Duration kCloseTimeoutOnDestruction = absl::Seconds(5);

template <typename Request>
absl::StatusOr<std::unique_ptr<SharedMemorySession>> OpenSized(AttentionClient& client,
                                                               const Request& request,
                                                               absl::Duration timeout) {
  RA_ASSIGN_OR_RETURN(const SharedMemoryPlacement placement, SharedMemoryPlacement::Of(request));
  return SharedMemorySession::Open(client, placement.bytes(), timeout);
}

}  // namespace

SharedMemorySession::SharedMemorySession(AttentionClient& client,
                                         std::unique_ptr<SharedMemoryRegion> region)
    : client_(client), region_(std::move(region)), name_(region_->key().substr(1)) {}

absl::StatusOr<std::unique_ptr<SharedMemorySession>> SharedMemorySession::Open(
    AttentionClient& client, int64_t byte_size, absl::Duration timeout) {
  RA_ASSIGN_OR_RETURN(std::unique_ptr<SharedMemoryRegion> region,
                      SharedMemoryRegion::Create(MakeSharedMemoryKey(), byte_size));
  std::unique_ptr<SharedMemorySession> session(new SharedMemorySession(client, std::move(region)));
  const SharedMemoryRegion& r = *session->region_;
  RA_RETURN_IF_ERROR(
      client.RegisterSystemSharedMemory(session->name_, r.key(), 0, r.size(), timeout));
  session->registered_ = true;
  return session;
}

absl::StatusOr<std::unique_ptr<SharedMemorySession>> SharedMemorySession::OpenFor(
    AttentionClient& client, const v1::AttendRequest& request, absl::Duration timeout) {
  return OpenSized(client, request, timeout);
}

absl::StatusOr<std::unique_ptr<SharedMemorySession>> SharedMemorySession::OpenFor(
    AttentionClient& client, const v1::AttendBackwardRequest& request, absl::Duration timeout) {
  return OpenSized(client, request, timeout);
}

SharedMemorySession::~SharedMemorySession() { Close(kCloseTimeoutOnDestruction).IgnoreError(); }

absl::Status SharedMemorySession::Close(absl::Duration timeout) {
  if (!registered_) return absl::OkStatus();
  registered_ = false;
  return client_.UnregisterSystemSharedMemory(name_, timeout);
}

template <typename Request>
absl::StatusOr<Request> PlaceIn(const Request& request, const std::string& name,
                                SharedMemoryRegion& region) {
  RA_ASSIGN_OR_RETURN(const SharedMemoryPlacement placement, SharedMemoryPlacement::Of(request));
  return placement.Place(request, name,
                         absl::Span<char>(region.data(), static_cast<size_t>(region.size())));
}

absl::StatusOr<v1::AttendRequest> SharedMemorySession::PlaceResident(
    const v1::AttendRequest& request) {
  return PlaceIn(request, name_, *region_);
}

absl::StatusOr<v1::AttendBackwardRequest> SharedMemorySession::PlaceResident(
    const v1::AttendBackwardRequest& request) {
  return PlaceIn(request, name_, *region_);
}

template <typename Request, typename Call>
auto SharedMemorySession::CallThrough(const Request& request, SharedMemoryCopyTimes* copies,
                                      const Call& call) -> decltype(call(request)) {
  const absl::Time t0 = absl::Now();
  RA_ASSIGN_OR_RETURN(const SharedMemoryPlacement placement, SharedMemoryPlacement::Of(request));
  const absl::Span<char> bytes(region_->data(), static_cast<size_t>(region_->size()));
  RA_ASSIGN_OR_RETURN(const Request sent, placement.Place(request, name_, bytes));
  const absl::Time t1 = absl::Now();
  auto response = call(sent);
  if (!response.ok()) return response;
  const absl::Time t2 = absl::Now();
  RA_RETURN_IF_ERROR(placement.Collect(bytes, &*response));
  if (copies != nullptr) {
    copies->in_seconds = absl::ToDoubleSeconds(t1 - t0);
    copies->out_seconds = absl::ToDoubleSeconds(absl::Now() - t2);
  }
  return response;
}

absl::StatusOr<v1::AttendResponse> SharedMemorySession::Attend(const v1::AttendRequest& request,
                                                               absl::Duration timeout,
                                                               SharedMemoryCopyTimes* copies) {
  return CallThrough(request, copies,
                     [&](const v1::AttendRequest& sent) { return client_.Attend(sent, timeout); });
}

absl::StatusOr<v1::AttendBackwardResponse> SharedMemorySession::AttendBackward(
    const v1::AttendBackwardRequest& request, absl::Duration timeout,
    SharedMemoryCopyTimes* copies) {
  return CallThrough(request, copies, [&](const v1::AttendBackwardRequest& sent) {
    return client_.AttendBackward(sent, timeout);
  });
}

}  // namespace ringattn
