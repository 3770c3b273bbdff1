#include "worker/ring_engine.h"

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
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

absl::StatusOr<std::unique_ptr<RingEngine>> MakeRingEngine(const RingEngineOptions& options) {
  RingEngineOptions o = options;
  if (o.kernel == "auto") {
#if RINGATTN_HAVE_CUDA && RINGATTN_HAVE_NCCL
    o.kernel = CudaDeviceCount() > 0 ? "cuda" : "cpu";
#else
    o.kernel = "cpu";
#endif
  }
  if (o.kernel == "cpu" || o.kernel == "cpu_reference") {
    RA_ASSIGN_OR_RETURN(std::unique_ptr<AttentionBackend> backend, MakeCpuBackend(o.kernel));
    return MakeHostRingEngine(std::move(backend), o);
  }
  if (o.kernel == "cuda" || o.kernel == "cuda_reference" || o.kernel == "cudnn") {
#if RINGATTN_HAVE_CUDA && RINGATTN_HAVE_NCCL
    return MakeDeviceRingEngine(o);
#else
    return absl::UnavailableError(
        absl::StrCat("kernel '", o.kernel, "' needs a build with CUDA; this one has none"));
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown kernel '", o.kernel,
      "'; expected one of auto, cpu, cpu_reference, cuda, cuda_reference, cudnn"));
}

}  // namespace ringattn
