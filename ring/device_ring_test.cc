// The device ring on a GPU. Every test skips without a CUDA device (gtest counts a skip as a
// pass), so ctest passes on machines without one (the schedule's host-side properties are
// schedule_test's).
//
// What is checked, from the bottom up, so that a failure points at one layer:
//   1. the driver's small kernels (fill, fp32 -> bf16/fp16 conversion) bit for bit against the
//      host's StoreFromFloat;
//   2. the in-process device transport: stream order on both sides of a transfer (with host
//      functions that delay one stream, so that a missing event wait shows as wrong bytes),
//      zero-byte and self transfers, byte-count mismatch, timeout, abort;
//   3. the ring against a single kernel call on the whole sequence and against the fp64 CPU
//      reference, W = 1..4 (8 for the error-growth test), every layout, causal and not, the
//      options alone and together, awkward lengths (1, 7, 255, 381, 1000: uneven and empty
//      shards), head dims 64 and 128, batch 2;
//   4. failures: a failing rank releases the others, a rank that never posts times out,
//      refused inputs; workspace reuse;
//   5. NCCL with one rank (NCCL refuses two ranks on one GPU): init, health, self send/recv
//      in stream order, abort, and the ring through it.
//
// Tolerances. "cuda" rounds the probabilities P to bf16/fp16 for the P.V product, relative to
// the running row maximum of the call. A ring step's call sees other keys than the whole-
// sequence call (another maximum, other tiles), so its P roundings are independent of the
// single call's: with these inputs (uniform in [-1, 1), nearly uniform attention, zero-mean V)
// each output carries a relative error of about u / sqrt(3) from P (u = 2^-8 in bf16), and two
// independent ones differ by about sqrt(2) times that, 3e-3, on top of the output's rounding.
// Hence ring vs single with "cuda": relative L2 <= 8e-3 in bf16, 2e-3 in fp16 (u = 2^-11).
// Where there is nothing to differ the check is exact: one rank is one identical kernel call,
// so its output must equal the single call's bit for bit. And "cuda_reference" (fp32 math, no
// P rounding) checks the ring's indexing and merge tightly: ring vs single relative L2 <= 2e-3
// in bf16/fp16 (in practice a few rounding flips, ~1e-4) and 1e-5 in fp32. Against fp64:
// bf16 1e-2, fp16 2e-3, fp32 1e-4 (cuda_reference's own bound); lse within 1e-3 (fp32
// everywhere, from unrounded P).
#include "ring/device_ring.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "base/error_metrics.h"
#include "gtest/gtest.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/cuda/gpu_test_util.h"
#include "kernels/params_check.h"
#include "ring/ring_step.h"
#include "ring/ring_test_util.h"
#include "ring/testing/inprocess_ranks.h"
#include "ring/testing/synthetic_inputs.h"
#include "ring/transport/device_communicator.h"
#include "ring/transport/inprocess.h"
#include "ringattn_config.h"
#if RINGATTN_HAVE_NCCL
#include "ring/transport/nccl_communicator.h"
#endif

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;
using kernel_testing::GpuAvailable;
using kernel_testing::GpuTest;

constexpr const char* kFast = "cuda";
constexpr const char* kSimple = "cuda_reference";

// ---- Device plumbing ------------------------------------------------------------------------

#define ASSERT_OK(expr)                                   \
  do {                                                    \
    const ::absl::Status ra_test_status_ = (expr);        \
    ASSERT_TRUE(ra_test_status_.ok()) << ra_test_status_; \
  } while (0)

void FatalIfError(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  std::fprintf(stderr, "fatal: %s failed: %s (%s)\n", what, cudaGetErrorName(e),
               cudaGetErrorString(e));
  std::abort();
}

// One device allocation. A failing allocator leaves nothing to test: failures abort.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) FatalIfError(cudaMalloc(&ptr_, bytes), "cudaMalloc");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    std::swap(ptr_, other.ptr_);
    std::swap(bytes_, other.bytes_);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) FatalIfError(cudaFree(ptr_), "cudaFree");
  }

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }
  // Synchronous: the device holds the bytes on return.
  void Upload(const void* host) {
    if (bytes_ == 0) return;
    FatalIfError(cudaMemcpy(ptr_, host, bytes_, cudaMemcpyHostToDevice), "upload");
    FatalIfError(cudaDeviceSynchronize(), "cudaDeviceSynchronize after upload");
  }
  void Download(void* host) const {
    if (bytes_ > 0)
      FatalIfError(cudaMemcpy(host, ptr_, bytes_, cudaMemcpyDeviceToHost), "download");
  }
  std::vector<uint8_t> Bytes() const {
    std::vector<uint8_t> out(bytes_);
    Download(out.data());
    return out;
  }
  void Fill(uint8_t byte) {
    if (bytes_ == 0) return;
    FatalIfError(cudaMemset(ptr_, byte, bytes_), "cudaMemset");
    FatalIfError(cudaDeviceSynchronize(), "cudaDeviceSynchronize after cudaMemset");
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// A non-blocking stream, destroyed at scope exit.
class Stream {
 public:
  Stream() { FatalIfError(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "stream"); }
  ~Stream() { FatalIfError(cudaStreamDestroy(s_), "cudaStreamDestroy"); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// A host function that holds its stream for `*ms` milliseconds: makes one side of a transfer
// late, so that a missing stream dependency shows up as wrong bytes instead of a lucky race.
void CUDART_CB SleepOnStream(void* ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(*static_cast<const int*>(ms)));
}

// Index of the first byte of `got` that differs from `want`, or -1.
int64_t FirstByteNot(const std::vector<uint8_t>& got, uint8_t want) {
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want) return static_cast<int64_t>(i);
  }
  return -1;
}

// ---- Problems -------------------------------------------------------------------------------

struct Problem {
  DType dtype = DType::kBF16;
  int batch = 1;
  int64_t seqlen = 255;
  int heads = 4;
  int heads_k = 2;
  int head_dim = 64;
  RingAttentionOptions options;
  uint64_t seed = 7;

  std::string Describe() const {
    return absl::StrCat(std::string(DTypeName(dtype)), " b=", batch, " s=", seqlen, " h=", heads,
                        " h_k=", heads_k, " d=", head_dim, options.causal ? " causal" : "",
                        " window=(", options.window_size.first, ",", options.window_size.second,
                        ")", options.alibi_slopes.empty() ? "" : " alibi",
                        options.softcap > 0 ? absl::StrCat(" softcap=", options.softcap) : "");
  }
  int64_t OutElems() const { return static_cast<int64_t>(batch) * seqlen * heads * head_dim; }
  int64_t LseElems() const { return static_cast<int64_t>(batch) * heads * seqlen; }
};

void AddAlibi(Problem* pr) {
  pr->options.alibi_slopes.clear();
  for (int h = 0; h < pr->heads; ++h) {
    pr->options.alibi_slopes.push_back(std::exp2(-8.0f * (h + 1.0f) / pr->heads));
  }
}

using Tensors = test::RingTensors;
using test::MakeInputs;
using test::RingCase;
using test::View;
using test::WholeParams;

BackendFactory Factory(const char* name) {
  return [name] { return MakeBackend(name, MemorySpace::kDevice); };
}

// The backend `name` once on the whole sequence, on the device.
Tensors RunSingle(const Problem& pr, const char* name) {
  Tensors t = MakeInputs(pr);
  DeviceBuffer q(t.q.size()), k(t.k.size()), v(t.v.size()), o(t.out.size());
  DeviceBuffer lse(t.lse.size() * sizeof(float));
  DeviceBuffer alibi(pr.options.alibi_slopes.size() * sizeof(float));
  q.Upload(t.q.data());
  k.Upload(t.k.data());
  v.Upload(t.v.data());
  alibi.Upload(pr.options.alibi_slopes.data());
  o.Fill(0xff);
  lse.Fill(0xff);
  const AttentionParams p =
      WholeParams(pr, q.get(), k.get(), v.get(), o.get(), lse.as<float>(), alibi.as<float>());
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend =
      MakeBackend(name, MemorySpace::kDevice);
  EXPECT_TRUE(backend.ok()) << backend.status();
  if (!backend.ok()) return t;
  if (pr.seqlen > 0) {
    const absl::Status s = (*backend)->Forward(p);
    EXPECT_TRUE(s.ok()) << name << " on " << pr.Describe() << ": " << s;
  }
  FatalIfError(cudaDeviceSynchronize(), "cudaDeviceSynchronize after the single call");
  o.Download(t.out.data());
  lse.Download(t.lse.data());
  return t;
}

// Per-rank timings as the driver promises them.
void CheckTimings(const std::vector<RingTimings>& timings, int world) {
  ASSERT_EQ(timings.size(), static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) {
    const RingTimings& rt = timings[r];
    ASSERT_EQ(rt.steps.size(), static_cast<size_t>(world)) << "rank " << r;
    double busy = 0;
    for (int s = 0; s < world; ++s) {
      const RingStepTiming& st = rt.steps[s];
      EXPECT_EQ(st.source_rank, RingSourceRank(r, s, world)) << "rank " << r << " step " << s;
      EXPECT_TRUE(std::isfinite(st.compute_seconds) && st.compute_seconds >= 0)
          << "rank " << r << " step " << s << " compute " << st.compute_seconds;
      EXPECT_TRUE(std::isfinite(st.comm_wait_seconds) && st.comm_wait_seconds >= 0)
          << "rank " << r << " step " << s << " wait " << st.comm_wait_seconds;
      if (s + 1 == world) {
        EXPECT_EQ(st.comm_wait_seconds, 0) << "rank " << r << ": nothing to wait for last";
      }
      busy += st.compute_seconds + st.comm_wait_seconds;
    }
    // The steps follow each other on one stream inside the call.
    EXPECT_LE(busy, rt.total_seconds * 1.01 + 1e-4) << "rank " << r;
  }
}

// The ring on the device over the whole problem; outputs in sequence order.
Tensors RunRing(const Problem& pr, int world, Layout layout, const char* name) {
  Tensors t = MakeInputs(pr);
  absl::StatusOr<std::vector<RingTimings>> timings = RunDeviceRingInProcess(
      View(pr, t), world, layout, pr.options, Factory(name), std::chrono::seconds(60));
  EXPECT_TRUE(timings.ok()) << name << " ring of " << world << " (" << LayoutName(layout) << ") on "
                            << pr.Describe() << ": " << timings.status();
  if (timings.ok()) CheckTimings(*timings, world);
  return t;
}

// ---- Comparing ------------------------------------------------------------------------------

// Where element i of o [batch, seq, heads, head_dim] or lse [batch, heads, seq] lies.
std::string OPlace(const Problem& pr, int64_t i) {
  const int64_t d = i % pr.head_dim;
  const int64_t h = (i / pr.head_dim) % pr.heads;
  const int64_t row = (i / (static_cast<int64_t>(pr.head_dim) * pr.heads)) % pr.seqlen;
  const int64_t b = i / (static_cast<int64_t>(pr.head_dim) * pr.heads * pr.seqlen);
  return absl::StrCat("(b=", b, " pos=", row, " head=", h, " col=", d, ")");
}
std::string LsePlace(const Problem& pr, int64_t i) {
  const int64_t row = i % pr.seqlen;
  const int64_t h = (i / pr.seqlen) % pr.heads;
  const int64_t b = i / (pr.seqlen * pr.heads);
  return absl::StrCat("(b=", b, " head=", h, " pos=", row, ")");
}

std::vector<double> AsDoubles(const void* data, DType dtype, int64_t n) {
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = LoadAsFloat(data, i, dtype);
  return out;
}

// got (n elements of `dtype`) against want: no NaN, infinities equal (-inf lse of masked rows),
// relative L2 and max |got - want| within bounds. On failure: the statistics, the first NaN
// and the worst element with its place.
::testing::AssertionResult Close(const std::string& what, const Problem& pr, bool is_lse,
                                 const void* got, DType dtype, const std::vector<double>& want,
                                 double rel_l2_tol, double max_abs_tol) {
  const int64_t n = static_cast<int64_t>(want.size());
  ErrorAccumulator acc;
  int64_t first_nan = -1, first_inf_mismatch = -1, worst = -1;
  double worst_err = -1;
  for (int64_t i = 0; i < n; ++i) {
    const double g = LoadAsFloat(got, i, dtype);
    acc.Add(g, want[i]);
    if (std::isnan(g)) {
      if (first_nan < 0) first_nan = i;
    } else if (std::isinf(g) || std::isinf(want[i])) {
      if (g != want[i] && first_inf_mismatch < 0) first_inf_mismatch = i;
    } else if (std::abs(g - want[i]) > worst_err) {
      worst_err = std::abs(g - want[i]);
      worst = i;
    }
  }
  const ErrorStats s = acc.Finish();
  if (s.Within(rel_l2_tol, max_abs_tol)) return ::testing::AssertionSuccess();
  auto place = [&](int64_t i) { return is_lse ? LsePlace(pr, i) : OPlace(pr, i); };
  ::testing::AssertionResult r = ::testing::AssertionFailure();
  r << what << " on " << pr.Describe() << ": " << s.ToString() << " (allowed rel_l2 " << rel_l2_tol
    << ", max_abs " << max_abs_tol << ")";
  if (first_nan >= 0) {
    r << "; first NaN at " << place(first_nan) << " (an element the run did not write?)";
  }
  if (first_inf_mismatch >= 0) {
    r << "; first infinity mismatch at " << place(first_inf_mismatch) << " got "
      << LoadAsFloat(got, first_inf_mismatch, dtype) << " want " << want[first_inf_mismatch];
  }
  if (worst >= 0) {
    r << "; worst " << place(worst) << " got " << LoadAsFloat(got, worst, dtype) << " want "
      << want[worst];
  }
  return r;
}

::testing::AssertionResult BitIdentical(const std::string& what, const Problem& pr,
                                        const Tensors& got, const Tensors& want) {
  const size_t es = DTypeSize(pr.dtype);
  for (size_t i = 0; i < got.out.size(); ++i) {
    if (got.out[i] != want.out[i]) {
      const int64_t e = static_cast<int64_t>(i / es);
      return ::testing::AssertionFailure()
             << what << " on " << pr.Describe() << ": out differs first at " << OPlace(pr, e)
             << ": got " << LoadAsFloat(got.out.data(), e, pr.dtype) << " want "
             << LoadAsFloat(want.out.data(), e, pr.dtype);
    }
  }
  if (std::memcmp(got.lse.data(), want.lse.data(), got.lse.size() * sizeof(float)) != 0) {
    for (size_t i = 0; i < got.lse.size(); ++i) {
      if (std::memcmp(&got.lse[i], &want.lse[i], sizeof(float)) != 0) {
        return ::testing::AssertionFailure()
               << what << " on " << pr.Describe() << ": lse differs first at "
               << LsePlace(pr, static_cast<int64_t>(i)) << ": got " << got.lse[i] << " want "
               << want.lse[i];
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// Tolerances (see the top of the file).
struct Tolerance {
  double o_rel_l2;
  double o_max_abs;
  double lse_max_abs;
};

Tolerance VsSingle(const char* backend, DType dtype) {
  if (std::string(backend) == kSimple) {
    return dtype == DType::kF32 ? Tolerance{1e-5, 5e-5, 1e-4} : Tolerance{2e-3, 1e-2, 1e-4};
  }
  return dtype == DType::kBF16 ? Tolerance{8e-3, 3e-2, 1e-3} : Tolerance{2e-3, 4e-3, 1e-3};
}

// The fast backend computes fp32 inputs on fp16 copies (kernels/cuda/fp32_inputs.h): fp16's.
Tolerance VsReference(const char* backend, DType dtype) {
  if (dtype == DType::kF32 && std::string(backend) == kFast) dtype = DType::kF16;
  switch (dtype) {
    // cuda_reference's own bound against fp64 (cuda_backend_test): fp32 exp/tanh and sums.
    case DType::kF32:
      return {1e-4, 1e-3, 1e-4};
    case DType::kF16:
      return {2e-3, 1e-2, 1e-3};
    case DType::kBF16:
      return {1e-2, 5e-2, 1e-3};
  }
  return {0, 0, 0};
}

ReferenceResult Reference(const Problem& pr) {
  Tensors t = MakeInputs(pr);
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(
      WholeParams(pr, t.q.data(), t.k.data(), t.v.data(), t.out.data(), t.lse.data(),
                  pr.options.alibi_slopes.empty() ? nullptr : pr.options.alibi_slopes.data()));
  EXPECT_TRUE(ref.ok()) << ref.status();
  return ref.ok() ? *std::move(ref) : ReferenceResult{};
}

void ExpectMatchesSingle(const std::string& what, const Problem& pr, const char* backend,
                         const Tensors& ring, const Tensors& single) {
  const Tolerance tol = VsSingle(backend, pr.dtype);
  EXPECT_TRUE(Close(what + " o vs single " + backend, pr, false, ring.out.data(), pr.dtype,
                    AsDoubles(single.out.data(), pr.dtype, pr.OutElems()), tol.o_rel_l2,
                    tol.o_max_abs));
  EXPECT_TRUE(Close(what + " lse vs single " + backend, pr, true, ring.lse.data(), DType::kF32,
                    AsDoubles(single.lse.data(), DType::kF32, pr.LseElems()), 1.0,
                    tol.lse_max_abs));
}

void ExpectMatchesReference(const std::string& what, const char* backend, const Problem& pr,
                            const Tensors& ring, const ReferenceResult& ref) {
  const Tolerance tol = VsReference(backend, pr.dtype);
  EXPECT_TRUE(Close(what + " o vs fp64", pr, false, ring.out.data(), pr.dtype, ref.o, tol.o_rel_l2,
                    tol.o_max_abs));
  EXPECT_TRUE(Close(what + " lse vs fp64", pr, true, ring.lse.data(), DType::kF32, ref.lse, 1.0,
                    tol.lse_max_abs));
}

std::string RingName(int world, Layout layout) {
  return absl::StrCat("ring(", world, ", ", std::string(LayoutName(layout)), ")");
}

// ---- 1. The driver's kernels ----------------------------------------------------------------

class DeviceRingKernels : public GpuTest {};

TEST_F(DeviceRingKernels, FillFloat) {
  constexpr int64_t kN = 100003;
  DeviceBuffer x((kN + 1) * sizeof(float));
  x.Fill(0);
  Stream stream;
  // Offset by one element: the fill must not assume alignment, and must stop at n.
  ASSERT_OK(LaunchFillFloat(x.as<float>() + 1, kN - 1, -std::numeric_limits<float>::infinity(),
                            stream.get()));
  ASSERT_OK(LaunchFillFloat(x.as<float>(), 0, 1.0f, stream.get()));  // n = 0: nothing
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream.get()));
  std::vector<float> host(kN + 1);
  x.Download(host.data());
  EXPECT_EQ(host[0], 0.0f);
  for (int64_t i = 1; i < kN; ++i) {
    ASSERT_EQ(host[i], -std::numeric_limits<float>::infinity()) << "element " << i;
  }
  EXPECT_EQ(host[kN], 0.0f) << "wrote past n";
}

// Values that exercise every rounding path: ties (to even), carries into the exponent,
// fp16 overflow and subnormals, NaN, infinities, signed zeros, then random bit patterns.
std::vector<float> ConversionInputs() {
  std::vector<float> v = {0.0f,     -0.0f,    1.0f,     -1.0f,    1.00390625f, 1.01171875f,
                          65504.0f, 65519.0f, 65520.0f, 1e6f,     6e-8f,       3e-8f,
                          1e-40f,   -2.5e-5f, 3.14159f, -2.71828f};
  v.push_back(std::numeric_limits<float>::infinity());
  v.push_back(-std::numeric_limits<float>::infinity());
  v.push_back(std::numeric_limits<float>::quiet_NaN());
  v.push_back(BitsFloat(0x3f808000u));  // bf16 tie, even below: stays
  v.push_back(BitsFloat(0x3f818000u));  // bf16 tie, odd below: rounds up
  v.push_back(BitsFloat(0x7f7fffffu));  // largest float: bf16 rounds to inf
  std::mt19937 rng(12345);
  while (v.size() < 1001) {
    uint32_t bits = rng();
    // Signalling NaNs made quiet: the host may quiet them in transit, which is not the kernel's.
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x7fffffu) != 0) bits |= 0x400000u;
    v.push_back(BitsFloat(bits));
  }
  return v;
}

TEST_F(DeviceRingKernels, ConvertFromFloatIsBitExact) {
  const std::vector<float> values = ConversionInputs();
  const int64_t total = static_cast<int64_t>(values.size());
  DeviceBuffer src((total + 1) * sizeof(float));
  DeviceBuffer dst((total + 1) * sizeof(float));
  Stream stream;
  for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32}) {
    const size_t es = DTypeSize(dtype);
    for (int64_t n : {int64_t{1}, int64_t{3}, int64_t{4}, int64_t{5}, total - 1, total}) {
      // Offsets 0 (the vectorised path) and 1 element (misaligned: the scalar path).
      for (int64_t src_off : {0, 1}) {
        for (int64_t dst_off : {0, 1}) {
          if (src_off + n > total + 1 || dst_off + n > total + 1) continue;
          std::vector<float> padded(total + 1, 0.0f);
          std::copy(values.begin(), values.begin() + n, padded.begin() + src_off);
          src.Upload(padded.data());
          dst.Fill(0xa5);
          auto* d = static_cast<std::byte*>(dst.get()) + dst_off * es;
          ASSERT_OK(LaunchConvertFromFloat(src.as<float>() + src_off, d, dtype, n, stream.get()));
          ASSERT_CUDA_OK(cudaStreamSynchronize(stream.get()));
          const std::vector<uint8_t> got = dst.Bytes();
          std::vector<uint8_t> want(got.size(), 0xa5);
          for (int64_t i = 0; i < n; ++i) {
            StoreFromFloat(want.data() + dst_off * es, i, dtype, values[i]);
          }
          for (size_t b = 0; b < got.size(); ++b) {
            ASSERT_EQ(got[b], want[b]) << DTypeName(dtype) << " n=" << n << " src_off=" << src_off
                                       << " dst_off=" << dst_off << ": byte " << b << " (element "
                                       << static_cast<int64_t>(b / es) - dst_off << ", input "
                                       << values[std::min<int64_t>(b / es, total - 1)] << ")";
          }
        }
      }
    }
  }
}

// ---- 2. The in-process device transport -----------------------------------------------------

class InProcessDeviceTransport : public GpuTest {};

// Three ranks pass 1 MiB to the next one. Rank 0's data is written late on its stream (after a
// 300 ms host function): a receiver that does not wait for the sender's post event copies the
// stale 0xAA. Rank 2's stream is held 300 ms before its Enqueue, so its copy runs late: a
// sender that does not wait for the copy overwrites its buffer (0xEE right after Enqueue)
// first. Each rank also copies what it received right after Enqueue, which must see it.
TEST_F(InProcessDeviceTransport, TransfersFollowStreamOrderOnBothSides) {
  constexpr int kWorld = 3;
  constexpr size_t kBytes = size_t{1} << 20;
  static int delay_ms = 300;
  absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> comms =
      InProcessDeviceGroup::CreateCommunicators(kWorld, std::chrono::seconds(30));
  ASSERT_TRUE(comms.ok()) << comms.status();
  std::vector<DeviceBuffer> send, recv, seen;
  std::vector<std::unique_ptr<Stream>> streams;
  for (int r = 0; r < kWorld; ++r) {
    send.emplace_back(kBytes);
    recv.emplace_back(kBytes);
    seen.emplace_back(kBytes);
    send.back().Fill(0xaa);
    recv.back().Fill(0xbb);
    seen.back().Fill(0xcc);
    streams.push_back(std::make_unique<Stream>());
  }
  std::vector<absl::Status> results(kWorld);
  std::vector<std::thread> threads;
  for (int r = 0; r < kWorld; ++r) {
    threads.emplace_back([&, r] {
      FatalIfError(cudaSetDevice(0), "cudaSetDevice");
      cudaStream_t s = streams[r]->get();
      DeviceCommunicator& comm = *(*comms)[r];
      const int next = (r + 1) % kWorld, prev = (r + kWorld - 1) % kWorld;
      if (r == 0) FatalIfError(cudaLaunchHostFunc(s, SleepOnStream, &delay_ms), "host func");
      FatalIfError(cudaMemsetAsync(send[r].get(), 0x10 + r, kBytes, s), "memset data");
      if (r == 2) FatalIfError(cudaLaunchHostFunc(s, SleepOnStream, &delay_ms), "host func");
      const SendOp sends[] = {{next, send[r].get(), kBytes}};
      const RecvOp recvs[] = {{prev, recv[r].get(), kBytes}};
      results[r] = comm.Enqueue(sends, recvs, s);
      if (!results[r].ok()) return;
      FatalIfError(cudaMemsetAsync(send[r].get(), 0xee, kBytes, s), "memset overwrite");
      FatalIfError(
          cudaMemcpyAsync(seen[r].get(), recv[r].get(), kBytes, cudaMemcpyDeviceToDevice, s),
          "copy received");
      results[r] = comm.WaitStream(s, absl::Seconds(30));
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < kWorld; ++r) {
    ASSERT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
    const int prev = (r + kWorld - 1) % kWorld;
    const uint8_t want = static_cast<uint8_t>(0x10 + prev);
    const std::vector<uint8_t> got = recv[r].Bytes();
    const int64_t bad = FirstByteNot(got, want);
    EXPECT_EQ(bad, -1) << "rank " << r << " received 0x" << std::hex << int{got[bad < 0 ? 0 : bad]}
                       << " at byte " << std::dec << bad << ", want 0x" << std::hex << int{want}
                       << (got[bad < 0 ? 0 : bad] == 0xaa
                               ? ": copied before the sender's data was ready (post event)"
                           : got[bad < 0 ? 0 : bad] == 0xee
                               ? ": the sender overwrote its buffer before the copy"
                               : "");
    EXPECT_EQ(FirstByteNot(seen[r].Bytes(), want), -1)
        << "rank " << r << ": work after Enqueue on the receiver's stream did not see the bytes";
  }
}

TEST_F(InProcessDeviceTransport, SelfTransferWithOneRank) {
  absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> comms =
      InProcessDeviceGroup::CreateCommunicators(1, std::chrono::seconds(10));
  ASSERT_TRUE(comms.ok()) << comms.status();
  DeviceBuffer a(4096), b(4096);
  a.Fill(0x5a);
  b.Fill(0);
  Stream s;
  const SendOp sends[] = {{0, a.get(), 4096}};
  const RecvOp recvs[] = {{0, b.get(), 4096}};
  ASSERT_OK((*comms)[0]->Enqueue(sends, recvs, s.get()));
  ASSERT_CUDA_OK(cudaMemsetAsync(a.get(), 0xee, 4096, s.get()));
  ASSERT_OK((*comms)[0]->WaitStream(s.get(), absl::Seconds(10)));
  EXPECT_EQ(FirstByteNot(b.Bytes(), 0x5a), -1);
}

// Zero-byte transfers move nothing and need no counterpart (the ring's empty shards).
TEST_F(InProcessDeviceTransport, ZeroByteTransfersCompleteAlone) {
  absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> comms =
      InProcessDeviceGroup::CreateCommunicators(2, std::chrono::seconds(10));
  ASSERT_TRUE(comms.ok()) << comms.status();
  Stream s;
  const SendOp sends[] = {{1, nullptr, 0}};
  const RecvOp recvs[] = {{1, nullptr, 0}};
  const auto start = Clock::now();
  ASSERT_OK((*comms)[0]->Enqueue(sends, recvs, s.get()));
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));
}

// Two batches between the same pair with different sizes match in order (FIFO per pair).
TEST_F(InProcessDeviceTransport, MatchesInPostingOrder) {
  absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> comms =
      InProcessDeviceGroup::CreateCommunicators(2, std::chrono::seconds(10));
  ASSERT_TRUE(comms.ok()) << comms.status();
  DeviceBuffer a(1000), b(3000), x(1000), y(3000);
  a.Fill(0x01);
  b.Fill(0x02);
  x.Fill(0);
  y.Fill(0);
  Stream s0, s1;
  absl::Status r0, r1;
  std::thread t0([&] {
    FatalIfError(cudaSetDevice(0), "cudaSetDevice");
    const SendOp sends[] = {{1, a.get(), 1000}, {1, b.get(), 3000}};
    r0 = (*comms)[0]->Enqueue(sends, {}, s0.get());
    if (r0.ok()) r0 = (*comms)[0]->WaitStream(s0.get(), absl::Seconds(10));
  });
  std::thread t1([&] {
    FatalIfError(cudaSetDevice(0), "cudaSetDevice");
    const RecvOp first[] = {{0, x.get(), 1000}};
    const RecvOp second[] = {{0, y.get(), 3000}};
    r1 = (*comms)[1]->Enqueue({}, first, s1.get());
    if (r1.ok()) r1 = (*comms)[1]->Enqueue({}, second, s1.get());
    if (r1.ok()) r1 = (*comms)[1]->WaitStream(s1.get(), absl::Seconds(10));
  });
  t0.join();
  t1.join();
  ASSERT_TRUE(r0.ok()) << r0;
  ASSERT_TRUE(r1.ok()) << r1;
  EXPECT_EQ(FirstByteNot(x.Bytes(), 0x01), -1);
  EXPECT_EQ(FirstByteNot(y.Bytes(), 0x02), -1);
}

TEST_F(InProcessDeviceTransport, ByteCountMismatchFailsBothSides) {
  absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> comms =
      InProcessDeviceGroup::CreateCommunicators(2, std::chrono::seconds(10));
  ASSERT_TRUE(comms.ok()) << comms.status();
  DeviceBuffer a(100), b(200);
  Stream s0, s1;
  absl::Status r0, r1;
  std::thread t0([&] {
    FatalIfError(cudaSetDevice(0), "cudaSetDevice");
    const SendOp sends[] = {{1, a.get(), 100}};
    r0 = (*comms)[0]->Enqueue(sends, {}, s0.get());
  });
  std::thread t1([&] {
    FatalIfError(cudaSetDevice(0), "cudaSetDevice");
    const RecvOp recvs[] = {{0, b.get(), 200}};
    r1 = (*comms)[1]->Enqueue({}, recvs, s1.get());
  });
  t0.join();
  t1.join();
  EXPECT_EQ(r0.code(), absl::StatusCode::kInvalidArgument) << r0;
  EXPECT_EQ(r1.code(), absl::StatusCode::kInvalidArgument) << r1;
  EXPECT_NE(r0.message().find("byte count mismatch"), std::string_view::npos) << r0;
  // The group is aborted: a later call fails at once with the same reason.
  EXPECT_EQ((*comms)[0]->CheckHealth().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(InProcessDeviceTransport, DeadlineWhenThePeerNeverPosts) {
  absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> comms =
      InProcessDeviceGroup::CreateCommunicators(2, std::chrono::milliseconds(300));
  ASSERT_TRUE(comms.ok()) << comms.status();
  DeviceBuffer a(64);
  Stream s;
  const SendOp sends[] = {{1, a.get(), 64}};
  const auto start = Clock::now();
  const absl::Status r = (*comms)[0]->Enqueue(sends, {}, s.get());
  const auto elapsed = Clock::now() - start;
  EXPECT_EQ(r.code(), absl::StatusCode::kDeadlineExceeded) << r;
  EXPECT_NE(r.message().find("rank 1 has not posted"), std::string_view::npos) << r;
  EXPECT_GE(elapsed, std::chrono::milliseconds(250));
  EXPECT_LT(elapsed, std::chrono::seconds(5));
  EXPECT_EQ((*comms)[1]->CheckHealth().code(), absl::StatusCode::kDeadlineExceeded)
      << "the timeout must abort the whole group";
}

TEST_F(InProcessDeviceTransport, AbortReleasesABlockedRank) {
  absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> comms =
      InProcessDeviceGroup::CreateCommunicators(2, std::chrono::seconds(30));
  ASSERT_TRUE(comms.ok()) << comms.status();
  DeviceBuffer a(64);
  Stream s;
  absl::Status r;
  const auto start = Clock::now();
  std::thread t([&] {
    FatalIfError(cudaSetDevice(0), "cudaSetDevice");
    const SendOp sends[] = {{1, a.get(), 64}};
    r = (*comms)[0]->Enqueue(sends, {}, s.get());
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  (*comms)[1]->Abort(absl::CancelledError("planted abort"));
  t.join();
  EXPECT_EQ(r.code(), absl::StatusCode::kCancelled) << r;
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
}

TEST_F(InProcessDeviceTransport, MalformedBatchIsRejectedWithoutAborting) {
  absl::StatusOr<std::vector<std::unique_ptr<DeviceCommunicator>>> comms =
      InProcessDeviceGroup::CreateCommunicators(2, std::chrono::seconds(10));
  ASSERT_TRUE(comms.ok()) << comms.status();
  Stream s;
  const SendOp bad_peer[] = {{5, nullptr, 0}};
  EXPECT_EQ((*comms)[0]->Enqueue(bad_peer, {}, s.get()).code(), absl::StatusCode::kInvalidArgument);
  const SendOp null_data[] = {{1, nullptr, 16}};
  EXPECT_EQ((*comms)[0]->Enqueue(null_data, {}, s.get()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE((*comms)[0]->CheckHealth().ok());
}

// ---- 3. The ring against the single call and fp64 -------------------------------------------

class DeviceRingLayouts : public GpuTest, public ::testing::WithParamInterface<RingCase> {};

// bf16, batch 2, 255 positions, GQA 4:2, d 64: W = 1 must be the single call bit for bit;
// W > 1 within the P-rounding tolerance with "cuda", tightly with "cuda_reference".
TEST_P(DeviceRingLayouts, MatchesSingleCallAndReference) {
  const auto [world, layout, causal] = GetParam();
  Problem pr;
  pr.batch = 2;
  pr.options.causal = causal;
  const std::string name = RingName(world, layout);

  const Tensors single = RunSingle(pr, kFast);
  const Tensors ring = RunRing(pr, world, layout, kFast);
  if (world == 1) {
    EXPECT_TRUE(BitIdentical(name + " (one kernel call)", pr, ring, single));
  } else {
    ExpectMatchesSingle(name, pr, kFast, ring, single);
  }
  ExpectMatchesReference(name + " cuda", kFast, pr, ring, Reference(pr));

  const Tensors single_simple = RunSingle(pr, kSimple);
  const Tensors ring_simple = RunRing(pr, world, layout, kSimple);
  ExpectMatchesSingle(name, pr, kSimple, ring_simple, single_simple);
}

INSTANTIATE_TEST_SUITE_P(WorldsLayouts, DeviceRingLayouts,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(Layout::kContiguous, Layout::kZigzag,
                                                              Layout::kStripe),
                                            ::testing::Bool()),
                         test::RingCaseName);

struct OptionCase {
  std::string name;
  const char* backend;
  DType dtype;
  int heads, heads_k, head_dim;
  int64_t seqlen;
  bool causal;
  std::pair<int64_t, int64_t> window;
  bool alibi;
  float softcap;
  float dropout = 0.0f;  // with seed 17 (ApplyOptionCase): the CPU path's mask
  std::vector<int64_t> cu_seqlens = {};  // packed sequences (options.seq_bounds); empty: one
};

class DeviceRingOptions : public GpuTest, public ::testing::WithParamInterface<OptionCase> {};

// Every option alone and together with W = 2, 3, 4 and every layout against the single call
// with the same kernel, then W = 4 zigzag against fp64.
TEST_P(DeviceRingOptions, MatchesSingleCallAndReference) {
  const OptionCase& c = GetParam();
  Problem pr;
  test::ApplyOptionCase(c, &pr);
  if (c.alibi) AddAlibi(&pr);
  const Tensors single = RunSingle(pr, c.backend);
  for (int world : {2, 3, 4}) {
    for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStripe}) {
      const Tensors ring = RunRing(pr, world, layout, c.backend);
      ExpectMatchesSingle(RingName(world, layout), pr, c.backend, ring, single);
    }
  }
  const Tensors ring = RunRing(pr, 4, Layout::kZigzag, c.backend);
  ExpectMatchesReference(RingName(4, Layout::kZigzag), c.backend, pr, ring, Reference(pr));
}

const DType kBf16 = DType::kBF16;
const DType kFp16 = DType::kF16;
const DType kFp32 = DType::kF32;
const std::pair<int64_t, int64_t> kNoWindow = {-1, -1};

INSTANTIATE_TEST_SUITE_P(
    Options, DeviceRingOptions,
    ::testing::Values(
        OptionCase{"gqa8to2_causal", kFast, kBf16, 8, 2, 64, 255, true, kNoWindow, false, 0},
        OptionCase{"mqa8to1_d128", kFast, kBf16, 8, 1, 128, 255, false, kNoWindow, false, 0},
        OptionCase{"window", kFast, kBf16, 4, 4, 64, 255, false, {17, 9}, false, 0},
        OptionCase{"window_causal_d128", kFast, kBf16, 4, 2, 128, 255, true, {40, -1}, false, 0},
        OptionCase{"window_zero", kFast, kBf16, 2, 2, 64, 64, false, {0, 0}, false, 0},
        OptionCase{"alibi_causal", kFast, kBf16, 4, 4, 64, 255, true, kNoWindow, true, 0},
        OptionCase{"softcap_d128", kFast, kBf16, 4, 4, 128, 255, false, kNoWindow, false, 5.0f},
        OptionCase{"all_bf16", kFast, kBf16, 8, 2, 128, 381, true, {60, -1}, true, 20.0f},
        OptionCase{"all_fp16", kFast, kFp16, 8, 2, 64, 381, false, {30, 30}, true, 20.0f},
        OptionCase{"seq1", kFast, kBf16, 4, 2, 64, 1, true, kNoWindow, false, 0},
        OptionCase{"seq7_d128", kFast, kBf16, 4, 2, 128, 7, true, kNoWindow, false, 0},
        OptionCase{"seq1000_uneven", kFast, kBf16, 8, 2, 128, 1000, true, kNoWindow, false, 0},
        OptionCase{"dropout_causal_gqa", kFast, kBf16, 5, 1, 64, 255, true, kNoWindow, false, 0,
                   0.2f},
        OptionCase{"dropout_all_fp16", kFast, kFp16, 8, 2, 128, 381, true, {60, -1}, true, 20.0f,
                   0.1f},
        OptionCase{"dropout_simple", kSimple, kBf16, 5, 5, 64, 7, true, kNoWindow, false, 0, 0.3f},
        OptionCase{"fp32_fast", kFast, kFp32, 5, 1, 64, 255, true, kNoWindow, false, 0},
        OptionCase{"packed_causal_gqa", kFast, kBf16, 5, 1, 64, 255, true, kNoWindow, false, 0,
                   0, {0, 1, 8, 8, 200, 255}},
        OptionCase{"packed_all", kFast, kFp16, 8, 2, 128, 381, true, {60, -1}, true, 20.0f, 0.1f,
                   {0, 7, 300, 381}},
        OptionCase{"packed_simple", kSimple, kBf16, 5, 5, 64, 255, true, kNoWindow, false, 0, 0,
                   {0, 100, 255}},
        OptionCase{"fp32_simple", kSimple, kFp32, 5, 5, 64, 255, true, kNoWindow, true, 0},
        OptionCase{
            "fp32_simple_all", kSimple, kFp32, 8, 2, 128, 1000, true, {100, -1}, true, 20.0f}),
    [](const ::testing::TestParamInfo<OptionCase>& info) { return info.param.name; });

// The ring keeps its partials in fp32 and rounds once, so its bf16 error against fp64 does not
// grow with the number of ranks (the reference Python ring rounds every step's partial).
class DeviceRingNumerics : public GpuTest {};

TEST_F(DeviceRingNumerics, ErrorDoesNotGrowWithRanks) {
  Problem pr;
  pr.seqlen = 512;
  pr.heads = 4;
  pr.heads_k = 4;
  pr.options.causal = true;
  const ReferenceResult ref = Reference(pr);
  ASSERT_EQ(ref.o.size(), static_cast<size_t>(pr.OutElems()));
  std::vector<double> errs;
  for (int world : {1, 2, 4, 8}) {
    const Tensors ring = RunRing(pr, world, Layout::kZigzag, kFast);
    errs.push_back(CompareTensor(ring.out.data(), pr.dtype, ref.o.data(), pr.OutElems()).rel_l2);
  }
  std::printf("bf16 relative L2 vs fp64, W = 1, 2, 4, 8: %.4g %.4g %.4g %.4g\n", errs[0], errs[1],
              errs[2], errs[3]);
  for (size_t i = 1; i < errs.size(); ++i) {
    EXPECT_LE(errs[i], errs[0] * 1.05 + 1e-6)
        << "W index " << i << ": error " << errs[0] << " at W = 1 grew to " << errs[i];
  }
}

// ---- 4. Failures, refusals, workspace reuse -------------------------------------------------

class DeviceRingFailures : public GpuTest {};

// A rank that fails (its backend cannot be made) must not leave the others waiting for its
// blocks until their timeout.
TEST_F(DeviceRingFailures, OneFailingRankReleasesTheOthers) {
  Problem pr;
  pr.seqlen = 64;
  Tensors t = MakeInputs(pr);
  std::atomic<int> made{0};
  BackendFactory flaky = [&]() -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    if (made.fetch_add(1) == 1) return absl::InternalError("planted backend failure");
    return MakeBackend(kFast);
  };
  const auto start = Clock::now();
  absl::StatusOr<std::vector<RingTimings>> r = RunDeviceRingInProcess(
      View(pr, t), 4, Layout::kZigzag, pr.options, flaky, std::chrono::seconds(30));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("planted backend failure"), std::string_view::npos)
      << r.status();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
}

// A rank that never posts (its backend takes 2 s to make) times the others out after 300 ms;
// the late rank then finds the group aborted.
TEST_F(DeviceRingFailures, DeadlineWhenOneRankNeverPosts) {
  Problem pr;
  pr.seqlen = 64;
  Tensors t = MakeInputs(pr);
  std::atomic<int> made{0};
  BackendFactory slow = [&]() -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    if (made.fetch_add(1) == 1) std::this_thread::sleep_for(std::chrono::seconds(2));
    return MakeBackend(kFast);
  };
  const auto start = Clock::now();
  absl::StatusOr<std::vector<RingTimings>> r = RunDeviceRingInProcess(
      View(pr, t), 3, Layout::kContiguous, pr.options, slow, std::chrono::milliseconds(300));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(10));
}

TEST_F(DeviceRingFailures, RefusedOptionsFailFast) {
  Problem pr;
  pr.seqlen = 16;
  for (const test::RefusedOptions& b : test::RefusedOptionCases()) {
    pr.options = b.options;
    Tensors t = MakeInputs(pr);
    const auto start = Clock::now();
    absl::StatusOr<std::vector<RingTimings>> r = RunDeviceRingInProcess(
        View(pr, t), 3, Layout::kContiguous, pr.options, Factory(kFast), std::chrono::seconds(30));
    ASSERT_FALSE(r.ok()) << b.expect;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find(b.expect), std::string_view::npos) << r.status();
    EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
  }
}

TEST_F(DeviceRingFailures, UnsupportedHeadDim) {
  Problem pr;
  pr.head_dim = 96;
  pr.seqlen = 8;
  Tensors t = MakeInputs(pr);
  absl::StatusOr<std::vector<RingTimings>> r =
      RunDeviceRingInProcess(View(pr, t), 2, Layout::kContiguous, pr.options, Factory(kFast));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("head_dim 96"), std::string_view::npos) << r.status();
}

TEST_F(DeviceRingFailures, RefusesAHostBackend) {
  Problem pr;
  pr.seqlen = 8;
  Tensors t = MakeInputs(pr);
  BackendFactory cpu = [] { return MakeBackend("cpu"); };
  absl::StatusOr<std::vector<RingTimings>> r =
      RunDeviceRingInProcess(View(pr, t), 2, Layout::kContiguous, pr.options, cpu);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_NE(r.status().message().find("CUDA backend"), std::string_view::npos) << r.status();
}

// Shards of a whole problem on the device, for DeviceInProcessRing directly.
struct DeviceShards {
  std::vector<DeviceBuffer> q, k, v, out, lse;
  std::vector<RingShardTensors> views;

  DeviceShards(const Problem& pr, const Tensors& whole, const ShardPlan& plan) {
    const size_t es = DTypeSize(pr.dtype);
    const size_t q_row = static_cast<size_t>(pr.heads) * pr.head_dim * es;
    const size_t kv_row = static_cast<size_t>(pr.heads_k) * pr.head_dim * es;
    for (int r = 0; r < plan.world; ++r) {
      const int64_t rows = plan.shards[r].rows;
      std::vector<std::byte> host_q(pr.batch * rows * q_row), host_k(pr.batch * rows * kv_row),
          host_v(host_k.size());
      ExtractShard(plan, r, whole.q.data(), pr.batch, q_row, host_q.data());
      ExtractShard(plan, r, whole.k.data(), pr.batch, kv_row, host_k.data());
      ExtractShard(plan, r, whole.v.data(), pr.batch, kv_row, host_v.data());
      q.emplace_back(host_q.size());
      k.emplace_back(host_k.size());
      v.emplace_back(host_v.size());
      out.emplace_back(host_q.size());
      lse.emplace_back(static_cast<size_t>(pr.batch) * pr.heads * rows * sizeof(float));
      q.back().Upload(host_q.data());
      k.back().Upload(host_k.data());
      v.back().Upload(host_v.data());
      out.back().Fill(0xff);
      lse.back().Fill(0xff);
      RingShardTensors t;
      t.dtype = pr.dtype;
      t.batch = pr.batch;
      t.heads = pr.heads;
      t.heads_k = pr.heads_k;
      t.head_dim = pr.head_dim;
      t.q = q.back().get();
      t.k = k.back().get();
      t.v = v.back().get();
      t.out = out.back().get();
      t.lse = lse.back().as<float>();
      views.push_back(t);
    }
  }
  // Every rank's out, concatenated in rank order (for comparing two runs).
  std::vector<uint8_t> AllOutputs() const {
    std::vector<uint8_t> all;
    for (const DeviceBuffer& b : out) {
      const std::vector<uint8_t> bytes = b.Bytes();
      all.insert(all.end(), bytes.begin(), bytes.end());
    }
    for (const DeviceBuffer& b : lse) {
      const std::vector<uint8_t> bytes = b.Bytes();
      all.insert(all.end(), bytes.begin(), bytes.end());
    }
    return all;
  }
};

// A second call of the same size allocates nothing and reproduces the first bit for bit; a
// larger call grows the workspace, a smaller one reuses it.
TEST_F(DeviceRingFailures, WorkspaceIsReusedAcrossCalls) {
  absl::StatusOr<std::unique_ptr<DeviceInProcessRing>> ring =
      DeviceInProcessRing::Create(3, Factory(kFast), std::chrono::seconds(30));
  ASSERT_TRUE(ring.ok()) << ring.status();
  Problem pr;
  pr.options.causal = true;
  const Tensors whole = MakeInputs(pr);
  absl::StatusOr<ShardPlan> plan = PlanShards(pr.seqlen, 3, Layout::kZigzag);
  ASSERT_TRUE(plan.ok());
  DeviceShards shards(pr, whole, *plan);
  absl::StatusOr<std::vector<RingTimings>> first = (*ring)->Run(*plan, shards.views, pr.options);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::vector<uint8_t> first_out = shards.AllOutputs();
  const size_t bytes = (*ring)->workspace_bytes();
  EXPECT_GT(bytes, 0u);
  absl::StatusOr<std::vector<RingTimings>> second = (*ring)->Run(*plan, shards.views, pr.options);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*ring)->workspace_bytes(), bytes) << "the same call again must not grow anything";
  EXPECT_TRUE(shards.AllOutputs() == first_out) << "the second call differs from the first";

  Problem bigger = pr;
  bigger.seqlen = 1000;
  const Tensors whole_big = MakeInputs(bigger);
  absl::StatusOr<ShardPlan> plan_big = PlanShards(bigger.seqlen, 3, Layout::kZigzag);
  ASSERT_TRUE(plan_big.ok());
  DeviceShards shards_big(bigger, whole_big, *plan_big);
  ASSERT_TRUE((*ring)->Run(*plan_big, shards_big.views, bigger.options).ok());
  EXPECT_GT((*ring)->workspace_bytes(), bytes);
  const size_t big_bytes = (*ring)->workspace_bytes();
  ASSERT_TRUE((*ring)->Run(*plan, shards.views, pr.options).ok());
  EXPECT_EQ((*ring)->workspace_bytes(), big_bytes);
  EXPECT_TRUE(shards.AllOutputs() == first_out) << "a smaller call in a grown workspace differs";
}

// A failed Run leaves the ring usable: the next Run forms a fresh group.
TEST_F(DeviceRingFailures, RingRecoversAfterAFailedRun) {
  std::atomic<bool> fail{true};
  BackendFactory once = [&]() -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    if (fail.exchange(false)) return absl::InternalError("planted first failure");
    return MakeBackend(kFast);
  };
  absl::StatusOr<std::unique_ptr<DeviceInProcessRing>> ring =
      DeviceInProcessRing::Create(2, once, std::chrono::seconds(30));
  ASSERT_TRUE(ring.ok()) << ring.status();
  Problem pr;
  const Tensors whole = MakeInputs(pr);
  absl::StatusOr<ShardPlan> plan = PlanShards(pr.seqlen, 2, Layout::kContiguous);
  ASSERT_TRUE(plan.ok());
  DeviceShards shards(pr, whole, *plan);
  EXPECT_FALSE((*ring)->Run(*plan, shards.views, pr.options).ok());
  absl::StatusOr<std::vector<RingTimings>> again = (*ring)->Run(*plan, shards.views, pr.options);
  EXPECT_TRUE(again.ok()) << again.status();
}

// ---- 5. NCCL with one rank ------------------------------------------------------------------

#if RINGATTN_HAVE_NCCL

class NcclOneRank : public GpuTest {
 protected:
  // A communicator of one rank, or null (with a failure recorded).
  std::unique_ptr<NcclCommunicator> MakeComm() {
    absl::StatusOr<std::string> id = NcclCommunicator::GetUniqueId();
    EXPECT_TRUE(id.ok()) << id.status();
    if (!id.ok()) return nullptr;
    EXPECT_EQ(id->size(), static_cast<size_t>(NCCL_UNIQUE_ID_BYTES));
    absl::StatusOr<std::unique_ptr<NcclCommunicator>> comm =
        NcclCommunicator::Create(0, 1, *id, absl::Seconds(30));
    EXPECT_TRUE(comm.ok()) << comm.status();
    return comm.ok() ? *std::move(comm) : nullptr;
  }
};

TEST_F(NcclOneRank, InitAndHealth) {
  std::unique_ptr<NcclCommunicator> comm = MakeComm();
  ASSERT_NE(comm, nullptr);
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->world_size(), 1);
  EXPECT_TRUE(comm->CheckHealth().ok()) << comm->CheckHealth();
}

TEST_F(NcclOneRank, RefusesABadId) {
  absl::StatusOr<std::unique_ptr<NcclCommunicator>> comm =
      NcclCommunicator::Create(0, 1, "too short", absl::Seconds(5));
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kInvalidArgument) << comm.status();
}

// Send to self and receive from self in one batch, in stream order: written before, overwritten
// right after; two transfers of different sizes pair in order; a zero-byte one is skipped.
TEST_F(NcclOneRank, SelfSendReceiveInStreamOrder) {
  std::unique_ptr<NcclCommunicator> comm = MakeComm();
  ASSERT_NE(comm, nullptr);
  constexpr size_t kA = 4096, kB = 3 * 4096 + 5;
  DeviceBuffer a(kA), b(kB), x(kA), y(kB), seen(kA);
  a.Fill(0xaa);
  b.Fill(0xaa);
  x.Fill(0);
  y.Fill(0);
  Stream s;
  ASSERT_CUDA_OK(cudaMemsetAsync(a.get(), 0x5a, kA, s.get()));
  ASSERT_CUDA_OK(cudaMemsetAsync(b.get(), 0x6b, kB, s.get()));
  const SendOp sends[] = {{0, a.get(), kA}, {0, nullptr, 0}, {0, b.get(), kB}};
  const RecvOp recvs[] = {{0, x.get(), kA}, {0, nullptr, 0}, {0, y.get(), kB}};
  ASSERT_OK(comm->Enqueue(sends, recvs, s.get()));
  ASSERT_CUDA_OK(cudaMemsetAsync(a.get(), 0xee, kA, s.get()));
  ASSERT_CUDA_OK(cudaMemcpyAsync(seen.get(), x.get(), kA, cudaMemcpyDeviceToDevice, s.get()));
  ASSERT_OK(comm->WaitStream(s.get(), absl::Seconds(30)));
  EXPECT_EQ(FirstByteNot(x.Bytes(), 0x5a), -1);
  EXPECT_EQ(FirstByteNot(y.Bytes(), 0x6b), -1);
  EXPECT_EQ(FirstByteNot(seen.Bytes(), 0x5a), -1);
  EXPECT_TRUE(comm->CheckHealth().ok());
}

TEST_F(NcclOneRank, AbortFailsLaterCalls) {
  std::unique_ptr<NcclCommunicator> comm = MakeComm();
  ASSERT_NE(comm, nullptr);
  comm->Abort(absl::UnavailableError("planted abort"));
  EXPECT_EQ(comm->CheckHealth().code(), absl::StatusCode::kUnavailable);
  DeviceBuffer a(64);
  Stream s;
  const SendOp sends[] = {{0, a.get(), 64}};
  const RecvOp recvs[] = {{0, a.get(), 64}};
  EXPECT_EQ(comm->Enqueue(sends, recvs, s.get()).code(), absl::StatusCode::kUnavailable);
}

// The ring through NCCL with one rank is the single call, bit for bit.
TEST_F(NcclOneRank, RingEqualsTheSingleCall) {
  std::unique_ptr<NcclCommunicator> comm = MakeComm();
  ASSERT_NE(comm, nullptr);
  Problem pr;
  pr.options.causal = true;
  AddAlibi(&pr);
  const Tensors single = RunSingle(pr, kFast);
  Tensors t = MakeInputs(pr);
  absl::StatusOr<ShardPlan> plan = PlanShards(pr.seqlen, 1, Layout::kZigzag);
  ASSERT_TRUE(plan.ok());
  DeviceShards shards(pr, t, *plan);
  absl::StatusOr<std::unique_ptr<AttentionBackend>> backend = MakeBackend(kFast);
  ASSERT_TRUE(backend.ok());
  DeviceRingWorkspace ws;
  absl::StatusOr<RingTimings> timings =
      RingFlashAttnForwardDevice(*comm, **backend, *plan, shards.views[0], pr.options, &ws);
  ASSERT_TRUE(timings.ok()) << timings.status();
  CheckTimings({*timings}, 1);
  EXPECT_EQ(timings->steps[0].kernel_calls, 1);
  shards.out[0].Download(t.out.data());
  shards.lse[0].Download(t.lse.data());
  EXPECT_TRUE(BitIdentical("NCCL ring(1)", pr, t, single));
  EXPECT_TRUE(comm->CheckHealth().ok());
}

#endif  // RINGATTN_HAVE_NCCL

}  // namespace
}  // namespace ringattn
