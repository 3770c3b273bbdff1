#include "proto/transport_security.h"

#include <grpcpp/support/client_interceptor.h>

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace ringattn {
namespace {

// The PEM text of `path` (flag `flag`); empty for an empty path.
absl::StatusOr<std::string> ReadPem(const std::string& path, const std::string& flag) {
  if (path.empty()) return std::string();
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read ", path));
  std::ostringstream text;
  text << in.rdbuf();
  if (!absl::StrContains(text.str(), "-----BEGIN ")) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": ", path, " is not a PEM file"));
  }
  return text.str();
}

class AddMetadata final : public grpc::experimental::Interceptor {
 public:
  explicit AddMetadata(std::vector<std::pair<std::string, std::string>> metadata)
      : metadata_(std::move(metadata)) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      for (const auto& [key, value] : metadata_) {
        methods->GetSendInitialMetadata()->emplace(key, value);
      }
    }
    methods->Proceed();
  }

 private:
  const std::vector<std::pair<std::string, std::string>> metadata_;
};

class AddMetadataFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit AddMetadataFactory(std::vector<std::pair<std::string, std::string>> metadata)
      : metadata_(std::move(metadata)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* /*info*/) override {
    return new AddMetadata(metadata_);
  }

 private:
  const std::vector<std::pair<std::string, std::string>> metadata_;
};

}  // namespace

absl::StatusOr<TlsPem> ReadTlsFiles(const TlsFiles& files, absl::string_view flag_prefix) {
  const std::string prefix(flag_prefix);
  if (files.cert.empty() != files.key.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "_cert and ", prefix, "_key go together: give both or neither"));
  }
  TlsPem pem;
  auto read = [&](const std::string& path, const char* which, std::string* out) {
    absl::StatusOr<std::string> text = ReadPem(path, absl::StrCat(prefix, "_", which));
    if (!text.ok()) return text.status();
    *out = *std::move(text);
    return absl::OkStatus();
  };
  if (absl::Status s = read(files.cert, "cert", &pem.cert); !s.ok()) return s;
  if (absl::Status s = read(files.key, "key", &pem.key); !s.ok()) return s;
  if (absl::Status s = read(files.ca, "ca", &pem.ca); !s.ok()) return s;
  return pem;
}

std::shared_ptr<grpc::ServerCredentials> TlsServerCredentials(const TlsPem& pem) {
  grpc::SslServerCredentialsOptions options(
      pem.ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                     : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = pem.ca;
  options.pem_key_cert_pairs.push_back({pem.key, pem.cert});
  return grpc::SslServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> TlsChannelCredentials(const TlsPem& pem) {
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = pem.ca;
  options.pem_private_key = pem.key;
  options.pem_cert_chain = pem.cert;
  return grpc::SslCredentials(options);
}

std::shared_ptr<grpc::Channel> ChannelWithMetadata(
    const std::string& target, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const grpc::ChannelArguments& args, std::vector<std::pair<std::string, std::string>> metadata) {
  if (metadata.empty()) return grpc::CreateCustomChannel(target, credentials, args);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
  factories.push_back(std::make_unique<AddMetadataFactory>(std::move(metadata)));
  return grpc::experimental::CreateCustomChannelWithInterceptors(target, credentials, args,
                                                                 std::move(factories));
}

bool ConstantTimeEquals(absl::string_view expected, absl::string_view given) {
  unsigned char diff = expected.size() == given.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char g = given.empty() ? 0 : static_cast<unsigned char>(given[i % given.size()]);
    diff |= static_cast<unsigned char>(expected[i]) ^ g;
  }
  return diff == 0;
}

}  // namespace ringattn
