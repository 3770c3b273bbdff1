// Every compiled tiling of the fast forward kernel (flash_fwd_configs.h), forced by name through
// FlashForwardWithConfig, against the simple kernel ("cuda_reference": fp32 arithmetic, no
// tiling, no online softmax) on the same device inputs: partial tiles, GQA/MQA, batches, every
// mask with global positions and strides, fully masked rows, score mods (the second kernel of
// each tiling), fp32/fp16/bf16 outputs, merge_into_output, strided layouts, null lse, and
// sequences long enough to cycle every pipeline stage. One binary covers every tiling the build
// compiles (the defaults; every row of flash_fwd_configs.h with RINGATTN_CUDA_ALL_TILINGS); the
// whole cuda_backend_test also runs on one tiling with RINGATTN_FLASH_FWD_CONFIG=<name>.
//
// Without a CUDA device the GPU tests skip (gtest reports success); the tests of the tiling
// list itself need no device.
//
// Tolerances: as cuda_backend_test's fast kernel against the simple one (see its header): the
// fast kernel's error is P rounded to the input dtype for the P.V mma plus the output's
// rounding; relative L2 of o <= 1e-2 with bf16 involved, <= 2e-3 for fp16; per element
// |got - want| <= atol + 2.02 u(o_dtype) |want| with atol 3e-2 (bf16) / 4e-3 (fp16); lse within
// 1e-3 + 1e-5 |want|; infinities (fully masked rows) must match exactly; NaN never passes.
#include <cuda_runtime_api.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/attention_params.h"
#include "kernels/cpu/test_util.h"
#include "kernels/cuda/flash_fwd.h"
#include "kernels/cuda/flash_fwd_configs.h"
#include "kernels/cuda/flash_fwd_hopper.h"
#include "kernels/cuda/gpu_test_util.h"
#include "kernels/cuda/reference_attention.h"
#include "kernels/cuda/tiling_lookup.h"
#include "kernels/params_check.h"
#include "ringattn_config.h"

namespace ringattn {
namespace {

using kernel_testing::AttentionBuffers;
using kernel_testing::Bytes;
using kernel_testing::Causal;
using kernel_testing::FillRandomNormal;
using kernel_testing::GpuAvailable;
using kernel_testing::KeyRange;
using kernel_testing::MakeAttentionBuffers;
using kernel_testing::Positions;
using kernel_testing::Shape;
using kernel_testing::TypedBuffer;
using kernel_testing::UnitRoundoff;
using kernel_testing::Window;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One device allocation; failures abort (nothing can be tested without memory).
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) Check(cudaMalloc(&ptr_, bytes), "cudaMalloc");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  void* get() const { return ptr_; }
  void Upload(const void* host) {
    if (bytes_ > 0) Check(cudaMemcpy(ptr_, host, bytes_, cudaMemcpyHostToDevice), "upload");
  }
  void Download(void* host) const {
    if (bytes_ > 0) Check(cudaMemcpy(host, ptr_, bytes_, cudaMemcpyDeviceToHost), "download");
  }
  // 0xff bytes: NaN in fp32, fp16 and bf16.
  void Poison() {
    if (bytes_ > 0) Check(cudaMemset(ptr_, 0xff, bytes_), "cudaMemset");
  }

 private:
  static void Check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return;
    std::fprintf(stderr, "fatal: %s failed: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// ---- Cases ----------------------------------------------------------------------------------

struct Case {
  std::string config;  // tiling name
  std::string name;
  AttentionParams p;  // sizes and options (head_dim set); tensors attached per test
  bool alibi = false;
  int64_t merge_split = -1;  // >= 0: keys [0, split) give the partial, [split, end) merge into it
  bool padded = false;       // q/k/v/o/lse with padding between heads and rows
  bool null_lse = false;
};

AttentionParams Softcap(AttentionParams p, float cap) {
  p.softcap = cap;
  return p;
}

// The same cases for every tiling of every head dim.
std::vector<Case> CasesFor(const FlashForwardConfig& config) {
  const int d = config.head_dim;
  const DType bf16 = DType::kBF16, f16 = DType::kF16, f32 = DType::kF32;
  std::vector<Case> cases = {
      {"", "Seq1", Shape(1, 1, 2, 2, d)},
      {"", "Seq7Heads5F16", Shape(7, 7, 5, 5, d, f16, f16)},
      {"", "Seq255Gqa4to2", Shape(255, 255, 4, 2, d)},
      {"", "Batch2Q130K67Mqa", Shape(130, 67, 4, 1, d, bf16, bf16, 2)},
      {"", "ExactTiles", Shape(256, 256, 2, 2, d, f16, f32)},
      {"", "Q33K1000", Shape(33, 1000, 2, 2, d)},
      {"", "Causal300F16", Causal(Shape(300, 300, 2, 1, d, f16, f16))},
      {"", "CausalQueriesAfterKeys", Causal(Positions(Shape(100, 300, 2, 2, d), 200, 1, 0, 1))},
      {"", "CausalStripe", Causal(Positions(Shape(200, 200, 2, 2, d), 1, 2, 0, 2))},
      {"", "Window40x10", Window(Shape(300, 300, 2, 2, d), 40, 10)},
      {"", "SomeRowsFullyMasked", Window(Positions(Shape(150, 150, 2, 2, d), 0, 1, 0, 2), 0, 0)},
      {"", "AllRowsFullyMasked", Causal(Positions(Shape(170, 90, 2, 2, d), 0, 1, 1000, 1))},
      {"", "AlibiSoftcapCausal", Softcap(Causal(Shape(255, 300, 4, 2, d)), 20.0f), true},
      {"", "AlibiWindowF16F32Out", Window(Shape(200, 260, 2, 2, d, f16, f32), 64, 32), true},
      {"", "Long1100CausalGqa", Causal(Shape(1100, 1100, 2, 1, d))},
      {"", "MergeCausal", Causal(Shape(255, 255, 4, 2, d, bf16, f32)), false, 120},
      {"", "MergeWindowAlibiF16", Window(Shape(200, 300, 2, 2, d, f16, f32), 20, 5), true, 140},
      {"", "MergeEmptySecondHalf", Causal(Shape(100, 200, 2, 2, d, bf16, f32)), false, 100},
      {"", "PaddedLayoutCausal",
       Causal(Positions(Shape(150, 90, 4, 2, d, f16, f32, 2), 40, 1, 0, 1)), false, -1, true},
      {"", "NullLse", Causal(Shape(65, 65, 2, 2, d)), false, -1, false, true},
  };
  for (Case& c : cases) c.config = config.name;
  return cases;
}

std::vector<Case> AllCases() {
  std::vector<Case> all;
  for (int d : {64, 128, 256}) {
    for (const FlashForwardConfig& config : FlashForwardConfigs(d)) {
      for (Case& c : CasesFor(config)) all.push_back(std::move(c));
    }
  }
  return all;
}

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  std::string name =
      absl::StrCat("D", info.param.p.head_dim, "_", info.param.config, "_", info.param.name);
  for (char& ch : name) {
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  }
  return name;
}

// ---- Running ---------------------------------------------------------------------------------

// Host tensors laid out by p's strides (contiguous, or padded between heads and rows).
AttentionBuffers MakeBuffers(AttentionParams* p, uint32_t seed, bool alibi, bool padded) {
  if (!padded) return MakeAttentionBuffers(p, seed, alibi);
  const int64_t d = p->head_dim, head_pad = 8, row_pad = 16;
  p->q_head_stride = p->o_head_stride = d + head_pad;
  p->q_row_stride = p->o_row_stride = p->heads * (d + head_pad) + row_pad;
  p->q_batch_stride = p->o_batch_stride = p->seqlen_q * p->q_row_stride + row_pad;
  p->k_head_stride = p->v_head_stride = d + head_pad;
  p->k_row_stride = p->v_row_stride = p->heads_k * (d + head_pad) + row_pad;
  p->k_batch_stride = p->v_batch_stride = p->seqlen_k * p->k_row_stride;
  p->lse_head_stride = p->seqlen_q + 3;
  p->lse_batch_stride = p->heads * p->lse_head_stride + 5;
  AttentionBuffers t;
  t.q = TypedBuffer(p->dtype, p->batch * p->q_batch_stride);
  t.k = TypedBuffer(p->dtype, p->batch * p->k_batch_stride);
  t.v = TypedBuffer(p->dtype, p->batch * p->v_batch_stride);
  t.o = TypedBuffer(p->o_dtype, p->batch * p->o_batch_stride);
  t.lse.assign(p->batch * p->lse_batch_stride, std::numeric_limits<float>::quiet_NaN());
  FillRandomNormal(&t.q, seed * 4 + 1);
  FillRandomNormal(&t.k, seed * 4 + 2);
  FillRandomNormal(&t.v, seed * 4 + 3);
  if (alibi) {
    for (int h = 0; h < p->heads; ++h) t.alibi.push_back(std::exp2(-8.0f * (h + 1) / p->heads));
  }
  p->q = t.q.data();
  p->k = t.k.data();
  p->v = t.v.data();
  p->o = t.o.data();
  p->lse = t.lse.data();
  p->alibi_slopes = alibi ? t.alibi.data() : nullptr;
  return t;
}

// The device copies of one case's tensors and the params pointing at them.
struct DeviceCase {
  explicit DeviceCase(const AttentionParams& host, const AttentionBuffers& t)
      : q(Bytes(t.q)),
        k(Bytes(t.k)),
        v(Bytes(t.v)),
        o(Bytes(t.o)),
        lse(t.lse.size() * sizeof(float)),
        alibi(t.alibi.size() * sizeof(float)) {
    q.Upload(t.q.data());
    k.Upload(t.k.data());
    v.Upload(t.v.data());
    alibi.Upload(t.alibi.data());
    p = host;
    p.q = q.get();
    p.k = k.get();
    p.v = v.get();
    p.o = o.get();
    p.lse = host.lse == nullptr ? nullptr : static_cast<float*>(lse.get());
    p.alibi_slopes = host.alibi_slopes == nullptr ? nullptr : static_cast<float*>(alibi.get());
  }
  DeviceBuffer q, k, v, o, lse, alibi;
  AttentionParams p;
};

absl::Status Synchronize() {
  const cudaError_t e = cudaDeviceSynchronize();
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("kernel failed: ", cudaGetErrorString(e)));
}

// Runs `p` with the simple kernel (config empty) or the named tiling, into o/lse as they are
// (poisoned, or holding a partial to merge into); copies o and lse back into *t.
absl::Status RunKernel(const std::string& config, DeviceCase* dev, const AttentionParams& p,
                       AttentionBuffers* t) {
  absl::Status s = config.empty() ? CudaReferenceForward(p, nullptr)
                                  : FlashForwardWithConfig(p, config, nullptr);
  if (!s.ok()) return s;
  if (s = Synchronize(); !s.ok()) return s;
  dev->o.Download(t->o.data());
  dev->lse.Download(t->lse.data());
  return absl::OkStatus();
}

class FlashFwdConfigTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(FlashFwdConfigTest, MatchesSimpleKernel) {
  const Case& c = GetParam();
  AttentionParams host = c.p;
  AttentionBuffers t = MakeBuffers(&host, static_cast<uint32_t>(std::hash<std::string>{}(c.name)),
                                   c.alibi, c.padded);
  if (c.null_lse) host.lse = nullptr;
  DeviceCase dev(host, t);
  AttentionParams call = dev.p;

  // The starting (o, lse): poison, or the simple kernel's partial over the first keys.
  AttentionBuffers start = t;
  if (c.merge_split >= 0) {
    dev.o.Poison();
    dev.lse.Poison();
    ASSERT_TRUE(RunKernel("", &dev, KeyRange(dev.p, 0, c.merge_split), &start).ok());
    call = KeyRange(dev.p, c.merge_split, dev.p.seqlen_k);
    call.merge_into_output = true;
  }
  auto reset = [&] {
    if (c.merge_split >= 0) {
      dev.o.Upload(start.o.data());
      dev.lse.Upload(start.lse.data());
    } else {
      dev.o.Poison();
      dev.lse.Poison();
    }
  };
  AttentionBuffers want = t, got = t;
  reset();
  const absl::Status simple = RunKernel("", &dev, call, &want);
  ASSERT_TRUE(simple.ok()) << simple;
  reset();
  const absl::Status fast = RunKernel(c.config, &dev, call, &got);
  ASSERT_TRUE(fast.ok()) << fast;

  // Every element of o and lse, padding included: outside the view both must still hold the
  // NaN poison or the untouched partial, so they are compared bit for bit there.
  const bool bf16 = host.dtype == DType::kBF16 || host.o_dtype == DType::kBF16;
  const double atol = host.dtype == DType::kBF16 ? 3e-2 : 4e-3;
  const double rtol = 2.02 * UnitRoundoff(host.o_dtype);
  std::vector<bool> o_view(t.o.size(), false), lse_view(t.lse.size(), false);
  for (int b = 0; b < host.batch; ++b) {
    for (int h = 0; h < host.heads; ++h) {
      for (int64_t i = 0; i < host.seqlen_q; ++i) {
        const int64_t row =
            b * host.o_batch_stride + i * host.o_row_stride + h * host.o_head_stride;
        for (int col = 0; col < host.head_dim; ++col) o_view[row + col] = true;
        lse_view[b * host.lse_batch_stride + h * host.lse_head_stride + i] = true;
      }
    }
  }
  ErrorAccumulator acc;
  int64_t bad = 0, first_bad = -1;
  for (int64_t i = 0; i < t.o.size(); ++i) {
    const double g = got.o.Get(i), w = want.o.Get(i);
    if (!o_view[i]) {
      const bool same = (std::isnan(g) && std::isnan(w)) || g == w;
      if (!same && bad++ == 0) first_bad = i;
      continue;
    }
    acc.Add(g, w);
    const bool ok =
        std::isfinite(g) && std::isfinite(w) && std::abs(g - w) <= atol + rtol * std::abs(w);
    if (!ok && bad++ == 0) first_bad = i;
  }
  const ErrorStats stats = acc.Finish();
  EXPECT_EQ(bad, 0) << "o: first bad element at " << first_bad << ": got "
                    << (first_bad >= 0 ? got.o.Get(first_bad) : 0.0f) << " want "
                    << (first_bad >= 0 ? want.o.Get(first_bad) : 0.0f) << "; " << stats.ToString();
  EXPECT_LE(stats.rel_l2, bf16 ? 1e-2 : 2e-3) << stats.ToString();
  if (host.lse == nullptr) return;
  for (size_t i = 0; i < t.lse.size(); ++i) {
    const float g = got.lse[i], w = want.lse[i];
    if (!lse_view[i] || std::isinf(w)) {
      EXPECT_TRUE((std::isnan(g) && std::isnan(w)) || g == w)
          << "lse " << i << ": got " << g << " want " << w;
      continue;
    }
    EXPECT_NEAR(g, w, 1e-3 + 1e-5 * std::abs(w)) << "lse " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(AllTilings, FlashFwdConfigTest, ::testing::ValuesIn(AllCases()), CaseName);

// ---- The tiling list and the resources of each kernel ----------------------------------------

// The build compiles each head dim's default, or every row of the table
// (RINGATTN_HAVE_ALL_TILINGS).
TEST(FlashFwdConfigListTest, EveryHeadDimHasItsCompiledTilings) {
  for (int d : {64, 128, 256}) {
    SCOPED_TRACE(d);
    const std::vector<FlashForwardConfig> configs = FlashForwardConfigs(d);
    ASSERT_FALSE(configs.empty());
    EXPECT_TRUE(configs[0].is_default);
    std::set<std::string> names;
    for (size_t i = 0; i < configs.size(); ++i) {
      const FlashForwardConfig& c = configs[i];
      EXPECT_TRUE(names.insert(c.name).second) << "duplicate tiling name " << c.name;
      EXPECT_EQ(c.is_default, i == 0) << c.name;
      EXPECT_EQ(c.head_dim, d);
      EXPECT_EQ(c.rows_per_warp * c.warps, c.block_m) << c.name;
      EXPECT_TRUE(c.rows_per_warp == 16 || c.rows_per_warp == 32) << c.name;
    }
    // The Hopper kernel follows the table's rows, for the head dims it has.
    const size_t hopper = HopperForwardHasHeadDim(d) ? std::size(kHopperForwardVariants) : 0;
    for (const HopperForwardVariant& v : kHopperForwardVariants) {
      EXPECT_EQ(names.count(v.name), hopper > 0 ? 1u : 0u) << v.name;
    }
    if (hopper > 0) EXPECT_TRUE(configs.back().hopper);
    EXPECT_EQ(configs[0].hopper, HopperForwardIsDefault(d));
    if (RINGATTN_HAVE_ALL_TILINGS) {
      EXPECT_TRUE(names.count("v1")) << "v1, the baseline, is in every head dim's table";
    } else {
      EXPECT_EQ(configs.size(), 1u + hopper) << "only the default (and the Hopper kernels)";
    }
  }
  EXPECT_EQ(FlashForwardConfigs(128)[0].name, kHopperForwardConfig);  // the Hopper kernel
  EXPECT_EQ(FlashForwardConfigs(64)[0].name, "4x32_n128");
  EXPECT_EQ(FlashForwardConfigs(256)[0].name, "v1");
  EXPECT_TRUE(FlashForwardConfigs(96).empty());
}

TEST(FlashFwdConfigListTest, UnknownTilingIsInvalidArgument) {
  AttentionParams p = Shape(8, 8, 2, 2, 128);  // null tensors: no launch is reached
  SetContiguousStrides(&p);
  const absl::Status s = FlashForwardWithConfig(p, "no_such_tiling", nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("no forward tiling 'no_such_tiling' for head_dim 128"),
            std::string::npos)
      << s;
  EXPECT_NE(s.message().find("4x32_n64"), std::string::npos) << s;  // lists the known ones
}

// A row of the table that the build leaves out is refused by name, saying how to compile it.
TEST(FlashFwdConfigListTest, TilingNotCompiledIsInvalidArgument) {
  if (RINGATTN_HAVE_ALL_TILINGS) GTEST_SKIP() << "every tiling is compiled";
  AttentionParams p = Shape(8, 8, 2, 2, 128);  // null tensors: no launch is reached
  SetContiguousStrides(&p);
  const absl::Status s = FlashForwardWithConfig(p, "v1", nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("'v1' for head_dim 128 is not compiled"), std::string::npos) << s;
  EXPECT_NE(s.message().find("RINGATTN_CUDA_ALL_TILINGS"), std::string::npos) << s;
  EXPECT_EQ(FlashForwardResources(128, DType::kBF16, "v1").status().code(),
            absl::StatusCode::kInvalidArgument);
}

// RINGATTN_FLASH_FWD_CONFIG's value -> the tiling FlashForward runs (the variable itself is read
// once per process, so its rules are tested on the lookup behind it).
TEST(FlashFwdConfigListTest, ForcedTilingFromTheEnvironment) {
  constexpr const char* kVar = "RINGATTN_FLASH_FWD_CONFIG";
  auto forced = [&](std::string_view name, int head_dim) {
    return ForcedTilingIndex<flash_fwd::Tilings>("forward", kVar, name, head_dim);
  };
  EXPECT_EQ(*forced("", 128), 0);           // unset: the default
  EXPECT_EQ(*forced("4x32_n64", 128), 0);   // the default by name
  EXPECT_EQ(*forced("4x32_n128", 128), 0);  // another head dim's tiling: the default here
  const absl::StatusOr<int> unknown = forced("no_such_tiling", 128);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("RINGATTN_FLASH_FWD_CONFIG=no_such_tiling"),
            std::string::npos)
      << unknown.status();
  const absl::StatusOr<int> v1 = forced("v1", 128);
  if (RINGATTN_HAVE_ALL_TILINGS) {
    ASSERT_TRUE(v1.ok()) << v1.status();
    EXPECT_EQ(FlashForwardConfigs(128)[*v1].name, "v1");
  } else {
    EXPECT_EQ(v1.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(v1.status().message().find("RINGATTN_FLASH_FWD_CONFIG=v1"), std::string::npos)
        << v1.status();
    EXPECT_NE(v1.status().message().find("not compiled"), std::string::npos) << v1.status();
  }
}

// The occupancy each tiling was designed for (min_ctas_per_sm) is what the device gives the
// plain kernel; registers and local memory are printed for the record.
TEST(FlashFwdConfigResourcesTest, OccupancyAsPlanned) {
  if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  for (int d : {64, 128, 256}) {
    for (const FlashForwardConfig& c : FlashForwardConfigs(d)) {
      for (DType dtype : {DType::kBF16, DType::kF16}) {
        SCOPED_TRACE(absl::StrCat("d", d, " ", c.name, " ", std::string(DTypeName(dtype))));
        absl::StatusOr<FlashKernelResources> r = FlashForwardResources(d, dtype, c.name);
        ASSERT_TRUE(r.ok()) << r.status();
        std::printf(
            "d%-3d %-14s %-4s regs %3d local %4d B | mods regs %3d local %4d B | smem %6d B,"
            " %3d threads, %d CTA/SM\n",
            d, c.name.c_str(), std::string(DTypeName(dtype)).c_str(), r->registers, r->local_bytes,
            r->mods_registers, r->mods_local_bytes, r->smem_bytes, r->threads, r->ctas_per_sm);
        EXPECT_GE(r->ctas_per_sm, c.min_ctas_per_sm);
      }
    }
  }
}

}  // namespace
}  // namespace ringattn
