#include "worker/coordinator_store.h"

#include <grpcpp/grpcpp.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gloo/common/error.h"

namespace ringattn {
namespace {

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

std::string KeyList(const std::vector<std::string>& keys) {
  return absl::StrCat("[", absl::StrJoin(keys, ", "), "]");
}

// Gloo's Store interface wants an exception; its message carries the whole status.
[[noreturn]] void Throw(const std::string& what, const absl::Status& status) {
  throw gloo::IoException(absl::StrCat("coordinator store: ", what, ": ", status.ToString()));
}

}  // namespace

CoordinatorStore::CoordinatorStore(std::shared_ptr<v1::CoordinatorService::StubInterface> stub,
                                   std::string prefix, std::chrono::milliseconds timeout)
    : stub_(std::move(stub)), prefix_(std::move(prefix)), timeout_(timeout) {}

void CoordinatorStore::set(const std::string& key, const std::vector<char>& data) {
  absl::Status s = Set(key, data);
  if (!s.ok()) Throw(absl::StrCat("set(", prefix_, key, ")"), s);
}

std::vector<char> CoordinatorStore::get(const std::string& key) {
  absl::StatusOr<std::vector<std::string>> values = Get({key}, timeout_);
  if (!values.ok()) Throw(absl::StrCat("get(", prefix_, key, ")"), values.status());
  const std::string& v = values->front();
  return std::vector<char>(v.begin(), v.end());
}

void CoordinatorStore::wait(const std::vector<std::string>& keys) { wait(keys, timeout_); }

void CoordinatorStore::wait(const std::vector<std::string>& keys,
                            const std::chrono::milliseconds& timeout) {
  absl::StatusOr<std::vector<std::string>> values = Get(keys, timeout);
  if (!values.ok()) {
    Throw(absl::StrCat("wait(", KeyList(keys), " under ", prefix_, ")"), values.status());
  }
}

absl::Status CoordinatorStore::Set(const std::string& key, const std::vector<char>& data) {
  v1::StoreSetRequest request;
  request.set_key(absl::StrCat(prefix_, key));
  request.set_value(std::string(data.begin(), data.end()));
  v1::StoreSetResponse response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout_);
  if (!Track(&ctx)) return cancel_status();
  const grpc::Status s = stub_->StoreSet(&ctx, request, &response);
  Untrack(&ctx);
  if (!s.ok()) {
    const absl::Status cancelled = cancel_status();
    return cancelled.ok() ? FromGrpc(s) : cancelled;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> CoordinatorStore::Get(const std::vector<std::string>& keys,
                                                               std::chrono::milliseconds timeout) {
  v1::StoreGetRequest request;
  for (const std::string& key : keys) request.add_keys(absl::StrCat(prefix_, key));
  v1::StoreGetResponse response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  if (!Track(&ctx)) return cancel_status();
  const grpc::Status s = stub_->StoreGet(&ctx, request, &response);
  Untrack(&ctx);
  if (!s.ok()) {
    const absl::Status cancelled = cancel_status();
    return cancelled.ok() ? FromGrpc(s) : cancelled;
  }
  if (response.values_size() != static_cast<int>(keys.size())) {
    return absl::InternalError(absl::StrCat("StoreGet of ", keys.size(), " keys returned ",
                                            response.values_size(), " values"));
  }
  return std::vector<std::string>(response.values().begin(), response.values().end());
}

void CoordinatorStore::Cancel(const absl::Status& reason) {
  absl::MutexLock lock(&mu_);
  if (!cancel_status_.ok()) return;
  cancel_status_ = reason.ok() ? absl::CancelledError("rendezvous cancelled") : reason;
  for (grpc::ClientContext* ctx : in_flight_) ctx->TryCancel();
}

bool CoordinatorStore::Track(grpc::ClientContext* ctx) {
  absl::MutexLock lock(&mu_);
  if (!cancel_status_.ok()) return false;
  in_flight_.insert(ctx);
  return true;
}

void CoordinatorStore::Untrack(grpc::ClientContext* ctx) {
  absl::MutexLock lock(&mu_);
  in_flight_.erase(ctx);
}

absl::Status CoordinatorStore::cancel_status() const {
  absl::MutexLock lock(&mu_);
  return cancel_status_;
}

}  // namespace ringattn
