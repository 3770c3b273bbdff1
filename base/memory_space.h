// Where a tensor's bytes live, as backends and transports declare what they take.
#pragma once

namespace ringattn {

enum class MemorySpace { kHost, kDevice };

}  // namespace ringattn
