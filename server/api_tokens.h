// The public API's bearer tokens: a file of `<token> <client name>` lines (blank lines and
// lines starting with '#' ignored). A call authenticates by carrying the metadata
// `authorization: Bearer <token>`; its client is then that line's name, which keys what the
// client owns (shared-memory regions) and its share of admission. Several tokens may name one
// client (rotation). Tokens are compared in constant time.
#pragma once

#include <grpcpp/grpcpp.h>

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ringattn {

class ApiTokens {
 public:
  // The metadata key calls carry their token in, as "Bearer <token>".
  static constexpr char kMetadataKey[] = "authorization";

  // Reads `path`; INVALID_ARGUMENT naming the file and line for a line without both fields, a
  // token under 16 or over 4096 bytes or not printable ASCII, a repeated token, or a file
  // without tokens.
  static absl::StatusOr<ApiTokens> FromFile(const std::string& path);
  // The same from the file's text; `source` names it in errors.
  static absl::StatusOr<ApiTokens> Parse(absl::string_view text, absl::string_view source);

  // The client whose token the call carries; UNAUTHENTICATED naming the metadata when it has
  // none, or not as "Bearer <token>", or a token not in the file.
  absl::StatusOr<std::string> Authenticate(const grpc::ServerContextBase& context) const;
  // The same for the metadata's value (what follows "authorization: ").
  absl::StatusOr<std::string> AuthenticateValue(absl::string_view value) const;

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string token;
    std::string client;
  };
  std::vector<Entry> entries_;
};

}  // namespace ringattn
