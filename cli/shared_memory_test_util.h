// For tests: the service side of system shared memory as a fake AttentionService needs it (the
// registration RPCs and their bookkeeping, a request's shm inputs read into data, outputs written
// to their refs), and the shm objects of this process left in /dev/shm.
#pragma once

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/shared_memory.h"
#include "proto/compute_rpcs.h"
#include "ringattn/v1/attention.grpc.pb.h"

namespace ringattn {

// Regions registered by name (for any caller: the fakes do not tell callers apart). Thread-safe.
class FakeSharedMemoryRegistry {
 public:
  // Set before any call: registration answers PERMISSION_DENIED, as for a remote caller.
  bool refuse = false;

  grpc::Status Register(const v1::RegisterSystemSharedMemoryRequest& request) {
    if (refuse) return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "not on this host");
    absl::StatusOr<std::shared_ptr<SharedMemoryMapping>> mapping = SharedMemoryMapping::Open(
        request.key(), request.offset(), request.byte_size(), request.name());
    if (!mapping.ok()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          std::string(mapping.status().message()));
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (!regions_.emplace(request.name(), *mapping).second) {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, request.name());
    }
    ++registrations_;
    return grpc::Status::OK;
  }

  grpc::Status Unregister(const v1::UnregisterSystemSharedMemoryRequest& request) {
    std::lock_guard<std::mutex> lock(mu_);
    if (request.name().empty()) {
      regions_.clear();
    } else if (regions_.erase(request.name()) == 0) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, request.name());
    }
    return grpc::Status::OK;
  }

  grpc::Status Status(const v1::SystemSharedMemoryStatusRequest& request,
                      v1::SystemSharedMemoryStatusResponse* response) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [name, mapping] : regions_) {
      if (!request.name().empty() && request.name() != name) continue;
      v1::SystemSharedMemoryRegion* r = response->add_regions();
      r->set_name(name);
      r->set_key(mapping->key());
      r->set_offset(mapping->offset());
      r->set_byte_size(mapping->size());
    }
    return grpc::Status::OK;
  }

  // Gives every input of `rpc` in `request` that refers to shared memory its bytes (clearing
  // the ref); counts the request as one through shared memory when it had such an input.
  // INVALID_ARGUMENT when a ref does not lie in a registered region or a tensor has both.
  grpc::Status ReadInputs(const ComputeRpc& rpc, google::protobuf::Message* request) {
    bool any = false;
    for (const ComputeTensor& in : rpc.inputs) {
      v1::Tensor* t = MutableTensorField(request, in.name);
      if (!t->has_shm()) continue;
      if (!t->data().empty()) return Invalid(absl::StrCat(in.name, " has data and shm"));
      const char* bytes = Locate(t->shm());
      if (bytes == nullptr) return Invalid(absl::StrCat(in.name, ".shm is not registered"));
      t->set_data(bytes, static_cast<size_t>(t->shm().byte_size()));
      t->clear_shm();
      any = true;
    }
    if (any) {
      std::lock_guard<std::mutex> lock(mu_);
      ++calls_with_shm_;
    }
    return grpc::Status::OK;
  }

  // Moves each output of `response` named in `output_shm` to its ref.
  grpc::Status WriteOutputs(
      const google::protobuf::Map<std::string, v1::SharedMemoryRef>& output_shm,
      google::protobuf::Message* response) {
    for (const auto& [name, ref] : output_shm) {
      v1::Tensor* t = MutableTensorField(response, name);
      char* bytes = Locate(ref);
      if (bytes == nullptr || static_cast<int64_t>(t->data().size()) != ref.byte_size()) {
        return Invalid(absl::StrCat("output_shm[", name, "] is not registered or of another size"));
      }
      std::memcpy(bytes, t->data().data(), t->data().size());
      t->clear_data();
    }
    return grpc::Status::OK;
  }

  int registered() const {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(regions_.size());
  }
  int registrations() const {
    std::lock_guard<std::mutex> lock(mu_);
    return registrations_;
  }
  int calls_with_shm() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_with_shm_;
  }

 private:
  static grpc::Status Invalid(const std::string& what) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, what);
  }

  // The ref's first byte, or null when it does not lie within its registered region.
  char* Locate(const v1::SharedMemoryRef& ref) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = regions_.find(ref.region());
    if (it == regions_.end() || ref.offset() < 0 || ref.byte_size() < 0 ||
        ref.offset() + ref.byte_size() > it->second->size()) {
      return nullptr;
    }
    return it->second->data() + ref.offset();
  }

  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<SharedMemoryMapping>> regions_;  // guarded by mu_
  int registrations_ = 0;                                                // guarded by mu_
  int calls_with_shm_ = 0;                                               // guarded by mu_
};

// A fake AttentionService whose registration RPCs go to `shm`; its compute RPCs resolve refs
// with shm.ReadInputs and shm.WriteOutputs.
class FakeServiceWithSharedMemory : public v1::AttentionService::Service {
 public:
  FakeSharedMemoryRegistry shm;

  grpc::Status RegisterSystemSharedMemory(grpc::ServerContext*,
                                          const v1::RegisterSystemSharedMemoryRequest* request,
                                          v1::RegisterSystemSharedMemoryResponse*) override {
    return shm.Register(*request);
  }
  grpc::Status UnregisterSystemSharedMemory(grpc::ServerContext*,
                                            const v1::UnregisterSystemSharedMemoryRequest* request,
                                            v1::UnregisterSystemSharedMemoryResponse*) override {
    return shm.Unregister(*request);
  }
  grpc::Status SystemSharedMemoryStatus(grpc::ServerContext*,
                                        const v1::SystemSharedMemoryStatusRequest* request,
                                        v1::SystemSharedMemoryStatusResponse* response) override {
    return shm.Status(*request, response);
  }
};

// The names of this process's shm objects (MakeSharedMemoryKey's) that exist now.
inline std::vector<std::string> OurSharedMemoryObjects() {
  std::vector<std::string> names;
  const std::string prefix = absl::StrCat("ringattn_", getpid(), "_");
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", error)) {
    const std::string name = entry.path().filename().string();
    if (absl::StartsWith(name, prefix)) names.push_back(name);
  }
  return names;
}

}  // namespace ringattn
