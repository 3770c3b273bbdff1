// Shared by the cudnn GPU tests (cudnn_backend_test, cudnn_backward_test): a cudnn backend in
// each graph mode (static graphs, dynamic shapes, dynamic shapes after Prewarm) and its counts.
#pragma once

#include <cstdio>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kernels/cudnn/cudnn_backend.h"

namespace ringattn {
namespace kernel_testing {

enum class GraphMode { kStatic, kDynamic, kDynamicPrewarmed };

inline std::string GraphModeName(GraphMode m) {
  return m == GraphMode::kStatic ? "Static" : m == GraphMode::kDynamic ? "Dynamic" : "Prewarmed";
}

// Prints `what`: graph counts of `backend`.
inline void PrintGraphStats(const char* what, const CudnnBackend& backend) {
  const CudnnGraphStats s = backend.graph_stats();
  std::printf("  %s: %lld graphs, %lld dynamic, %lld static fallbacks, %lld kernel classes\n", what,
              static_cast<long long>(s.builds), static_cast<long long>(s.dynamic_builds),
              static_cast<long long>(s.static_fallbacks), static_cast<long long>(s.kernel_classes));
}

// A backend in mode `m`; prewarmed with the default classes, forward and backward.
inline std::unique_ptr<CudnnBackend> MakeCudnnInMode(GraphMode m) {
  std::unique_ptr<CudnnBackend> backend =
      MakeCudnnBackend({.dynamic_shapes = m != GraphMode::kStatic});
  if (m == GraphMode::kDynamicPrewarmed) {
    CudnnPrewarmSpec spec;
    spec.backward = true;
    const absl::Status s = backend->Prewarm(spec);
    EXPECT_TRUE(s.ok()) << s;
    PrintGraphStats("prewarm", *backend);
  }
  return backend;
}

// After a mode's calls: in the dynamic modes graphs were tried dynamic (taken, or static after
// a logged refusal) and, where cuDNN took dynamic graphs, kernel classes were shared
// (fewer than graphs); static builds no class.
inline void ExpectGraphStatsOfMode(GraphMode m, const CudnnBackend& backend) {
  PrintGraphStats(GraphModeName(m).c_str(), backend);
  const CudnnGraphStats s = backend.graph_stats();
  if (m == GraphMode::kStatic || !backend.dynamic_shapes()) {
    EXPECT_EQ(s.dynamic_builds + s.kernel_classes, 0);
  } else {
    // A class refused twice without a success builds static from then on, uncounted.
    EXPECT_LE(s.dynamic_builds + s.static_fallbacks, s.builds);
    EXPECT_GT(s.dynamic_builds + s.static_fallbacks, 0);
    // Classes are shared only where cuDNN took dynamic graphs (9.19 on an H100 refuses every
    // SDPA engine: all static, each logged).
    if (s.dynamic_builds > 0) EXPECT_LT(s.kernel_classes, s.builds);
  }
}

}  // namespace kernel_testing
}  // namespace ringattn
