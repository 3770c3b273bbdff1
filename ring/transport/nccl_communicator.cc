#include "ring/transport/nccl_communicator.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

// Non-blocking communicators, ncclCommFinalize and ncclGetLastError arrived in NCCL 2.14.
#if !defined(NCCL_VERSION_CODE) || NCCL_VERSION_CODE < NCCL_VERSION(2, 14, 0)
#error "the NCCL ring transport needs NCCL 2.14 or later (non-blocking communicators)"
#endif

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

// RA_NCCL_RETURN_IF_ERROR(expr, comm): any result but ncclSuccess becomes the status.
#define RA_NCCL_RETURN_IF_ERROR(expr, comm)                                                 \
  do {                                                                                      \
    const ncclResult_t ra_nccl_result_ = (expr);                                            \
    if (ra_nccl_result_ != ncclSuccess) {                                                   \
      return ::ringattn::NcclErrorStatus(ra_nccl_result_, #expr, __FILE__, __LINE__, comm); \
    }                                                                                       \
  } while (0)

}  // namespace

absl::Status NcclErrorStatus(ncclResult_t result, const char* expr, const char* file, int line,
                             ncclComm_t comm) {
  const char* last = ncclGetLastError(comm);
  const std::string message =
      absl::StrCat(file, ":", line, ": ", expr, " failed: ", ncclGetErrorString(result), " (",
                   static_cast<int>(result),
                   "); last NCCL error: ", last != nullptr && last[0] != '\0' ? last : "none");
  switch (result) {
    case ncclRemoteError:
    case ncclSystemError:
      return absl::UnavailableError(message);
    case ncclInvalidArgument:
    case ncclInvalidUsage:
      return absl::InvalidArgumentError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::StatusOr<std::string> NcclCommunicator::GetUniqueId() {
  ncclUniqueId id;
  RA_NCCL_RETURN_IF_ERROR(ncclGetUniqueId(&id), nullptr);
  return std::string(id.internal, NCCL_UNIQUE_ID_BYTES);
}

NcclCommunicator::NcclCommunicator(int rank, int world, absl::Duration timeout, ncclComm_t comm)
    : rank_(rank), world_(world), timeout_(timeout), comm_(comm) {}

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(
    int rank, int world, std::string_view unique_id, absl::Duration timeout) {
  if (world < 1 || rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(
        absl::StrCat("NCCL communicator needs 0 <= rank < world, got rank ", rank, " of ", world));
  }
  if (timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "NCCL communicator needs a positive timeout, got ", absl::FormatDuration(timeout)));
  }
  if (unique_id.size() != NCCL_UNIQUE_ID_BYTES) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL unique id must be ", NCCL_UNIQUE_ID_BYTES,
                                                   " bytes, got ", unique_id.size()));
  }
  // The header decides what compiles; the library loaded at run time decides what works.
  int version = 0;
  RA_NCCL_RETURN_IF_ERROR(ncclGetVersion(&version), nullptr);
  if (version < NCCL_VERSION(2, 14, 0)) {
    return absl::FailedPreconditionError(
        absl::StrCat("the NCCL library loaded is version code ", version,
                     "; the ring transport needs 2.14 or later (non-blocking communicators)"));
  }
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // no NCCL call may block the host past our deadlines
  ncclComm_t comm = nullptr;
  const ncclResult_t init = ncclCommInitRankConfig(&comm, world, id, rank, &config);
  if (init != ncclSuccess && init != ncclInProgress) {
    const absl::Status error = NcclErrorStatus(
        init, "ncclCommInitRankConfig(&comm, world, id, rank, &config)", __FILE__, __LINE__, comm);
    if (comm != nullptr) (void)ncclCommAbort(comm);  // the failure is what we report
    return error;
  }
  // From here the object owns comm; a failed wait aborts it and the destructor does nothing.
  std::unique_ptr<NcclCommunicator> self(new NcclCommunicator(rank, world, timeout, comm));
  {
    std::unique_lock<std::mutex> lock(self->mu_);
    RA_RETURN_IF_ERROR(
        self->WaitWhileInProgress(lock, "ncclCommInitRankConfig (waiting for every rank to join)"));
  }
  return self;
}

NcclCommunicator::~NcclCommunicator() {
  std::unique_lock<std::mutex> lock(mu_);
  if (comm_ == nullptr) return;  // aborted already
  ncclResult_t state = ncclSuccess;
  const ncclResult_t query = ncclCommGetAsyncError(comm_, &state);
  if (query != ncclSuccess || state != ncclSuccess) {
    AbortLocked(absl::InternalError("communicator unhealthy at destruction"));
    return;
  }
  // A healthy communicator is finalized (flushes outstanding operations, bounded by our
  // timeout) and destroyed; if the finalize fails or times out, WaitWhileInProgress aborts.
  const ncclResult_t finalize = ncclCommFinalize(comm_);
  if (finalize != ncclSuccess && finalize != ncclInProgress) {
    const absl::Status error =
        NcclErrorStatus(finalize, "ncclCommFinalize(comm_)", __FILE__, __LINE__, comm_);
    std::fprintf(stderr, "NcclCommunicator rank %d: %s\n", rank_, error.ToString().c_str());
    AbortLocked(error);
    return;
  }
  if (absl::Status s = WaitWhileInProgress(lock, "ncclCommFinalize"); !s.ok()) {
    std::fprintf(stderr, "NcclCommunicator rank %d: %s\n", rank_, s.ToString().c_str());
    return;  // aborted
  }
  const ncclResult_t destroy = ncclCommDestroy(comm_);
  comm_ = nullptr;
  if (destroy != ncclSuccess) {
    std::fprintf(stderr, "NcclCommunicator rank %d: %s\n", rank_,
                 NcclErrorStatus(destroy, "ncclCommDestroy(comm_)", __FILE__, __LINE__, nullptr)
                     .ToString()
                     .c_str());
  }
}

absl::Status NcclCommunicator::WaitWhileInProgress(std::unique_lock<std::mutex>& lock,
                                                   const char* what) {
  const Clock::time_point start = Clock::now();
  const Clock::time_point deadline = start + absl::ToChronoNanoseconds(timeout_);
  for (;;) {
    if (comm_ == nullptr) return abort_status_;  // Abort got in between two polls
    ncclResult_t state = ncclSuccess;
    RA_RETURN_IF_ERROR(QueryStateLocked(&state));
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) {
      return FailLocked(NcclErrorStatus(state, what, __FILE__, __LINE__, comm_));
    }
    const Clock::time_point now = Clock::now();
    if (now >= deadline) {
      return FailLocked(absl::DeadlineExceededError(
          absl::StrCat("rank ", rank_, " of ", world_, ": ", what, " still in progress after ",
                       absl::FormatDuration(timeout_), "; NCCL communicator aborted")));
    }
    lock.unlock();
    device_comm_internal::PollPause(absl::FromChrono(now - start));
    lock.lock();
  }
}

absl::Status NcclCommunicator::Enqueue(absl::Span<const SendOp> sends,
                                       absl::Span<const RecvOp> recvs, cudaStream_t stream) {
  // A malformed batch is rejected before anything reaches NCCL, so it changes nothing.
  RA_RETURN_IF_ERROR(CheckBatch(rank_, world_, sends, recvs));
  std::unique_lock<std::mutex> lock(mu_);
  if (comm_ == nullptr) return abort_status_;
  // Inside a group NCCL only records the operations; errors are kept until ncclGroupEnd,
  // which must be called to leave the group whatever happened.
  absl::Status first_error;
  auto note = [&](ncclResult_t r, const char* expr, int line) {
    if (r != ncclSuccess && r != ncclInProgress && first_error.ok()) {
      first_error = NcclErrorStatus(r, expr, __FILE__, line, comm_);
    }
  };
  const ncclResult_t start = ncclGroupStart();
  if (start != ncclSuccess) {
    return FailLocked(NcclErrorStatus(start, "ncclGroupStart()", __FILE__, __LINE__, comm_));
  }
  // Zero-byte operations are skipped on both sides (sizes are symmetric by contract).
  for (const SendOp& s : sends) {
    if (s.bytes == 0) continue;
    note(ncclSend(s.data, s.bytes, ncclUint8, s.peer, comm_, stream),
         "ncclSend(data, bytes, ncclUint8, peer, comm_, stream)", __LINE__);
  }
  for (const RecvOp& r : recvs) {
    if (r.bytes == 0) continue;
    note(ncclRecv(r.data, r.bytes, ncclUint8, r.peer, comm_, stream),
         "ncclRecv(data, bytes, ncclUint8, peer, comm_, stream)", __LINE__);
  }
  const ncclResult_t end = ncclGroupEnd();
  note(end, "ncclGroupEnd()", __LINE__);
  if (!first_error.ok()) return FailLocked(first_error);
  // Non-blocking: ncclInProgress means NCCL is still connecting peers or putting the kernels
  // on `stream`; nothing enqueued on `stream` after this call may come before them.
  if (end == ncclInProgress) return WaitWhileInProgress(lock, "ncclGroupEnd (send/recv)");
  return absl::OkStatus();
}

absl::Status NcclCommunicator::CheckHealth() {
  std::lock_guard<std::mutex> lock(mu_);
  if (comm_ == nullptr) return abort_status_;
  ncclResult_t state = ncclSuccess;
  RA_RETURN_IF_ERROR(QueryStateLocked(&state));
  if (state == ncclSuccess || state == ncclInProgress) return absl::OkStatus();
  return FailLocked(NcclErrorStatus(state, "asynchronous NCCL error (ncclCommGetAsyncError)",
                                    __FILE__, __LINE__, comm_));
}

absl::Status NcclCommunicator::QueryStateLocked(ncclResult_t* state) {
  const ncclResult_t query = ncclCommGetAsyncError(comm_, state);
  if (query == ncclSuccess) return absl::OkStatus();
  return FailLocked(
      NcclErrorStatus(query, "ncclCommGetAsyncError(comm_, state)", __FILE__, __LINE__, comm_));
}

absl::Status NcclCommunicator::FailLocked(const absl::Status& error) {
  AbortLocked(error);
  return error;
}

void NcclCommunicator::Abort(const absl::Status& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  AbortLocked(reason);
}

void NcclCommunicator::AbortLocked(const absl::Status& reason) {
  if (comm_ == nullptr) return;  // the first reason sticks
  abort_status_ =
      reason.ok() ? absl::AbortedError("NCCL communicator aborted (with an OK reason)") : reason;
  // Blocking even for a non-blocking communicator; it stops this rank's NCCL kernels, so the
  // streams they occupy drain.
  const ncclResult_t r = ncclCommAbort(comm_);
  comm_ = nullptr;
  if (r != ncclSuccess) {
    std::fprintf(stderr, "NcclCommunicator rank %d: ncclCommAbort failed: %s\n", rank_,
                 ncclGetErrorString(r));
  }
}

}  // namespace ringattn
