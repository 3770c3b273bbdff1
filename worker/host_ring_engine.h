// The CPU engine: a host kernel backend over a Gloo TCP ring.
#pragma once

#include <memory>

#include "worker/ring_engine.h"

namespace ringattn {

std::unique_ptr<RingEngine> MakeHostRingEngine(std::unique_ptr<AttentionBackend> backend,
                                               const RingEngineOptions& options);

}  // namespace ringattn
