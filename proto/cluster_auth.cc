#include "proto/cluster_auth.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <vector>

#include <grpcpp/support/client_interceptor.h>

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
  bool same = false;
  if (it != md.end() && it->second.size() == value_.size()) {
    unsigned char diff = 0;
    for (size_t i = 0; i < value_.size(); ++i) diff |= it->second.data()[i] ^ value_[i];
    same = diff == 0;
  }
  if (!same) return absl::UnauthenticatedError("this internal call needs the cluster secret");
  return absl::OkStatus();
}

namespace {

class AddSecret final : public grpc::experimental::Interceptor {
 public:
  explicit AddSecret(std::string secret) : secret_(std::move(secret)) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace(ClusterSecret::kMetadataKey, secret_);
    }
    methods->Proceed();
  }

 private:
  const std::string secret_;
};

class AddSecretFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit AddSecretFactory(std::string secret) : secret_(std::move(secret)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* /*info*/) override {
    return new AddSecret(secret_);
  }

 private:
  const std::string secret_;
};

}  // namespace

std::shared_ptr<grpc::Channel> ClusterChannel(const std::string& address,
                                              const grpc::ChannelArguments& args,
                                              const ClusterSecret& secret) {
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
  factories.push_back(std::make_unique<AddSecretFactory>(secret.value()));
  return grpc::experimental::CreateCustomChannelWithInterceptors(
      address, grpc::InsecureChannelCredentials(), args, std::move(factories));
}

}  // namespace ringattn
