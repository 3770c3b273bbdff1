// The internal plane's credential: a secret the coordinator and its workers share. Every internal
// call (registration, the rendezvous store, JoinRing, RunShard, Ping) carries it as metadata and
// every internal handler checks it first, so that whoever reaches an internal port without it can
// neither join, poison nor drive the ring. Without TLS the secret travels in plaintext: on
// networks that are not trusted, give the internal plane TLS (WithTls) or run it inside one (a
// Kubernetes NetworkPolicy, a VPN); docs/security.md.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/transport_security.h"

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

  // The name internal servers' certificates must carry (a DNS subjectAltName) when the plane
  // has TLS: clients check it whatever address they dial (workers are reached by pod IP).
  static constexpr char kTlsServerName[] = "ringattn-internal";

  // The same secret, with TLS on the internal plane: `files` are this process's certificate
  // and key (its identity as server and as client) and the CA that signed every internal
  // process's certificate; all three required (INVALID_ARGUMENT naming --internal_tls_*).
  // Servers then require and verify client certificates; clients verify the server's.
  absl::StatusOr<ClusterSecret> WithTls(const TlsFiles& files) const;
  bool has_tls() const { return tls_ != nullptr; }
  // For internal servers: TLS requiring client certificates, or insecure without TLS.
  std::shared_ptr<grpc::ServerCredentials> ServerCredentials() const;
  // For internal channels: TLS with this process's certificate, or insecure without TLS.
  std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials() const;

  // Adds the secret to an outgoing internal call.
  void Attach(grpc::ClientContext* context) const;
  // OK when the incoming call carries the secret (compared in constant time); UNAUTHENTICATED
  // otherwise, without saying more.
  absl::Status Check(const grpc::ServerContextBase& context) const;

  const std::string& value() const { return value_; }

 private:
  explicit ClusterSecret(std::string value) : value_(std::move(value)) {}
  std::string value_;
  std::shared_ptr<const TlsPem> tls_;  // null: plaintext
};

// A channel to an internal endpoint whose every call carries `secret` (a client interceptor
// adds it), so that no call site can forget it; TLS when the secret has it.
std::shared_ptr<grpc::Channel> ClusterChannel(const std::string& address,
                                              const grpc::ChannelArguments& args,
                                              const ClusterSecret& secret);

}  // namespace ringattn
