#include "proto/cluster_auth.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace ringattn {

absl::StatusOr<ClusterSecret> ClusterSecret::Generate() {
  unsigned char bytes[32];
  FILE* f = std::fopen("/dev/urandom", "rb");
  if (f == nullptr) return absl::UnavailableError("cannot open /dev/urandom for the secret");
  const size_t n = std::fread(bytes, 1, sizeof(bytes), f);
  std::fclose(f);
  if (n != sizeof(bytes)) return absl::UnavailableError("short read from /dev/urandom");
  return ClusterSecret(
      absl::BytesToHexString(absl::string_view(reinterpret_cast<char*>(bytes), sizeof(bytes))));
}

absl::StatusOr<ClusterSecret> ClusterSecret::FromString(const std::string& value) {
  if (value.size() < 16 || value.size() > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("a cluster secret needs 16 to 4096 bytes, got ", value.size()));
  }
  for (unsigned char c : value) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(
          "a cluster secret must be printable ASCII without spaces (it travels as gRPC metadata)");
    }
  }
  return ClusterSecret(value);
}

absl::StatusOr<ClusterSecret> ClusterSecret::FromFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("cannot read the secret file ", path));
  std::string line;
  std::getline(in, line);
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
  absl::StatusOr<ClusterSecret> s = FromString(line);
  if (!s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("secret file ", path, ": ", s.status().message()));
  }
  return s;
}

absl::StatusOr<ClusterSecret> ClusterSecret::FromFileOrEnvironment(const std::string& file) {
  if (!file.empty()) return FromFile(file);
  if (const char* env = std::getenv(kEnvironmentVariable); env != nullptr && *env != '\0') {
    absl::StatusOr<ClusterSecret> s = FromString(env);
    if (!s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(kEnvironmentVariable, ": ", s.status().message()));
    }
    return s;
  }
  return absl::NotFoundError(absl::StrCat("no cluster secret: pass --cluster_secret_file or set ",
                                          kEnvironmentVariable));
}

void ClusterSecret::Attach(grpc::ClientContext* context) const {
  context->AddMetadata(kMetadataKey, value_);
}

absl::Status ClusterSecret::Check(const grpc::ServerContextBase& context) const {
  const auto& md = context.client_metadata();
  auto it = md.find(kMetadataKey);
  const bool same =
      it != md.end() &&
      ConstantTimeEquals(value_, absl::string_view(it->second.data(), it->second.size()));
  if (!same) return absl::UnauthenticatedError("this internal call needs the cluster secret");
  return absl::OkStatus();
}

absl::StatusOr<ClusterSecret> ClusterSecret::WithTls(const TlsFiles& files) const {
  if (files.cert.empty() || files.key.empty() || files.ca.empty()) {
    return absl::InvalidArgumentError(
        "internal TLS needs --internal_tls_cert, --internal_tls_key and --internal_tls_ca "
        "together");
  }
  absl::StatusOr<TlsPem> pem = ReadTlsFiles(files, "--internal_tls");
  if (!pem.ok()) return pem.status();
  ClusterSecret with = *this;
  with.tls_ = std::make_shared<const TlsPem>(*std::move(pem));
  return with;
}

std::shared_ptr<grpc::ServerCredentials> ClusterSecret::ServerCredentials() const {
  return tls_ != nullptr ? TlsServerCredentials(*tls_) : grpc::InsecureServerCredentials();
}

std::shared_ptr<grpc::ChannelCredentials> ClusterSecret::ChannelCredentials() const {
  return tls_ != nullptr ? TlsChannelCredentials(*tls_) : grpc::InsecureChannelCredentials();
}

std::shared_ptr<grpc::Channel> ClusterChannel(const std::string& address,
                                              const grpc::ChannelArguments& args,
                                              const ClusterSecret& secret) {
  grpc::ChannelArguments with_name = args;
  if (secret.has_tls()) {
    with_name.SetSslTargetNameOverride(ClusterSecret::kTlsServerName);
  }
  return ChannelWithMetadata(address, secret.ChannelCredentials(), with_name,
                             {{ClusterSecret::kMetadataKey, secret.value()}});
}

}  // namespace ringattn
