// Finding a kernel's compiled tiling by name, shared by the forward (flash_fwd_configs.h) and
// backward (flash_bwd_configs.h) dispatch: each kernel has a closed table Tilings<head_dim>::kList
// of entries with a `name`, index 0 the default, and an environment variable that makes another
// tiling the default for the whole process (a test hook). Plain C++.
#pragma once

#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ringattn {

// Index of `name` in Tilings<head_dim>::kList (head dims 64, 128, 256), or -1. No allocation: it
// runs per kernel call.
template <template <int> class Tilings>
int TilingIndex(int head_dim, std::string_view name) {
  auto find = [name](const auto& list) {
    int i = 0;
    for (const auto& t : list) {
      if (name == t.name) return i;
      ++i;
    }
    return -1;
  };
  switch (head_dim) {
    case 64:
      return find(Tilings<64>::kList);
    case 128:
      return find(Tilings<128>::kList);
    case 256:
      return find(Tilings<256>::kList);
  }
  return -1;
}

// The tiling a kernel runs for `head_dim`: the one environment variable `env_var` names, read once
// per Tilings table, when that head dim has it; else the default (0).
template <template <int> class Tilings>
int ForcedOrDefaultTilingIndex(const char* env_var, int head_dim) {
  static const std::string* const forced = [env_var] {
    const char* env = std::getenv(env_var);
    return new std::string(env == nullptr ? "" : env);
  }();
  if (forced->empty()) return 0;
  const int index = TilingIndex<Tilings>(head_dim, *forced);
  return index < 0 ? 0 : index;
}

// InvalidArgument for an unknown tiling name, listing the known ones of that head dim.
inline absl::Status UnknownTiling(std::string_view kernel, int head_dim, std::string_view name,
                                  const std::vector<std::string>& known) {
  return absl::InvalidArgumentError(absl::StrCat("cuda: no ", std::string(kernel), " tiling '",
                                                 std::string(name), "' for head_dim ", head_dim,
                                                 "; expected one of ", absl::StrJoin(known, ", ")));
}

}  // namespace ringattn
