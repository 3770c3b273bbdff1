// Shared pieces of the GPU kernel tests (cuda_backend_test, cudnn_backend_test): skipping
// without a device, device buffers, host calls copied to the device and back, and reading
// outputs through a call's strides for comparison.
#ifndef RINGATTN_KERNELS_CUDA_GPU_TEST_UTIL_H_
#define RINGATTN_KERNELS_CUDA_GPU_TEST_UTIL_H_

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention_params.h"
#include "kernels/cpu/test_util.h"
#include "kernels/dtype.h"

namespace ringattn::kernel_testing {

// ---- Device plumbing ------------------------------------------------------------------------

inline bool GpuAvailable() {
  static const bool available = [] {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) (void)cudaGetLastError();  // clear it; nothing else will run
    return e == cudaSuccess && count > 0;
  }();
  return available;
}

#define ASSERT_CUDA_OK(expr)                                                                     \
  do {                                                                                           \
    const cudaError_t ra_test_error_ = (expr);                                                   \
    ASSERT_EQ(ra_test_error_, cudaSuccess) << #expr << ": " << cudaGetErrorName(ra_test_error_)  \
                                           << " (" << cudaGetErrorString(ra_test_error_) << ")"; \
  } while (0)

// Every test fixture derives from this: skips without a device.
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  }
};

// Owns one device allocation. Failures are fatal for the process (a broken allocator leaves
// nothing to test), with the call and the CUDA error printed.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) Check(cudaMalloc(&ptr_, bytes), "cudaMalloc");
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
    if (ptr_ != nullptr) cudaFree(ptr_);
  }

  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  void Upload(const void* host) {
    if (bytes_ > 0) Check(cudaMemcpy(ptr_, host, bytes_, cudaMemcpyHostToDevice), "upload");
  }
  void Download(void* host) const {
    if (bytes_ > 0) Check(cudaMemcpy(host, ptr_, bytes_, cudaMemcpyDeviceToHost), "download");
  }
  // All bytes 0xff: NaN in fp32, fp16 and bf16. Waits for the memset (it is asynchronous, and
  // a kernel on a non-blocking stream would not wait for it).
  void Poison() {
    if (bytes_ == 0) return;
    Check(cudaMemset(ptr_, 0xff, bytes_), "cudaMemset");
    Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize after cudaMemset");
  }

 private:
  static void Check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return;
    std::fprintf(stderr, "fatal: %s failed: %s (%s)\n", what, cudaGetErrorName(e),
                 cudaGetErrorString(e));
    std::abort();
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Device copies of one call's tensors.
struct DeviceTensors {
  DeviceBuffer q, k, v, o, lse, alibi;
};

// Copies the inputs of a host call (pointing into `t`) to the device and returns the same
// params pointing at the copies. o and lse are poisoned, or with `upload_outputs` copied from
// `t` (a partial to merge into). Null host pointers stay null.
inline AttentionParams ToDevice(const AttentionParams& host, const AttentionBuffers& t,
                                DeviceTensors* d, bool upload_outputs = false) {
  d->q = DeviceBuffer(Bytes(t.q));
  d->k = DeviceBuffer(Bytes(t.k));
  d->v = DeviceBuffer(Bytes(t.v));
  d->o = DeviceBuffer(Bytes(t.o));
  d->lse = DeviceBuffer(t.lse.size() * sizeof(float));
  d->alibi = DeviceBuffer(t.alibi.size() * sizeof(float));
  d->q.Upload(t.q.data());
  d->k.Upload(t.k.data());
  d->v.Upload(t.v.data());
  d->alibi.Upload(t.alibi.data());
  if (upload_outputs) {
    d->o.Upload(t.o.data());
    d->lse.Upload(t.lse.data());
  } else {
    d->o.Poison();
    d->lse.Poison();
  }
  // cudaMemcpy from pageable memory may return before its DMA lands; a kernel on a
  // non-blocking stream must not overtake it.
  const cudaError_t synced = cudaDeviceSynchronize();
  if (synced != cudaSuccess) ADD_FAILURE() << "upload: " << cudaGetErrorString(synced);
  AttentionParams p = host;
  p.q = host.q == nullptr ? nullptr : d->q.get();
  p.k = host.k == nullptr ? nullptr : d->k.get();
  p.v = host.v == nullptr ? nullptr : d->v.get();
  p.o = host.o == nullptr ? nullptr : d->o.get();
  p.lse = host.lse == nullptr ? nullptr : static_cast<float*>(d->lse.get());
  p.alibi_slopes = host.alibi_slopes == nullptr ? nullptr : static_cast<float*>(d->alibi.get());
  return p;
}

// Copies the device outputs back into t->o and t->lse.
inline void FromDevice(const DeviceTensors& d, AttentionBuffers* t) {
  d.o.Download(t->o.data());
  d.lse.Download(t->lse.data());
}

// ---- Building cases -------------------------------------------------------------------------

// Strides of `p` with `head_pad` elements between heads and `row_pad` between rows of q/k/v/o
// (and between batches of q/o), and lse [batch, heads, seqlen_q] padded by 3 per head and 5
// per batch.
inline void PadStrides(AttentionParams* p, int64_t head_pad, int64_t row_pad) {
  p->q_head_stride = p->o_head_stride = p->head_dim + head_pad;
  p->q_row_stride = p->o_row_stride = p->heads * p->q_head_stride + row_pad;
  p->q_batch_stride = p->o_batch_stride = p->seqlen_q * p->q_row_stride + row_pad;
  p->k_head_stride = p->v_head_stride = p->head_dim + head_pad;
  p->k_row_stride = p->v_row_stride = p->heads_k * p->k_head_stride + row_pad;
  p->k_batch_stride = p->v_batch_stride = p->seqlen_k * p->k_row_stride;
  p->lse_head_stride = p->seqlen_q + 3;
  p->lse_batch_stride = p->heads * p->lse_head_stride + 5;
}

// Host tensors laid out by p's strides (p.dtype, o in p.o_dtype): q, k, v random normal
// (seeds 21, 22, 23), lse all NaN; points p at them.
inline AttentionBuffers StridedBuffers(AttentionParams* p) {
  AttentionBuffers t;
  t.q = TypedBuffer(p->dtype, p->batch * p->q_batch_stride);
  t.k = TypedBuffer(p->dtype, p->batch * p->k_batch_stride);
  t.v = TypedBuffer(p->dtype, p->batch * p->v_batch_stride);
  t.o = TypedBuffer(p->o_dtype, p->batch * p->o_batch_stride);
  t.lse.assign(p->batch * p->lse_batch_stride, std::numeric_limits<float>::quiet_NaN());
  FillRandomNormal(&t.q, 21);
  FillRandomNormal(&t.k, 22);
  FillRandomNormal(&t.v, 23);
  p->q = t.q.data();
  p->k = t.k.data();
  p->v = t.v.data();
  p->o = t.o.data();
  p->lse = t.lse.data();
  return t;
}

// Every element of t.o and t.lse outside the view of p (laid out by its strides) is still NaN.
// Fatal failures: call it inside ASSERT_NO_FATAL_FAILURE.
inline void ExpectNothingWrittenOutsideTheView(const AttentionParams& p,
                                               const AttentionBuffers& t) {
  std::vector<bool> in_view(t.o.size(), false);
  for (int b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < p.seqlen_q; ++i) {
      for (int h = 0; h < p.heads; ++h) {
        const int64_t row = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
        for (int c = 0; c < p.head_dim; ++c) in_view[row + c] = true;
      }
    }
  }
  std::vector<bool> lse_in_view(t.lse.size(), false);
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.heads; ++h) {
      for (int64_t i = 0; i < p.seqlen_q; ++i) {
        lse_in_view[b * p.lse_batch_stride + h * p.lse_head_stride + i] = true;
      }
    }
  }
  for (int64_t at = 0; at < t.o.size(); ++at) {
    if (!in_view[at]) ASSERT_TRUE(std::isnan(t.o.Get(at))) << "o padding written at " << at;
  }
  for (size_t at = 0; at < t.lse.size(); ++at) {
    if (!lse_in_view[at]) ASSERT_TRUE(std::isnan(t.lse[at])) << "lse padding written at " << at;
  }
}

// ---- Comparing --------------------------------------------------------------------------------

// Where element i of a contiguous tensor lies, for failure messages.
inline std::string OPlace(const AttentionParams& p, int64_t i) {
  const int64_t d = i % p.head_dim;
  const int64_t h = (i / p.head_dim) % p.heads;
  const int64_t row = (i / (p.head_dim * p.heads)) % p.seqlen_q;
  const int64_t b = i / (p.head_dim * p.heads * p.seqlen_q);
  return absl::StrCat("(b=", b, " row=", row, " head=", h, " col=", d, ")");
}
inline std::string LsePlace(const AttentionParams& p, int64_t i) {
  const int64_t row = i % p.seqlen_q;
  const int64_t h = (i / p.seqlen_q) % p.heads;
  const int64_t b = i / (p.seqlen_q * p.heads);
  return absl::StrCat("(b=", b, " head=", h, " row=", row, ")");
}

// o read through p's strides into a contiguous [batch, seqlen_q, heads, head_dim] vector.
inline std::vector<double> GatherO(const AttentionParams& p, const TypedBuffer& o) {
  std::vector<double> out;
  out.reserve(static_cast<size_t>(p.batch * p.seqlen_q * p.heads * p.head_dim));
  for (int b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < p.seqlen_q; ++i) {
      for (int h = 0; h < p.heads; ++h) {
        const int64_t row = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
        for (int c = 0; c < p.head_dim; ++c) out.push_back(o.Get(row + c));
      }
    }
  }
  return out;
}

// lse read through p's strides into a contiguous [batch, heads, seqlen_q] vector.
inline std::vector<double> GatherLse(const AttentionParams& p, const std::vector<float>& lse) {
  std::vector<double> out;
  out.reserve(static_cast<size_t>(p.batch * p.heads * p.seqlen_q));
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.heads; ++h) {
      for (int64_t i = 0; i < p.seqlen_q; ++i) {
        out.push_back(lse[b * p.lse_batch_stride + h * p.lse_head_stride + i]);
      }
    }
  }
  return out;
}

}  // namespace ringattn::kernel_testing

#endif  // RINGATTN_KERNELS_CUDA_GPU_TEST_UTIL_H_
