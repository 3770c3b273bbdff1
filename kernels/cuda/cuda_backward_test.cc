// The backward of the "cuda" backend (cuda_backend.h) and its kernel (flash_bwd.cuh).
//
// Host-only (run everywhere): the factory; refusals are InvalidArgument naming the field (dtype,
// head_dim, out_dtype, dout and dq layouts) before any device call.
// GPU (every case skips without a CUDA device), against the fp64 reference backward
// (ReferenceBackward) on the fp64 reference forward's O and LSE:
//   - a sweep at seq 1, 7, 255, 1000 and 3816 (and s_q != s_k), 5 heads and GQA 8:2 / 8:1,
//     d 64/128/256, bf16/fp16, unmasked, causal, windows, softcap, ALiBi, a query position
//     offset (a ring step below the diagonal); dq/dk/dv poisoned with NaN first, so an element
//     the kernel does not write fails;
//   - every compiled tiling on a smaller sweep (FlashBackwardWithConfig);
//   - accumulate: two calls into zeroed gradients give twice the gradient;
//   - a ring-like key split: two calls on the key halves, the whole forward's lse, accumulating
//     into one dq, give the whole gradients;
//   - dK and dV are bitwise deterministic (a fixed sum order; only dQ uses atomics).
// ComputeDelta is checked for every backend by backend_conformance_test.
// Tolerances per gradient tensor: relative L2 <= 2e-2 (bf16), 5e-3 (fp16): the kernel rounds
// P and dS to the input dtype for the tensor cores and accumulates in fp32.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention_backward_params.h"
#include "kernels/backend_registry.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/flash_bwd.h"
#include "kernels/cuda/gpu_backward_test_util.h"
#include "kernels/cuda/gpu_test_util.h"

namespace ringattn {
namespace {

using kernel_testing::Case;
using kernel_testing::CaseName;
using kernel_testing::CheckGrads;
using kernel_testing::DeviceBuffer;
using kernel_testing::DeviceCall;
using kernel_testing::Download;
using kernel_testing::GpuTest;
using kernel_testing::HostCall;
using kernel_testing::MakeHostCall;
using kernel_testing::Shape;
using kernel_testing::ToDevice;

constexpr int64_t kOpen = kUnboundedWindow;

// ---- Host-only ------------------------------------------------------------------------------

// The registered "cuda" backend.
std::unique_ptr<AttentionBackend> MakeCuda() {
  absl::StatusOr<std::unique_ptr<AttentionBackend>> b = MakeBackend("cuda");
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? *std::move(b) : nullptr;
}

AttentionBackwardParams FakeCall() { return kernel_testing::FakeBackwardCall(); }

void ExpectRefused(const AttentionBackwardParams& p, const std::string& needle) {
  auto backend = MakeCuda();
  kernel_testing::ExpectBackwardRefused(*backend, p, needle);
}

TEST(CudaBackwardHostTest, Factory) {
  auto backend = MakeCuda();
  ASSERT_NE(backend, nullptr);
  EXPECT_EQ(backend->name(), "cuda");
  EXPECT_EQ(backend->memory_space(), MemorySpace::kDevice);
  EXPECT_TRUE(backend->capabilities().backward);
}

TEST(CudaBackwardHostTest, AcceptsPlainCall) { EXPECT_TRUE(CheckFlashBackwardSupport(FakeCall()).ok()); }

TEST(CudaBackwardHostTest, RefusesWhatNoGpuBackwardTakes) {
  for (const kernel_testing::BackwardRefusal& c : kernel_testing::RefusalsOfEveryGpuBackward()) {
    SCOPED_TRACE(c.name);
    ExpectRefused(c.p, c.needle);
  }
}

TEST(CudaBackwardHostTest, RefusesHeadDim96) {
  AttentionBackwardParams p = FakeCall();
  p.fwd.head_dim = 96;
  SetContiguousBackwardStrides(&p);
  ExpectRefused(p, "head_dim");
}

TEST(CudaBackwardHostTest, RefusesMisalignedDout) {
  AttentionBackwardParams p = FakeCall();
  p.dout = static_cast<const char*>(p.dout) + 2;
  ExpectRefused(p, "dout");
}

TEST(CudaBackwardHostTest, RefusesOddDqStride) {
  AttentionBackwardParams p = FakeCall();
  p.dq_row_stride += 1;
  p.dq_batch_stride = p.dq_row_stride * p.fwd.seqlen_q;
  ExpectRefused(p, "dq");
}

TEST(CudaBackwardHostTest, EveryHeadDimHasTilings) {
  for (int d : {64, 128, 256}) {
    const std::vector<FlashBackwardConfig> configs = FlashBackwardConfigs(d);
    ASSERT_FALSE(configs.empty()) << d;
    EXPECT_TRUE(configs[0].is_default);
  }
  EXPECT_TRUE(FlashBackwardConfigs(96).empty());
}

TEST(CudaBackwardHostTest, UnknownTilingIsRefusedListingTheKnownOnes) {
  // Refused before any device call (the name lookup comes first).
  const absl::Status s = FlashBackwardWithConfig(FakeCall(), nullptr, "no_such_tiling", nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("no backward tiling 'no_such_tiling' for head_dim 64"),
            std::string::npos)
      << s;
  for (const FlashBackwardConfig& c : FlashBackwardConfigs(64)) {
    EXPECT_NE(s.message().find(c.name), std::string::npos) << c.name << ": " << s;
  }
}

// ---- GPU ------------------------------------------------------------------------------------

// Runs `c` through the backend (config empty) or one tiling, checks against the reference.
void RunCase(const Case& c, const std::string& config) {
  HostCall hc;
  ASSERT_NO_FATAL_FAILURE(MakeHostCall(c, &hc));
  DeviceCall dc;
  ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, /*accumulate=*/false));
  std::printf("  %s%s\n", CaseName(c).c_str(), config.empty() ? "" : (" " + config).c_str());
  if (config.empty()) {
    auto backend = MakeCuda();
    const absl::Status s = backend->Backward(dc.p);
    ASSERT_TRUE(s.ok()) << s;
  } else {
    DeviceBuffer delta(hc.lse.size() * sizeof(float));
    const absl::Status s =
        FlashBackwardWithConfig(dc.p, static_cast<float*>(delta.get()), config, nullptr);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
  }
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  CheckGrads(hc, dc, 1.0);
}

class CudaBackwardSweep : public GpuTest, public ::testing::WithParamInterface<Case> {};

TEST_P(CudaBackwardSweep, MatchesFp64Reference) {
  SCOPED_TRACE(CaseName(GetParam()));
  RunCase(GetParam(), "");
}

std::vector<Case> SweepCases() {
  std::vector<Case> cases;
  for (DType t : {DType::kBF16, DType::kF16}) {
    for (int d : {64, 128, 256}) {
      // The fp64 reference's cost grows with d: the long cases are shorter at d 256.
      const int64_t n = d == 256 ? 400 : 1000;
      cases.push_back({1, 1, 5, 5, d, t});
      cases.push_back({7, 7, 5, 5, d, t, /*causal=*/true});
      cases.push_back({255, 255, 5, 5, d, t, /*causal=*/true});
      cases.push_back({n, n, 8, 2, d, t, /*causal=*/true});
      cases.push_back({255, n, 8, 2, d, t});
      cases.push_back({n, 255, 8, 1, d, t});
      cases.push_back({n, n, 5, 5, d, t, false, /*left=*/64, /*right=*/0});
      cases.push_back({255, 255, 8, 2, d, t, false, 16, 16});
      cases.push_back({255, 100, 5, 5, d, t, false, 20, 5});
    }
  }
  for (int d : {64, 128, 256}) {
    Case softcap{255, 255, 8, 2, d, DType::kBF16, /*causal=*/true};
    softcap.softcap = 5.0f;
    cases.push_back(softcap);
    Case alibi{255, 300, 5, 5, d, DType::kBF16};
    alibi.alibi = true;
    cases.push_back(alibi);
    Case both{300, 300, 8, 2, d, DType::kF16, true, 128, 0};
    both.softcap = 10.0f;
    both.alibi = true;
    cases.push_back(both);
    // A ring step: queries at global positions 300.., keys at 0..: causal masks part of it.
    Case offset{255, 400, 8, 2, d, DType::kBF16, /*causal=*/true};
    offset.q_pos_offset = 300;
    cases.push_back(offset);
  }
  cases.push_back({3816, 3816, 5, 5, 64, DType::kBF16, /*causal=*/true});
  // Dropout: the forward's mask (the fp64 reference drops the same pairs), at awkward sizes,
  // with GQA, masks, score mods and a ring step's offset.
  for (int d : {64, 128, 256}) {
    Case one{1, 1, 5, 5, d, DType::kBF16};
    Case seven{7, 7, 5, 1, d, DType::kF16, /*causal=*/true};
    Case window{255, 300, 8, 2, d, DType::kBF16, false, 40, 8};
    window.softcap = 10.0f;
    window.alibi = true;
    Case step{255, 400, 8, 2, d, DType::kF16, /*causal=*/true};
    step.q_pos_offset = 300;
    uint64_t seed = 40;
    for (Case* c : {&one, &seven, &window, &step}) {
      c->dropout_p = 0.2f;
      c->dropout_seed = seed++;
      cases.push_back(*c);
    }
  }
  // Packed sequences: runs of 1, 7 and 3816 positions (and an empty one), GQA, masks, mods,
  // dropout, a ring step's offset; every head dim.
  for (int d : {64, 128, 256}) {
    Case short_runs{8, 8, 5, 5, d, DType::kBF16, /*causal=*/true};
    short_runs.seq_bounds = {0, 1, 1, 8};
    Case mods{255, 255, 8, 2, d, DType::kF16, /*causal=*/true, 40, 0};
    mods.softcap = 10.0f;
    mods.alibi = true;
    mods.dropout_p = 0.1f;
    mods.dropout_seed = 5;
    mods.seq_bounds = {0, 7, 100, 255};
    Case step{255, 400, 8, 1, d, DType::kBF16, /*causal=*/true};
    step.q_pos_offset = 300;
    step.seq_bounds = {0, 320, 410, 555};
    cases.push_back(short_runs);
    cases.push_back(mods);
    cases.push_back(step);
  }
  Case long_packed{3824, 3824, 5, 1, 64, DType::kBF16, /*causal=*/true};
  long_packed.seq_bounds = {0, 3816, 3823, 3824};
  cases.push_back(long_packed);
  Case long_dropout{3816, 3816, 5, 1, 64, DType::kBF16, /*causal=*/true};
  long_dropout.dropout_p = 0.1f;
  long_dropout.dropout_seed = 7;
  cases.push_back(long_dropout);
  // Two runs of positions per call (the ring's zigzag step in one call).
  for (int d : {64, 128}) {
    Case runs{200, 180, 8, 2, d, DType::kBF16, /*causal=*/true};
    runs.q_split = 100;
    runs.q_offset2 = 300;
    runs.k_split = 64;
    runs.k_offset2 = 250;
    cases.push_back(runs);
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Sweep, CudaBackwardSweep, ::testing::ValuesIn(SweepCases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return CaseName(info.param);
                         });

class CudaBackwardGpuTest : public GpuTest {};

// Every compiled tiling of each head dim on a few shapes that exercise the mask, GQA and the
// score mods, with the resources ptxas gave it.
TEST_F(CudaBackwardGpuTest, EveryTilingMatchesFp64Reference) {
  for (int d : {64, 128, 256}) {
    for (const FlashBackwardConfig& config : FlashBackwardConfigs(d)) {
      for (DType t : {DType::kBF16, DType::kF16}) {
        absl::StatusOr<FlashBackwardResources> r =
            FlashBackwardKernelResources(d, t, config.name);
        ASSERT_TRUE(r.ok()) << r.status();
        std::printf("d%d %s %s: %d regs, %d B local; mods %d regs, %d B local; smem %d B, "
                    "%d CTA/SM\n",
                    d, config.name.c_str(), std::string(DTypeName(t)).c_str(), r->registers,
                    r->local_bytes, r->mods_registers, r->mods_local_bytes, r->smem_bytes,
                    r->ctas_per_sm);
        EXPECT_GE(r->ctas_per_sm, 1) << config.name;
      }
      Case causal{300, 300, 8, 2, d, DType::kBF16, /*causal=*/true};
      Case window{200, 333, 5, 5, d, DType::kF16, false, 40, 7};
      Case mods{130, 170, 4, 2, d, DType::kBF16};
      mods.softcap = 8.0f;
      mods.alibi = true;
      for (const Case& c : {causal, window, mods}) {
        SCOPED_TRACE(absl::StrCat(CaseName(c), " tiling ", config.name));
        RunCase(c, config.name);
      }
    }
  }
}

TEST_F(CudaBackwardGpuTest, AccumulateTwiceIsTwice) {
  for (const Case& c : {Case{255, 255, 8, 2, 64, DType::kBF16, true},
                        Case{100, 300, 5, 5, 128, DType::kF16, false, 30, 30}}) {
    SCOPED_TRACE(CaseName(c));
    HostCall hc;
    ASSERT_NO_FATAL_FAILURE(MakeHostCall(c, &hc));
    DeviceCall dc;
    ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, /*accumulate=*/true));
    auto backend = MakeCuda();
    ASSERT_TRUE(backend->Backward(dc.p).ok());
    const absl::Status s = backend->Backward(dc.p);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    CheckGrads(hc, dc, 2.0);
  }
}

TEST_F(CudaBackwardGpuTest, KeySplitAccumulatesToWholeGradient) {
  for (bool causal : {false, true}) {
    const Case c{255, 256, 8, 2, 128, DType::kBF16, causal};
    SCOPED_TRACE(absl::StrCat("key split ", CaseName(c)));
    HostCall hc;
    ASSERT_NO_FATAL_FAILURE(MakeHostCall(c, &hc));
    DeviceCall dc;
    ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, /*accumulate=*/true));
    auto backend = MakeCuda();
    for (const auto& [begin, end] : {std::pair<int64_t, int64_t>{0, 100}, {100, 256}}) {
      AttentionBackwardParams part = dc.p;
      part.fwd = kernel_testing::KeyRange(dc.p.fwd, begin, end);
      part.dk = dc.p.dk + begin * dc.p.dk_row_stride;
      part.dv = dc.p.dv + begin * dc.p.dv_row_stride;
      const absl::Status s = backend->Backward(part);
      ASSERT_TRUE(s.ok()) << "keys [" << begin << ", " << end << "): " << s;
    }
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    CheckGrads(hc, dc, 1.0);
  }
}

TEST_F(CudaBackwardGpuTest, DkDvAreDeterministic) {
  const Case c{1000, 1000, 8, 2, 128, DType::kBF16, /*causal=*/true};
  HostCall hc;
  ASSERT_NO_FATAL_FAILURE(MakeHostCall(c, &hc));
  std::vector<float> first_dk, first_dv;
  for (int run = 0; run < 2; ++run) {
    DeviceCall dc;
    ASSERT_NO_FATAL_FAILURE(ToDevice(hc, &dc, /*accumulate=*/false));
    auto backend = MakeCuda();
    ASSERT_TRUE(backend->Backward(dc.p).ok());
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> dk = Download(dc.dk), dv = Download(dc.dv);
    if (run == 0) {
      first_dk = std::move(dk);
      first_dv = std::move(dv);
    } else {
      EXPECT_EQ(dk, first_dk);
      EXPECT_EQ(dv, first_dv);
    }
  }
}

}  // namespace
}  // namespace ringattn
