#include "kernels/backend_registry.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ringattn {
namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, BackendConstructor, std::less<>> constructors;  // by name
};

// Constructed on first use: libraries register from static initialisers in any order.
Registry& TheRegistry() {
  static Registry* const registry = new Registry();
  return *registry;
}

const char* SpaceName(MemorySpace space) { return space == MemorySpace::kHost ? "host" : "device"; }

}  // namespace

bool RegisterBackends(
    std::initializer_list<std::pair<std::string_view, BackendConstructor>> backends) {
  Registry& r = TheRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  for (const auto& [name, constructor] : backends) {
    if (!r.constructors.emplace(std::string(name), constructor).second) {
      std::fprintf(stderr, "ringattn: attention backend '%.*s' registered twice\n",
                   static_cast<int>(name.size()), name.data());
      std::abort();
    }
  }
  return true;
}

std::vector<std::string> RegisteredBackends() {
  Registry& r = TheRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::string> names;
  for (const auto& [name, constructor] : r.constructors) names.push_back(name);
  return names;
}

absl::StatusOr<std::unique_ptr<AttentionBackend>> MakeBackend(std::string_view name) {
  BackendConstructor constructor;
  {
    Registry& r = TheRegistry();
    std::lock_guard<std::mutex> lock(r.mu);
    if (auto it = r.constructors.find(name); it != r.constructors.end()) constructor = it->second;
  }
  if (!constructor) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown attention backend '", std::string(name),
                     "'; registered: ", absl::StrJoin(RegisteredBackends(), ", ")));
  }
  return constructor();
}

absl::StatusOr<std::unique_ptr<AttentionBackend>> MakeBackend(std::string_view name,
                                                              MemorySpace space) {
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend(name);
  if (backend.ok() && (*backend)->memory_space() == space) return backend;
  std::vector<std::string> in_space;
  for (const std::string& other : RegisteredBackends()) {
    absl::StatusOr<std::unique_ptr<AttentionBackend>> b = MakeBackend(other);
    if (b.ok() && (*b)->memory_space() == space) in_space.push_back(other);
  }
  const std::string what =
      backend.ok() ? absl::StrCat("attention backend '", std::string(name), "' computes in ",
                                  SpaceName((*backend)->memory_space()), " memory")
                   : absl::StrCat("unknown attention backend '", std::string(name), "'");
  return absl::InvalidArgumentError(absl::StrCat(what, "; registered ", SpaceName(space),
                                                 " backends: ", absl::StrJoin(in_space, ", ")));
}

}  // namespace ringattn
