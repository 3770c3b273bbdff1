// From a tiling's name or index to the compiled kernels, shared by the forward
// (flash_fwd_configs.h) and backward (flash_bwd_configs.h) dispatch. Each kernel has a closed
// table Tilings<head_dim>::kList of rows with a `name`, row 0 the default; a build compiles
// rows [0, kCompiledTilings) of each table, and an environment variable (a test hook) may make
// another compiled row the default for the whole process. Plain C++.
#pragma once

#include <cstdlib>
#include <iterator>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/cuda/flash_instantiations.h"
#include "ringattn_config.h"

namespace ringattn {

// How many rows of Tilings<kHeadDim>::kList this build compiles, from row 0: every row with
// RINGATTN_HAVE_ALL_TILINGS (CMake option RINGATTN_CUDA_ALL_TILINGS), else the default alone.
template <template <int> class Tilings, int kHeadDim>
inline constexpr int kCompiledTilings = RINGATTN_HAVE_ALL_TILINGS
                                            ? static_cast<int>(std::size(Tilings<kHeadDim>::kList))
                                            : 1;

// fn(i) with i a std::integral_constant<int, index> for index in [kIndex, kCount), otherwise()
// for any other; both return the same type. The switch from a runtime tiling index to the
// instantiations.
template <int kCount, int kIndex = 0, typename Fn, typename Otherwise>
auto WithIndexBelow(int index, Fn&& fn, Otherwise&& otherwise) {
  if constexpr (kIndex >= kCount) {
    return otherwise();
  } else {
    if (index == kIndex) return fn(std::integral_constant<int, kIndex>{});
    return WithIndexBelow<kCount, kIndex + 1>(index, fn, otherwise);
  }
}

// fn(TraitsOf<kHeadDim, config>{}) when row `config` of Tilings<kHeadDim> is compiled; else
// InvalidArgument naming `kernel`, as fn's return type (absl::Status or absl::StatusOr). The
// switch from a runtime tiling index to a kernel's instantiations.
template <template <int> class Tilings, template <int, int> class TraitsOf, int kHeadDim,
          typename Fn>
auto WithCompiledTraits(std::string_view kernel, int config, Fn&& fn) {
  using Result = decltype(fn(TraitsOf<kHeadDim, 0>{}));
  return WithIndexBelow<kCompiledTilings<Tilings, kHeadDim>>(
      config, [&](auto i) -> Result { return fn(TraitsOf<kHeadDim, decltype(i)::value>{}); },
      [&]() -> Result {
        return absl::InvalidArgumentError(absl::StrCat("cuda: ", std::string(kernel), " tiling ",
                                                       config, " of head_dim ", kHeadDim,
                                                       " is not compiled"));
      });
}

// The rows of Tilings<kHeadDim>::kList this build compiles, in table order.
template <template <int> class Tilings, int kHeadDim>
auto CompiledTilings() {
  using Row = std::remove_cv_t<std::remove_reference_t<decltype(Tilings<kHeadDim>::kList[0])>>;
  return std::vector<Row>(
      std::begin(Tilings<kHeadDim>::kList),
      std::begin(Tilings<kHeadDim>::kList) + kCompiledTilings<Tilings, kHeadDim>);
}

// One Config per compiled row of head_dim's table, the default first: describe(row), then name,
// head_dim and is_default set here. Empty for a head dim without a table.
template <template <int> class Tilings, typename Config, typename Describe>
std::vector<Config> CompiledConfigs(int head_dim, Describe&& describe) {
  return WithHeadDim(
      head_dim,
      [&](auto d) {
        std::vector<Config> configs;
        for (const auto& t : CompiledTilings<Tilings, decltype(d)::value>()) {
          Config c = describe(t);
          c.name = t.name;
          c.head_dim = decltype(d)::value;
          c.is_default = configs.empty();
          configs.push_back(std::move(c));
        }
        return configs;
      },
      [] { return std::vector<Config>(); });
}

// Index of `name` in Tilings<head_dim>::kList, compiled or not; -1 when that table has no such
// row or head_dim has no table. No allocation: it runs per kernel call.
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

// How many rows of head_dim's table this build compiles (0 for a head dim without one).
template <template <int> class Tilings>
int CompiledTilingCount(int head_dim) {
  return WithHeadDim(
      head_dim, [](auto d) { return kCompiledTilings<Tilings, decltype(d)::value>; },
      [] { return 0; });
}

// The compiled row of head_dim's table named `name`. InvalidArgument, for `kernel` ("forward",
// "backward"), when the table has no such row (listing the compiled ones) or when this build
// does not compile it (naming the CMake option that does).
template <template <int> class Tilings>
absl::StatusOr<int> CompiledTilingIndex(std::string_view kernel, int head_dim,
                                        std::string_view name) {
  const int index = TilingIndex<Tilings>(head_dim, name);
  const int compiled = CompiledTilingCount<Tilings>(head_dim);
  if (index >= 0 && index < compiled) return index;
  std::vector<std::string> names;
  WithHeadDim(
      head_dim,
      [&](auto d) {
        for (const auto& t : CompiledTilings<Tilings, decltype(d)::value>()) {
          names.push_back(t.name);
        }
      },
      [] {});
  if (index < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda: no ", std::string(kernel), " tiling '", std::string(name), "' for head_dim ",
        head_dim, "; expected one of ", absl::StrJoin(names, ", ")));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "cuda: the ", std::string(kernel), " tiling '", std::string(name), "' for head_dim ",
      head_dim, " is not compiled in this build, which has ", absl::StrJoin(names, ", "),
      "; configure with -DRINGATTN_CUDA_ALL_TILINGS=ON for every tiling"));
}

// The tiling a kernel runs for head_dim when its test-hook variable `env_var` holds `forced`
// (empty: unset): the default (0) when forced is empty, or names no row of head_dim's table but
// a row of another head dim's; else CompiledTilingIndex's answer. InvalidArgument, naming
// env_var, for a name no table has.
template <template <int> class Tilings>
absl::StatusOr<int> ForcedTilingIndex(std::string_view kernel, const char* env_var,
                                      std::string_view forced, int head_dim) {
  if (forced.empty()) return 0;
  if (TilingIndex<Tilings>(head_dim, forced) < 0) {
    for (const int d : kFlashHeadDims) {
      if (TilingIndex<Tilings>(d, forced) >= 0) return 0;
    }
    return absl::InvalidArgumentError(absl::StrCat("cuda: ", env_var, "=", std::string(forced),
                                                   " names no ", std::string(kernel),
                                                   " tiling of any head dim"));
  }
  absl::StatusOr<int> index = CompiledTilingIndex<Tilings>(kernel, head_dim, forced);
  if (!index.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(env_var, "=", std::string(forced), ": ", index.status().message()));
  }
  return index;
}

// ForcedTilingIndex with `forced` read once per Tilings table from the environment.
template <template <int> class Tilings>
absl::StatusOr<int> ForcedOrDefaultTilingIndex(std::string_view kernel, const char* env_var,
                                               int head_dim) {
  static const std::string* const forced = [env_var] {
    const char* env = std::getenv(env_var);
    return new std::string(env == nullptr ? "" : env);
  }();
  return ForcedTilingIndex<Tilings>(kernel, env_var, *forced, head_dim);
}

}  // namespace ringattn
