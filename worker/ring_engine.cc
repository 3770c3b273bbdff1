#include "worker/ring_engine.h"

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/backend_registry.h"
#include "ringattn_config.h"
#include "worker/host_ring_engine.h"
#if RINGATTN_HAVE_CUDA && RINGATTN_HAVE_NCCL
#include "worker/device_ring_engine.h"
#endif

namespace ringattn {

absl::StatusOr<RingTimings> RingConnection::Backward(const ShardPlan& /*plan*/,
                                                    const RingBackwardTensors& /*t*/,
                                                    const RingAttentionOptions& /*options*/) {
  return absl::UnimplementedError("this worker's engine has no backward");
}

absl::StatusOr<std::shared_ptr<char>> RingEngine::AllocateHost(size_t bytes) {
  return std::shared_ptr<char>(new char[bytes > 0 ? bytes : 1], std::default_delete<char[]>());
}

absl::StatusOr<std::shared_ptr<char>> RingEngine::AllocateShard(size_t bytes) {
  return AllocateHost(bytes);
}

absl::StatusOr<bool> RingEngine::PinHost(SharedMemoryMapping& /*mapping*/) { return true; }

absl::Status RingEngine::CopyShard(const std::vector<CopySpan>& spans, absl::string_view what) {
  return ParallelCopy(spans, what);
}

absl::StatusOr<std::shared_ptr<char>> RingEngine::OpenCudaShared(const std::string& /*handle*/,
                                                                 int64_t /*bytes*/) {
  return absl::FailedPreconditionError(
      "CUDA shared memory reached a worker without a GPU (its kernel runs on the host)");
}

absl::StatusOr<std::unique_ptr<RingEngine>> MakeRingEngine(const RingEngineOptions& options) {
  RingEngineOptions o = options;
  if (o.kernel == "auto") {
#if RINGATTN_HAVE_CUDA && RINGATTN_HAVE_NCCL
    o.kernel = CudaDeviceCount() > 0 ? "cuda" : "cpu";
#else
    o.kernel = "cpu";
#endif
  }
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend(o.kernel);
  if (!backend.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("unknown kernel '", o.kernel,
                                                   "'; expected auto or one of ",
                                                   absl::StrJoin(RegisteredBackends(), ", ")));
  }
  if ((*backend)->memory_space() == MemorySpace::kHost) {
    return MakeHostRingEngine(*std::move(backend), o);
  }
#if RINGATTN_HAVE_CUDA && RINGATTN_HAVE_NCCL
  return MakeDeviceRingEngine(*std::move(backend), o);
#else
  return absl::UnavailableError(absl::StrCat(
      "kernel '", o.kernel, "' runs on a GPU; this build has no NCCL device ring for it"));
#endif
}

}  // namespace ringattn
