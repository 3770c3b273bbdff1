// Finding a kernel's compiled tiling by name, shared by the forward (flash_fwd_configs.h) and
// backward (flash_bwd_configs.h) dispatch: each kernel has a closed table Tilings<head_dim>::kList
// of entries with a `name`, index 0 the default, and an environment variable that makes another
// tiling the default for the whole process (a test hook). Plain C++.
#pragma once

#include <cstdlib>
#include <string>
#include <type_traits>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/dtype.h"

namespace ringattn {

// The one switch from runtime sizes to the compiled instantiations: fn(d) with d a
// std::integral_constant<int, head_dim> for the compiled head dims (64, 128, 256), otherwise()
// for any other; both return the same type.
template <typename Fn, typename Otherwise>
auto WithHeadDim(int head_dim, Fn&& fn, Otherwise&& otherwise) {
  switch (head_dim) {
    case 64:
      return fn(std::integral_constant<int, 64>{});
    case 128:
      return fn(std::integral_constant<int, 128>{});
    case 256:
      return fn(std::integral_constant<int, 256>{});
  }
  return otherwise();
}

// fn(t) with t a std::integral_constant<DType, dtype> for bf16, else for fp16 (the kernels' two
// element types; callers check the dtype first).
template <typename Fn>
auto WithHalfDtype(DType dtype, Fn&& fn) {
  return dtype == DType::kBF16 ? fn(std::integral_constant<DType, DType::kBF16>{})
                               : fn(std::integral_constant<DType, DType::kF16>{});
}

// Index of `name` in Tilings<head_dim>::kList (head dims 64, 128, 256), or -1. No allocation: it
// runs per kernel call.
template <template <int> class Tilings>
int TilingIndex(int head_dim, std::string_view name) {
  return WithHeadDim(
      head_dim,
      [name](auto d) {
        int i = 0;
        for (const auto& t : Tilings<decltype(d)::value>::kList) {
          if (name == t.name) return i;
          ++i;
        }
        return -1;
      },
      [] { return -1; });
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
