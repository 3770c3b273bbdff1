// Transport security shared by the public API, the internal plane and the clients: TLS
// credentials from PEM files, channels whose every call carries fixed metadata, and a
// comparison of secrets whose time does not depend on where they differ.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ringattn {

// PEM files of one TLS endpoint. `cert` and `key` are this side's certificate chain and private
// key; `ca` the certificates it trusts for the other side (a server: clients' certificates,
// mTLS; a client: the server's).
struct TlsFiles {
  std::string cert;
  std::string key;
  std::string ca;
};

// The contents of TlsFiles (each empty where its file was not given).
struct TlsPem {
  std::string cert;
  std::string key;
  std::string ca;
};

// Reads the files given in `files`. INVALID_ARGUMENT naming `what` ("--tls_cert") and the path
// when one cannot be read, or is not PEM, or when only one of cert and key is given.
absl::StatusOr<TlsPem> ReadTlsFiles(const TlsFiles& files, absl::string_view flag_prefix);

// Server credentials: the certificate and key of `pem` (required); with a CA, clients must
// present a certificate it signed (mTLS), else any client may connect.
std::shared_ptr<grpc::ServerCredentials> TlsServerCredentials(const TlsPem& pem);

// Channel credentials that verify the server against `pem.ca` (empty: the system's roots) and
// present `pem.cert`/`pem.key` when given (mTLS).
std::shared_ptr<grpc::ChannelCredentials> TlsChannelCredentials(const TlsPem& pem);

// A channel to `target` whose every call carries `metadata` (a client interceptor adds it), so
// that no call site can forget it.
std::shared_ptr<grpc::Channel> ChannelWithMetadata(
    const std::string& target, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const grpc::ChannelArguments& args, std::vector<std::pair<std::string, std::string>> metadata);

// Whether `given` equals `expected`, in time that depends only on expected's length.
bool ConstantTimeEquals(absl::string_view expected, absl::string_view given);

}  // namespace ringattn
