// The contract of attention_backend.h, checked for every backend registered in this program
// (RegisteredBackends(): the cpu ones, and those of each GPU library the build links). A new
// backend inherits these cases by registering; its own test keeps what is special to it.
//
// Per backend, against the fp64 references (ReferenceForward, ReferenceBackward) fed the same
// dtype-rounded inputs, outputs poisoned with NaN first so that an element left unwritten fails:
//   - Forward at awkward sizes (seq 1, 7, 255, unequal lengths both ways), 5 heads and GQA 8:2,
//     head_dim 64 (and 128 once), causal on and off, bf16 and fp16 and (where claimed) fp32;
//     merge_into_output (two key halves against one call);
//   - Backward, where capabilities().backward, on the same sweep, the reference forward's O
//     (rounded to the input dtype) and LSE given; ComputeDelta against rowsum(dO * O), and
//     accumulate with that D given (twice is twice the gradient);
//   - non-finite inputs (NaN, infinities, scores beyond fp32) propagate as the reference says;
//   - every capability claimed computed (two runs of positions, a partial input, packed
//     sequences, dropout) and every one not claimed refused with InvalidArgument, forward and
//     backward; a backend without a backward answers UNIMPLEMENTED naming itself;
//   - host backends stop at the ExecutionContext's cancel flag (CANCELLED);
//   - device backends run on the ExecutionContext's stream alone: held behind a host callback
//     on that stream, the call has not run until it is released.
// Device backends get device copies of the tensors and are skipped without a CUDA device.
//
// Tolerances are the loosest of the backends' documented ones, so that the suite fails on
// wrong results rather than on a kernel's rounding: relative L2 of o <= 1e-2 with bf16 inputs,
// 2e-3 fp16, 1e-4 fp32, |lse - want| <= 1e-3 + 1e-5 |want|; per gradient tensor
// RelL2Bound (backward_test_util.h): 2e-2 bf16, 5e-3 fp16, 1e-4 fp32. fp32 inputs that a
// backend rounds to 16 bits (BackendCapabilities::fp32_*_operands) get that type's bounds.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "kernels/attention_backend.h"
#include "kernels/attention_backward_params.h"
#include "kernels/backend_registry.h"
#include "kernels/cpu/backward_test_util.h"
#include "kernels/cpu/reference_attention.h"
#include "kernels/cpu/test_util.h"
#include "kernels/params_check.h"
#include "ringattn_config.h"

#if RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/cuda/gpu_test_util.h"
#endif

namespace ringattn {
namespace {

using kernel_testing::ApplyNonFinite;
using kernel_testing::AttentionBuffers;
using kernel_testing::Causal;
using kernel_testing::CompareWithTolerance;
using kernel_testing::Dropout;
using kernel_testing::GradClose;
using kernel_testing::HostCall;
using kernel_testing::KeyRange;
using kernel_testing::MakeAttentionBuffers;
using kernel_testing::MakeHostCallOf;
using kernel_testing::NonFiniteCase;
using kernel_testing::NonFiniteCases;
using kernel_testing::Packed;
using kernel_testing::RelL2Bound;
using kernel_testing::Runs;
using kernel_testing::Shape;
using kernel_testing::ToleranceReport;
using kernel_testing::TwoKeyCall;
using kernel_testing::TypedBuffer;

bool GpuAvailable() {
#if RINGATTN_HAVE_CUDA
  return kernel_testing::GpuAvailable();
#else
  return false;
#endif
}

// ---- Tensors in the backend's memory space --------------------------------------------------

// Copies of host tensors in a memory space, and the way back. On the host they are the host
// tensors themselves.
class Space {
 public:
  explicit Space(MemorySpace space) : space_(space) {}
  Space(const Space&) = delete;
  Space& operator=(const Space&) = delete;
  ~Space() {
#if RINGATTN_HAVE_CUDA
    for (void* d : device_) (void)cudaFree(d);
#endif
  }

  bool device() const { return space_ == MemorySpace::kDevice; }

  // `bytes` at `host` in this space (null stays null). Outputs too: their NaN poison goes along.
  template <typename T>
  T* Put(T* host, size_t bytes) {
    if (host == nullptr || !device()) return host;
#if RINGATTN_HAVE_CUDA
    void* d = nullptr;
    Check(cudaMalloc(&d, std::max<size_t>(bytes, 1)), "cudaMalloc");
    device_.push_back(d);
    Check(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice), "upload");
    // A pageable upload may return before it lands; a kernel on another stream must not
    // overtake it.
    Check(cudaDeviceSynchronize(), "upload");
    return static_cast<T*>(d);
#else
    ADD_FAILURE() << "a device backend in a build without CUDA";
    return nullptr;
#endif
  }
  // `bytes` at `at` (from Put) back into `host`, after the device finished.
  void Get(const void* at, void* host, size_t bytes) {
    if (at == nullptr || !device()) return;
#if RINGATTN_HAVE_CUDA
    Check(cudaDeviceSynchronize(), "the backend's work");
    Check(cudaMemcpy(host, at, bytes, cudaMemcpyDeviceToHost), "download");
#endif
  }

 private:
#if RINGATTN_HAVE_CUDA
  static void Check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) ADD_FAILURE() << what << ": " << cudaGetErrorString(e);
  }
  std::vector<void*> device_;
#endif
  MemorySpace space_;
};

using kernel_testing::Bytes;
template <typename T>
size_t Bytes(const std::vector<T>& v) {
  return v.size() * sizeof(T);
}

// `host` (over t's tensors) with its tensors in `space`; o and lse keep their poison.
AttentionParams InSpace(const AttentionParams& host, AttentionBuffers& t, Space& space) {
  AttentionParams p = host;
  p.q = space.Put(t.q.data(), Bytes(t.q));
  p.k = space.Put(t.k.data(), Bytes(t.k));
  p.v = space.Put(t.v.data(), Bytes(t.v));
  p.o = space.Put(t.o.data(), Bytes(t.o));
  p.lse = host.lse == nullptr ? nullptr : space.Put(t.lse.data(), Bytes(t.lse));
  p.alibi_slopes =
      host.alibi_slopes == nullptr ? nullptr : space.Put(t.alibi.data(), Bytes(t.alibi));
  return p;
}

// o and lse of `p` (from InSpace) back into t.
void Fetch(Space& space, const AttentionParams& p, AttentionBuffers* t) {
  space.Get(p.o, t->o.data(), Bytes(t->o));
  space.Get(p.lse, t->lse.data(), Bytes(t->lse));
}

// One backward call in a space: the host call's inputs, fp32 gradients poisoned with NaN (or 0
// to accumulate into).
struct BackwardCall {
  std::vector<float> dq, dk, dv;  // host copies of the gradients
  AttentionBackwardParams p;      // over the space's tensors

  BackwardCall(HostCall& hc, Space& space, bool accumulate) {
    const float fill = accumulate ? 0.0f : std::numeric_limits<float>::quiet_NaN();
    dq.assign(hc.ref.dq.size(), fill);
    dk.assign(hc.ref.dk.size(), fill);
    dv.assign(hc.ref.dv.size(), fill);
    p.fwd = InSpace(hc.fwd, hc.t, space);
    p.out = p.fwd.o;  // hc.t.o holds the reference forward's O
    p.fwd.o = nullptr;
    p.fwd.lse = nullptr;
    p.dout = space.Put(hc.dout.data(), Bytes(hc.dout));
    p.out_dtype = hc.fwd.dtype;
    p.lse = space.Put(hc.lse.data(), Bytes(hc.lse));
    p.dq = space.Put(dq.data(), Bytes(dq));
    p.dk = space.Put(dk.data(), Bytes(dk));
    p.dv = space.Put(dv.data(), Bytes(dv));
    p.accumulate = accumulate;
    SetContiguousBackwardStrides(&p);
  }
  void Fetch(Space& space) {
    space.Get(p.dq, dq.data(), Bytes(dq));
    space.Get(p.dk, dk.data(), Bytes(dk));
    space.Get(p.dv, dv.data(), Bytes(dv));
  }
};

// ---- Checking -------------------------------------------------------------------------------

double ORelL2Bound(DType t) { return t == DType::kBF16 ? 1e-2 : t == DType::kF16 ? 2e-3 : 1e-4; }

std::string Describe(const AttentionParams& p) {
  std::string s = absl::StrCat(std::string(DTypeName(p.dtype)), " sq", p.seqlen_q, " sk",
                               p.seqlen_k, " h", p.heads, ":", p.heads_k, " d", p.head_dim);
  if (p.causal) s += " causal";
  if (p.q_pos_split != kNoPosSplit || p.k_pos_split != kNoPosSplit) s += " runs";
  if (p.seq_bounds != nullptr) s += " packed";
  if (p.dropout_p > 0) s += " dropout";
  return s;
}

// t's o and lse (written by a call of `p`) against the fp64 reference of `p`.
// The dtype whose tolerance applies to `t` inputs on a backend with `caps`: fp32 inputs rounded
// to 16 bits are held to that type's.
DType OperandsOf(DType t, DType fp32_operands) { return t == DType::kF32 ? fp32_operands : t; }

void ExpectMatchesReference(const AttentionParams& p, const AttentionBuffers& t,
                            const BackendCapabilities& caps) {
  absl::StatusOr<ReferenceResult> ref = ReferenceForward(p);
  ASSERT_TRUE(ref.ok()) << ref.status();
  const ErrorStats o = CompareTensor(t.o.data(), t.o.type(), ref->o.data(), t.o.size());
  EXPECT_TRUE(o.Within(ORelL2Bound(OperandsOf(p.dtype, caps.fp32_forward_operands)), 1e30))
      << "o: " << o.ToString();
  const ToleranceReport lse = CompareWithTolerance(
      static_cast<int64_t>(t.lse.size()), [&](int64_t i) { return t.lse[i]; }, ref->lse, 1e-3,
      1e-5);
  EXPECT_TRUE(lse.Clean()) << "lse: " << lse.ToString();
}

void ExpectGradsMatch(const HostCall& hc, const BackwardCall& call, double scale,
                      const BackendCapabilities& caps) {
  const AttentionParams& f = hc.fwd;
  const double bound = RelL2Bound(OperandsOf(f.dtype, caps.fp32_backward_operands));
  EXPECT_TRUE(GradClose("dq", call.dq, hc.ref.dq, scale, f.seqlen_q, f.heads, f.head_dim, bound));
  EXPECT_TRUE(GradClose("dk", call.dk, hc.ref.dk, scale, f.seqlen_k, f.heads_k, f.head_dim, bound));
  EXPECT_TRUE(GradClose("dv", call.dv, hc.ref.dv, scale, f.seqlen_k, f.heads_k, f.head_dim, bound));
}

// ---- Cases ----------------------------------------------------------------------------------

// The sweep: sizes x causal x the dtypes `caps` takes; head_dim 128 on one size unless
// `d64_only` (the backward's, whose fp64 reference is the slow part).
std::vector<AttentionParams> SweepCases(const BackendCapabilities& caps, bool d64_only) {
  struct Size {
    int64_t sq, sk;
    int heads, heads_k, head_dim;
  };
  const Size sizes[] = {{1, 1, 5, 5, 64},     {7, 7, 5, 5, 64},     {255, 255, 5, 5, 64},
                        {7, 7, 8, 2, 64},     {100, 255, 8, 2, 64}, {255, 100, 8, 2, 64},
                        {255, 255, 8, 2, 128}};
  std::vector<DType> dtypes = {DType::kBF16, DType::kF16};
  if (caps.fp32_inputs) dtypes.push_back(DType::kF32);
  std::vector<AttentionParams> cases;
  for (const Size& s : sizes) {
    if (d64_only && s.head_dim != 64) continue;
    for (const bool causal : {false, true}) {
      for (const DType t : dtypes) {
        AttentionParams p = Shape(s.sq, s.sk, s.heads, s.heads_k, s.head_dim, t, t);
        p.causal = causal;
        cases.push_back(p);
      }
    }
  }
  return cases;
}

// One plain bf16 call that each option below is added to.
AttentionParams Plain() { return Causal(Shape(64, 64, 4, 2, 64)); }

// A capability, and the same plain call using it (forward; the backward where `backward`).
struct Option {
  std::string name;
  bool BackendCapabilities::*claim;
  AttentionParams p;
  bool backward;  // the option exists for the backward
};
std::vector<Option> Options() {
  return {
      {"position_runs", &BackendCapabilities::position_runs, Runs(Plain(), 32, 100, 32, 100), true},
      {"packed_sequences", &BackendCapabilities::packed_sequences, Packed(Plain(), {0, 20, 20, 64}),
       true},
      {"dropout", &BackendCapabilities::dropout, Dropout(Plain(), 0.2f, 7), true},
      {"fp32_inputs", &BackendCapabilities::fp32_inputs,
       Shape(64, 64, 4, 2, 64, DType::kF32, DType::kF32), true},
      // partial_input: the call below, with partial_o / partial_lse set (forward only).
      {"partial_input", &BackendCapabilities::partial_input, Plain(), false},
  };
}

// ---- The suite ------------------------------------------------------------------------------

class BackendConformance : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<AttentionBackend>> b = MakeBackend(GetParam());
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = *std::move(b);
    if (backend_->memory_space() == MemorySpace::kDevice && !GpuAvailable()) {
      GTEST_SKIP() << GetParam() << " computes in device memory and there is no CUDA device";
    }
    space_ = std::make_unique<Space>(backend_->memory_space());
    caps_ = backend_->capabilities();
  }

  // Runs `host` (over t) in the backend's space and fetches o and lse into t.
  absl::Status RunForward(const AttentionParams& host, AttentionBuffers* t) {
    const AttentionParams p = InSpace(host, *t, *space_);
    absl::Status s = backend_->Forward(p, ExecutionContext{});
    Fetch(*space_, p, t);
    return s;
  }

  // `host`, with inputs from `seed` and outputs poisoned, against the reference.
  void ExpectForwardMatches(AttentionParams host, uint32_t seed) {
    SCOPED_TRACE(Describe(host));
    AttentionBuffers t = MakeAttentionBuffers(&host, seed);
    const absl::Status s = RunForward(host, &t);
    ASSERT_TRUE(s.ok()) << s;
    ExpectMatchesReference(host, t, caps_);
  }

  // Case c (inputs from `seed`, then its poisons) against the reference; skipped when the backend
  // refuses its options on clean inputs (what it takes clean it must take poisoned).
  void ExpectNonFiniteCaseMatches(const NonFiniteCase& c, uint32_t seed) {
    AttentionParams host = c.p;
    AttentionBuffers t = MakeAttentionBuffers(&host, seed);
    if (!RunForward(host, &t).ok()) return;  // options this backend does not take
    ApplyNonFinite(c, &t);
    const absl::Status s = RunForward(host, &t);
    EXPECT_TRUE(s.ok()) << s;
    if (s.ok()) ExpectMatchesReference(host, t, caps_);
  }

  // The backward of `fwd` (sizes and options) against the reference backward.
  void ExpectBackwardMatches(const AttentionParams& fwd) {
    SCOPED_TRACE(Describe(fwd));
    HostCall hc;
    ASSERT_NO_FATAL_FAILURE(MakeHostCallOf(fwd, /*alibi=*/false, &hc));
    BackwardCall call(hc, *space_, /*accumulate=*/false);
    const absl::Status s = backend_->Backward(call.p, ExecutionContext{});
    ASSERT_TRUE(s.ok()) << s;
    call.Fetch(*space_);
    ExpectGradsMatch(hc, call, 1.0, caps_);
  }

  std::unique_ptr<AttentionBackend> backend_;
  std::unique_ptr<Space> space_;
  BackendCapabilities caps_;
};

TEST_P(BackendConformance, ForwardMatchesTheFp64Reference) {
  uint32_t seed = 1;
  for (const AttentionParams& p : SweepCases(caps_, /*d64_only=*/false)) {
    ExpectForwardMatches(p, seed++);
  }
}

// Two calls over the two halves of the keys, the second merging into the first's fp32 o and
// lse, give the call over all keys.
TEST_P(BackendConformance, ForwardMergesIntoOutput) {
  for (const bool causal : {false, true}) {
    AttentionParams whole = Shape(200, 256, 8, 2, 64, DType::kBF16, DType::kF32);
    whole.causal = causal;
    SCOPED_TRACE(Describe(whole));
    AttentionBuffers t = MakeAttentionBuffers(&whole, 11);
    const AttentionParams p = InSpace(whole, t, *space_);
    AttentionParams first = KeyRange(p, 0, 100);
    AttentionParams second = KeyRange(p, 100, 256);
    second.merge_into_output = true;
    ASSERT_TRUE(backend_->Forward(first, ExecutionContext{}).ok());
    const absl::Status s = backend_->Forward(second, ExecutionContext{});
    ASSERT_TRUE(s.ok()) << s;
    Fetch(*space_, p, &t);
    ExpectMatchesReference(whole, t, caps_);
  }
}

TEST_P(BackendConformance, ClaimedOptionsAreComputed) {
  uint32_t seed = 20;
  for (const Option& o : Options()) {
    if (!(caps_.*o.claim)) continue;
    SCOPED_TRACE(o.name);
    if (o.claim != &BackendCapabilities::partial_input) {
      ExpectForwardMatches(o.p, seed++);
      continue;
    }
    // A partial over the first 30 keys (fp32 o and its lse, buffers of their own), then the
    // call over the rest merging with it before writing o: the call over all keys.
    AttentionParams whole = o.p;
    AttentionBuffers t = MakeAttentionBuffers(&whole, seed++);
    const AttentionParams p = InSpace(whole, t, *space_);
    std::vector<float> partial_o(t.o.size(), std::numeric_limits<float>::quiet_NaN());
    std::vector<float> partial_lse(t.lse.size(), std::numeric_limits<float>::quiet_NaN());
    AttentionParams first = KeyRange(p, 0, 30);
    first.o = space_->Put(partial_o.data(), Bytes(partial_o));
    first.o_dtype = DType::kF32;
    first.lse = space_->Put(partial_lse.data(), Bytes(partial_lse));
    ASSERT_TRUE(backend_->Forward(first, ExecutionContext{}).ok());
    AttentionParams rest = KeyRange(p, 30, 64);
    rest.partial_o = static_cast<const float*>(first.o);
    rest.partial_lse = first.lse;
    const absl::Status s = backend_->Forward(rest, ExecutionContext{});
    ASSERT_TRUE(s.ok()) << s;
    Fetch(*space_, p, &t);
    ExpectMatchesReference(whole, t, caps_);
  }
}

TEST_P(BackendConformance, OptionsNotClaimedAreRefused) {
  for (const Option& o : Options()) {
    if (caps_.*o.claim) continue;
    SCOPED_TRACE(o.name);
    AttentionParams host = o.p;
    AttentionBuffers t = MakeAttentionBuffers(&host, 30);
    AttentionParams p = InSpace(host, t, *space_);
    std::vector<float> partial_o(t.o.size(), 0.0f), partial_lse(t.lse.size(), 0.0f);
    if (o.claim == &BackendCapabilities::partial_input) {
      p.partial_o = space_->Put(partial_o.data(), Bytes(partial_o));
      p.partial_lse = space_->Put(partial_lse.data(), Bytes(partial_lse));
    }
    const absl::Status s = backend_->Forward(p, ExecutionContext{});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    if (!caps_.backward || !o.backward) continue;
    HostCall hc;
    ASSERT_NO_FATAL_FAILURE(MakeHostCallOf(o.p, /*alibi=*/false, &hc));
    BackwardCall call(hc, *space_, /*accumulate=*/false);
    const absl::Status b = backend_->Backward(call.p, ExecutionContext{});
    EXPECT_EQ(b.code(), absl::StatusCode::kInvalidArgument) << "backward: " << b;
  }
}

// Non-finite inputs and scores beyond fp32 (kernel_testing::NonFiniteCases, the rules of
// reference_attention.h): NaN exactly where the fp64 reference has it (a NaN on one side only
// fails the comparison), infinities equal, everything else within the usual tolerance. A case
// whose options the backend refuses on clean inputs (cudnn: softcap) is skipped; what it takes
// clean it must take poisoned.
TEST_P(BackendConformance, NonFiniteInputsFollowTheReference) {
  if (!caps_.non_finite_rule) {
    GTEST_SKIP() << backend_->name() << " does not follow the non-finite rule yet (issue #14)";
  }
  std::vector<DType> dtypes = {DType::kBF16, DType::kF16};
  if (caps_.fp32_inputs) dtypes.push_back(DType::kF32);
  uint32_t seed = 50;
  for (const DType dtype : dtypes) {
    for (const NonFiniteCase& c : NonFiniteCases(dtype)) {
      SCOPED_TRACE(absl::StrCat(c.name, " ", std::string(DTypeName(dtype))));
      ExpectNonFiniteCaseMatches(c, seed++);
    }
  }
}

// The tile effects of the fast GPU kernels at awkward sizes (seq 1, 7, 3816; 5 heads against
// 5 or 1 K/V heads): a NaN of v at a key that earlier rows of its tile do not see (causal),
// an infinity in k without score mods (a q.k of -inf is no masked key), and both where a
// 3816-row call's queries meet keys at 3700..3899 (rows 3700.. see keys up to themselves).
TEST_P(BackendConformance, NonFiniteInputsAtAwkwardSizes) {
  if (!caps_.non_finite_rule) {
    GTEST_SKIP() << backend_->name() << " does not follow the non-finite rule yet (issue #14)";
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  AttentionParams late_keys = Causal(Shape(3816, 200, 5, 1, 64));
  late_keys.k_pos_offset = 3700;
  const std::vector<NonFiniteCase> cases = {
      {"Seq1NanInV", Shape(1, 1, 5, 5, 64), {{'v', 0, 2, 7, nan}}},
      {"Seq7CausalNanInVOfALaterKey", Causal(Shape(7, 7, 5, 5, 64)), {{'v', 4, 0, 3, nan}}},
      {"Seq7CausalInfInK", Causal(Shape(7, 7, 5, 5, 64)), {{'k', 3, 1, 0, inf}}},
      {"Seq3816MqaNanInVInTheDiagonalTile", late_keys, {{'v', 50, 0, 9, nan}}},
      {"Seq3816MqaNegInfInK", late_keys, {{'k', 20, 0, 5, -inf}}},
  };
  uint32_t seed = 90;
  for (const DType dtype : {DType::kBF16, DType::kF16}) {
    for (NonFiniteCase c : cases) {
      SCOPED_TRACE(absl::StrCat(c.name, " ", std::string(DTypeName(dtype))));
      c.p.dtype = c.p.o_dtype = dtype;
      ExpectNonFiniteCaseMatches(c, seed++);
    }
  }
}

// The same cases (bf16) as two calls over the key halves, the second merging into the first's
// fp32 o and lse (a ring's accumulation); and a first half whose weight underflows next to the
// second's (its score 200 below) holding a NaN of v: a negligible partial is read (0 * NaN is
// NaN), only an empty one (LSE -inf) is not.
TEST_P(BackendConformance, NonFiniteInputsSurviveMerges) {
  if (!caps_.non_finite_rule) {
    GTEST_SKIP() << backend_->name() << " does not follow the non-finite rule yet (issue #14)";
  }
  uint32_t seed = 70;
  for (const NonFiniteCase& c : NonFiniteCases(DType::kBF16)) {
    SCOPED_TRACE(c.name);
    AttentionParams whole = c.p;
    whole.o_dtype = DType::kF32;
    AttentionBuffers t = MakeAttentionBuffers(&whole, seed++);
    ApplyNonFinite(c, &t);
    const AttentionParams p = InSpace(whole, t, *space_);
    AttentionParams second = KeyRange(p, 45, whole.seqlen_k);
    second.merge_into_output = true;
    if (!backend_->Forward(KeyRange(p, 0, 45), ExecutionContext{}).ok()) continue;  // refused
    const absl::Status s = backend_->Forward(second, ExecutionContext{});
    if (s.code() == absl::StatusCode::kInvalidArgument) continue;  // options refused
    EXPECT_TRUE(s.ok()) << s;
    Fetch(*space_, p, &t);
    ExpectMatchesReference(whole, t, caps_);
  }
  SCOPED_TRACE("a negligible first half");
  AttentionParams whole;  // scores -100 and 100; NaN in key 0's v
  AttentionBuffers t = TwoKeyCall(&whole, DType::kBF16, 100.0f, -1.0f, 1.0f, 0,
                                  std::numeric_limits<float>::quiet_NaN());
  const AttentionParams p = InSpace(whole, t, *space_);
  AttentionParams second = KeyRange(p, 1, 2);
  second.merge_into_output = true;
  ASSERT_TRUE(backend_->Forward(KeyRange(p, 0, 1), ExecutionContext{}).ok());
  ASSERT_TRUE(backend_->Forward(second, ExecutionContext{}).ok());
  Fetch(*space_, p, &t);
  EXPECT_TRUE(std::isnan(t.o.Get(3))) << t.o.Get(3);
  ExpectMatchesReference(whole, t, caps_);
  if (!caps_.partial_input) return;

  // The same negligible first half as a read-only partial, merged before o is written.
  SCOPED_TRACE("a negligible partial input");
  std::vector<float> partial_o(t.o.size(), std::numeric_limits<float>::quiet_NaN());
  std::vector<float> partial_lse(t.lse.size(), std::numeric_limits<float>::quiet_NaN());
  std::vector<float> out_o(t.o.size(), std::numeric_limits<float>::quiet_NaN());
  AttentionParams first = KeyRange(p, 0, 1);
  first.o = space_->Put(partial_o.data(), Bytes(partial_o));
  first.lse = space_->Put(partial_lse.data(), Bytes(partial_lse));
  AttentionParams rest = KeyRange(p, 1, 2);
  rest.partial_o = static_cast<const float*>(first.o);
  rest.partial_lse = first.lse;
  rest.o = space_->Put(out_o.data(), Bytes(out_o));
  rest.lse = nullptr;
  ASSERT_TRUE(backend_->Forward(first, ExecutionContext{}).ok());
  ASSERT_TRUE(backend_->Forward(rest, ExecutionContext{}).ok());
  space_->Get(rest.o, out_o.data(), Bytes(out_o));
  EXPECT_TRUE(std::isnan(out_o[3])) << out_o[3];
  EXPECT_FALSE(std::isnan(out_o[4])) << out_o[4];
}

// Host backends stop at ExecutionContext::cancel: a call made with it set returns CANCELLED
// (forward, backward, ComputeDelta), one made with it clear computes as without it.
TEST_P(BackendConformance, HostBackendsStopAtTheCancelFlag) {
  if (space_->device()) GTEST_SKIP() << GetParam() << " enqueues its work: nothing to stop";
  std::atomic<bool> cancel{true};
  const ExecutionContext cancelled{.cancel = &cancel};
  AttentionParams host = Plain();
  AttentionBuffers t = MakeAttentionBuffers(&host, 60);
  EXPECT_EQ(backend_->Forward(host, cancelled).code(), absl::StatusCode::kCancelled);
  cancel.store(false);
  ASSERT_TRUE(backend_->Forward(host, cancelled).ok());
  ExpectMatchesReference(host, t, caps_);
  if (!caps_.backward) return;
  cancel.store(true);
  HostCall hc;
  ASSERT_NO_FATAL_FAILURE(MakeHostCallOf(Plain(), /*alibi=*/false, &hc));
  BackwardCall call(hc, *space_, /*accumulate=*/false);
  EXPECT_EQ(backend_->Backward(call.p, cancelled).code(), absl::StatusCode::kCancelled);
  std::vector<float> delta(hc.lse.size());
  EXPECT_EQ(backend_->ComputeDelta(call.p, delta.data(), cancelled).code(),
            absl::StatusCode::kCancelled);
}

TEST_P(BackendConformance, WithoutABackwardBackwardIsUnimplemented) {
  if (caps_.backward) GTEST_SKIP() << GetParam() << " has a backward";
  HostCall hc;
  ASSERT_NO_FATAL_FAILURE(MakeHostCallOf(Plain(), /*alibi=*/false, &hc));
  BackwardCall call(hc, *space_, /*accumulate=*/false);
  const absl::Status b = backend_->Backward(call.p, ExecutionContext{});
  EXPECT_EQ(b.code(), absl::StatusCode::kUnimplemented) << b;
  EXPECT_NE(b.message().find(GetParam()), std::string::npos) << b;
  std::vector<float> delta(hc.lse.size());
  const absl::Status d =
      backend_->ComputeDelta(call.p, space_->Put(delta.data(), Bytes(delta)), ExecutionContext{});
  EXPECT_EQ(d.code(), absl::StatusCode::kUnimplemented) << d;
}

TEST_P(BackendConformance, BackwardMatchesTheFp64Reference) {
  if (!caps_.backward) GTEST_SKIP() << GetParam() << " has no backward";
  for (const AttentionParams& p : SweepCases(caps_, /*d64_only=*/true)) ExpectBackwardMatches(p);
}

TEST_P(BackendConformance, BackwardClaimedOptionsAreComputed) {
  if (!caps_.backward) GTEST_SKIP() << GetParam() << " has no backward";
  for (const Option& o : Options()) {
    if (!(caps_.*o.claim) || !o.backward) continue;
    SCOPED_TRACE(o.name);
    ExpectBackwardMatches(o.p);
  }
}

// D from ComputeDelta is rowsum(dO * O); given as p.delta, two accumulating calls give twice
// the gradients (a ring computes D once per shard and adds each step's contribution).
TEST_P(BackendConformance, ComputeDeltaThenAccumulate) {
  if (!caps_.backward) GTEST_SKIP() << GetParam() << " has no backward";
  AttentionParams fwd = Shape(255, 255, 5, 5, 64);
  fwd.causal = true;
  HostCall hc;
  ASSERT_NO_FATAL_FAILURE(MakeHostCallOf(fwd, /*alibi=*/false, &hc));
  BackwardCall call(hc, *space_, /*accumulate=*/true);
  std::vector<float> delta(hc.lse.size(), std::numeric_limits<float>::quiet_NaN());
  float* const d = space_->Put(delta.data(), Bytes(delta));
  const absl::Status s = backend_->ComputeDelta(call.p, d, ExecutionContext{});
  ASSERT_TRUE(s.ok()) << s;
  space_->Get(d, delta.data(), Bytes(delta));
  for (int h = 0; h < fwd.heads; ++h) {
    for (int64_t i = 0; i < fwd.seqlen_q; ++i) {
      double want = 0;
      for (int c = 0; c < fwd.head_dim; ++c) {
        const int64_t at = (i * fwd.heads + h) * fwd.head_dim + c;
        want += static_cast<double>(hc.t.o.Get(at)) * hc.dout.Get(at);
      }
      ASSERT_NEAR(delta[h * fwd.seqlen_q + i], want, 1e-4 * (1 + std::abs(want)))
          << "head " << h << " row " << i;
    }
  }
  call.p.delta = d;
  for (int i = 0; i < 2; ++i) {
    const absl::Status b = backend_->Backward(call.p, ExecutionContext{});
    ASSERT_TRUE(b.ok()) << b;
  }
  call.Fetch(*space_);
  ExpectGradsMatch(hc, call, 2.0, caps_);
}

#if RINGATTN_HAVE_CUDA
// Holds a stream in a host callback until released (or 20 s pass, so that a backend that
// waits for the device fails the test instead of hanging it).
class StreamGate {
 public:
  explicit StreamGate(cudaStream_t stream) {
    EXPECT_EQ(cudaLaunchHostFunc(stream, &StreamGate::Wait, this), cudaSuccess);
  }
  void Open() { open_.store(true); }

 private:
  static void Wait(void* self) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!static_cast<StreamGate*>(self)->open_.load() &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  std::atomic<bool> open_{false};
};

// Whether the first element of device `o` (of type t) is still NaN, read on a stream of its
// own (the legacy default stream would wait for the call).
bool StillPoisoned(const void* o, DType t) {
  cudaStream_t peek = nullptr;
  EXPECT_EQ(cudaStreamCreateWithFlags(&peek, cudaStreamNonBlocking), cudaSuccess);
  float room = 0;  // holds any element type
  EXPECT_EQ(cudaMemcpyAsync(&room, o, DTypeSize(t), cudaMemcpyDeviceToHost, peek), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(peek), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(peek), cudaSuccess);
  return std::isnan(LoadAsFloat(&room, 0, t));
}
#endif

// A device backend's call runs on the context's stream: enqueued behind a closed gate on that
// stream, it has not written its output until the gate opens. (The same call runs once first,
// so that nothing it sets up on first use waits for the device while the gate is closed.)
TEST_P(BackendConformance, DeviceCallsRunOnTheContextStream) {
  if (!space_->device()) GTEST_SKIP() << GetParam() << " is a host backend (no streams)";
#if RINGATTN_HAVE_CUDA
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const ExecutionContext ctx{stream};
  AttentionParams host = Shape(128, 128, 4, 2, 64);
  AttentionBuffers t = MakeAttentionBuffers(&host, 40);
  const AttentionParams p = InSpace(host, t, *space_);
  ASSERT_TRUE(backend_->Forward(p, ctx).ok());
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cudaMemset(p.o, 0xff, Bytes(t.o)), cudaSuccess);  // NaN again
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  {
    StreamGate gate(stream);
    const absl::Status s = backend_->Forward(p, ctx);
    EXPECT_TRUE(s.ok()) << s;
    EXPECT_TRUE(StillPoisoned(p.o, host.o_dtype)) << "the call ran outside the context's stream";
    gate.Open();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  }
  Fetch(*space_, p, &t);
  ExpectMatchesReference(host, t, caps_);
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
#endif
}

INSTANTIATE_TEST_SUITE_P(Registered, BackendConformance, ::testing::ValuesIn(RegisteredBackends()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// ---- The registry ---------------------------------------------------------------------------

TEST(BackendRegistry, ListsTheBackendsOfTheLinkedLibraries) {
  std::vector<std::string> want = {"cpu", "cpu_reference"};
#if RINGATTN_HAVE_CUDA
  want.insert(want.end(), {"cuda", "cuda_reference"});
#endif
#if RINGATTN_HAVE_CUDNN
  want.push_back("cudnn");
#endif
  std::sort(want.begin(), want.end());
  EXPECT_EQ(RegisteredBackends(), want);
}

TEST(BackendRegistry, EachIsMadeUnderItsName) {
  for (const std::string& name : RegisteredBackends()) {
    absl::StatusOr<std::unique_ptr<AttentionBackend>> b = MakeBackend(name);
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ((*b)->name(), name);
  }
}

TEST(BackendRegistry, UnknownNameListsTheRegisteredOnes) {
  absl::StatusOr<std::unique_ptr<AttentionBackend>> b = MakeBackend("gpu");
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(b.status().message(), absl::StrCat("unknown attention backend 'gpu'; registered: ",
                                               absl::StrJoin(RegisteredBackends(), ", ")));
}

TEST(BackendRegistry, MemorySpaceRestrictsAndNamesTheBackendsOfThatSpace) {
  absl::StatusOr<std::unique_ptr<AttentionBackend>> host = MakeBackend("cpu", MemorySpace::kHost);
  ASSERT_TRUE(host.ok()) << host.status();
  EXPECT_EQ((*host)->name(), "cpu");
  absl::StatusOr<std::unique_ptr<AttentionBackend>> wrong =
      MakeBackend("cpu_reference", MemorySpace::kDevice);
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.status().message().find("'cpu_reference' computes in host memory"),
            std::string::npos)
      << wrong.status();
  absl::StatusOr<std::unique_ptr<AttentionBackend>> unknown =
      MakeBackend("gpu", MemorySpace::kHost);
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.status().message(),
            "unknown attention backend 'gpu'; registered host backends: cpu, cpu_reference");
}

}  // namespace
}  // namespace ringattn
