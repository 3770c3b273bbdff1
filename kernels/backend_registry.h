// Attention backends by name. Each backend library registers its backends when the program
// starts; callers make one by name instead of naming its factory, and the conformance suite
// runs over every registered one.
//
// Registering a library's backends (a static library would otherwise drop the object file,
// which nothing else references): in one of its source files
//   extern "C" const bool ringattn_register_cuda_backends = RegisterBackends({
//       {"cuda", [] { return std::unique_ptr<AttentionBackend>(new FlashCudaBackend()); }}});
// and on its CMake target, so that every program linking the library keeps that object file:
//   target_link_options(ra_kernels_cuda INTERFACE
//                       "LINKER:--undefined=ringattn_register_cuda_backends")
#pragma once

#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "base/memory_space.h"
#include "kernels/attention_backend.h"

namespace ringattn {

// Makes a new backend; must touch no device (creating a backend is cheap; a device backend
// binds to the device current at its first call).
using BackendConstructor = std::function<std::unique_ptr<AttentionBackend>()>;

// Registers each (name, constructor); returns true, for a static initialiser. A name
// registered twice is a build error: it prints the name and aborts.
bool RegisterBackends(
    std::initializer_list<std::pair<std::string_view, BackendConstructor>> backends);

// The names registered in this program, sorted.
std::vector<std::string> RegisteredBackends();

// A new backend `name`; InvalidArgument listing the registered names for an unknown one.
absl::StatusOr<std::unique_ptr<AttentionBackend>> MakeBackend(std::string_view name);

// The same, for a caller that runs only backends in `space` (host rings hand them host
// memory): InvalidArgument listing the registered backends of that space for any other name.
absl::StatusOr<std::unique_ptr<AttentionBackend>> MakeBackend(std::string_view name,
                                                              MemorySpace space);

}  // namespace ringattn
