// The internal plane's credential: a secret the coordinator and its workers share. Every internal
// call (registration, the rendezvous store, JoinRing, RunShard, Ping) carries it as metadata and
// every internal handler checks it first, so that whoever reaches an internal port without it can
// neither join, poison nor drive the ring. The secret travels in plaintext on an insecure
// channel: on networks that are not trusted, run the internal plane inside one (a Kubernetes
// NetworkPolicy, a VPN) until it has TLS (docs/security.md).
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ringattn {

class ClusterSecret {
 public:
  // The metadata key internal calls carry the secret in.
  static constexpr char kMetadataKey[] = "x-ringattn-cluster-secret";
  // The environment variable a process may take it from (and local workers are given it in).
  static constexpr char kEnvironmentVariable[] = "RINGATTN_CLUSTER_SECRET";

  // 32 random bytes as hex, from the kernel's random source.
  static absl::StatusOr<ClusterSecret> Generate();
  // The file's first line (at least 16 bytes, printable); INVALID_ARGUMENT naming the file.
  static absl::StatusOr<ClusterSecret> FromFile(const std::string& path);
  // `value` as given: at least 16 printable bytes (INVALID_ARGUMENT otherwise).
  static absl::StatusOr<ClusterSecret> FromString(const std::string& value);
  // From `file` when non-empty, else the environment variable, else NOT_FOUND.
  static absl::StatusOr<ClusterSecret> FromFileOrEnvironment(const std::string& file);

  // Adds the secret to an outgoing internal call.
  void Attach(grpc::ClientContext* context) const;
  // OK when the incoming call carries the secret (compared in constant time); UNAUTHENTICATED
  // otherwise, without saying more.
  absl::Status Check(const grpc::ServerContextBase& context) const;

  const std::string& value() const { return value_; }

 private:
  explicit ClusterSecret(std::string value) : value_(std::move(value)) {}
  std::string value_;
};

// An insecure channel to an internal endpoint whose every call carries `secret` (a client
// interceptor adds it), so that no call site can forget it.
std::shared_ptr<grpc::Channel> ClusterChannel(const std::string& address,
                                              const grpc::ChannelArguments& args,
                                              const ClusterSecret& secret);

}  // namespace ringattn
