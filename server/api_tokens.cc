#include "server/api_tokens.h"

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "proto/transport_security.h"

namespace ringattn {
namespace {

bool Printable(absl::string_view s) {
  for (const unsigned char c : s) {
    if (c < 0x21 || c > 0x7e) return false;
  }
  return true;
}

constexpr char kBearer[] = "Bearer ";

}  // namespace

absl::StatusOr<ApiTokens> ApiTokens::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--api_tokens_file: cannot read ", path));
  std::ostringstream text;
  text << in.rdbuf();
  return Parse(text.str(), absl::StrCat("--api_tokens_file ", path));
}

absl::StatusOr<ApiTokens> ApiTokens::Parse(absl::string_view text, absl::string_view source) {
  ApiTokens tokens;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    auto bad = [&](absl::string_view why) {
      return absl::InvalidArgumentError(absl::StrCat(source, " line ", line_number, ": ", why));
    };
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() != 2) return bad("want '<token> <client name>'");
    const absl::string_view token = fields[0];
    const absl::string_view client = fields[1];
    if (token.size() < 16 || token.size() > 4096 || !Printable(token)) {
      return bad("a token needs 16 to 4096 printable ASCII bytes");
    }
    if (client.size() > 128 || !Printable(client)) {
      return bad("a client name needs 1 to 128 printable ASCII bytes");
    }
    for (const Entry& e : tokens.entries_) {
      if (e.token == token) return bad("this token is also on an earlier line");
    }
    tokens.entries_.push_back({std::string(token), std::string(client)});
  }
  if (tokens.entries_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": no tokens"));
  }
  return tokens;
}

absl::StatusOr<std::string> ApiTokens::Authenticate(const grpc::ServerContextBase& context) const {
  const auto& md = context.client_metadata();
  const auto it = md.find(kMetadataKey);
  if (it == md.end()) {
    return absl::UnauthenticatedError(
        absl::StrCat("this service needs a bearer token: send the metadata '", kMetadataKey,
                     ": Bearer <token>'"));
  }
  return AuthenticateValue(absl::string_view(it->second.data(), it->second.size()));
}

absl::StatusOr<std::string> ApiTokens::AuthenticateValue(absl::string_view value) const {
  if (!absl::StartsWith(value, kBearer)) {
    return absl::UnauthenticatedError(
        absl::StrCat("the '", kMetadataKey, "' metadata must be 'Bearer <token>'"));
  }
  const absl::string_view given = value.substr(sizeof(kBearer) - 1);
  // Every entry compared, none skipped: the time does not tell which one matched.
  const Entry* match = nullptr;
  for (const Entry& e : entries_) {
    if (ConstantTimeEquals(e.token, given)) match = &e;
  }
  if (match == nullptr) {
    return absl::UnauthenticatedError(
        absl::StrCat("the bearer token in the '", kMetadataKey, "' metadata is not valid"));
  }
  return match->client;
}

}  // namespace ringattn
