#include "kernels/cudnn/cudnn_context.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"

namespace ringattn {

CudnnDeviceContext::CudnnDeviceContext(bool dynamic_shapes)
    : graphs_(std::make_unique<SdpaGraphCache>(dynamic_shapes)),
      builder_(std::make_unique<BackgroundGraphBuilder>(
          [this](const SdpaGraphKey& key, absl::StatusOr<OwnedSdpaGraph> built, bool transient) {
            std::lock_guard<std::mutex> lock(mu_);
            graphs_->Insert(key, std::move(built), transient);
          })) {}

CudnnDeviceContext::~CudnnDeviceContext() {
  builder_->Stop();  // before anything its last insert touches goes
  if (done_recorded_) (void)cudaEventSynchronize(done_);
  graphs_.reset();
  builder_.reset();  // its handle, after the graphs it built
  if (workspace_ != nullptr) (void)cudaFree(workspace_);
  if (done_ != nullptr) (void)cudaEventDestroy(done_);
  if (handle_ != nullptr) (void)cudnnDestroy(handle_);
}

absl::Status CudnnDeviceContext::WaitForPrevious(cudaStream_t stream) {
  if (done_recorded_ && stream != last_stream_) {
    RA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, done_, 0));
  }
  return absl::OkStatus();
}

absl::Status CudnnDeviceContext::RecordDone(cudaStream_t stream) {
  if (done_ != nullptr) {
    RA_CUDA_RETURN_IF_ERROR(cudaEventRecord(done_, stream));
    done_recorded_ = true;
    last_stream_ = stream;
  }
  return absl::OkStatus();
}

absl::Status CudnnDeviceContext::EnsureHandle() {
  int count = 0;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (count == 0) return absl::FailedPreconditionError("the cudnn backend needs a CUDA device");
  int device = 0;
  RA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (handle_ != nullptr) {
    if (device != device_) {
      return absl::FailedPreconditionError(
          absl::StrCat("the cudnn backend was first used on CUDA device ", device_,
                       " and this call is on device ", device, "; use one backend per device"));
    }
    return absl::OkStatus();
  }
  int pools = 0;
  RA_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device));
  if (done_ == nullptr) {
    RA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  }
  cudnnHandle_t handle = nullptr;
  RA_RETURN_IF_ERROR(CudnnStatus(cudnnCreate(&handle), "cudnnCreate"));
  handle_ = handle;
  device_ = device;
  async_alloc_ = pools != 0;
  return absl::OkStatus();
}

bool CudnnDeviceContext::RequestBackgroundBuild(const SdpaGraphKey& key) {
  if (!builder_->Request(key)) return false;
  ++own_kernel_calls_;
  return true;
}

absl::Status CudnnDeviceContext::BindHandle(cudaStream_t stream) {
  return CudnnStatus(cudnnSetStream(handle_, stream), "cudnnSetStream");
}

absl::Status CudnnDeviceContext::EnsureWorkspace(int64_t bytes, cudaStream_t stream) {
  if (bytes <= workspace_bytes_) return absl::OkStatus();
  // Grow by at least half again, in 2 MiB steps, so that a slowly growing shape does not
  // reallocate every call.
  const int64_t want = std::max(bytes, workspace_bytes_ + workspace_bytes_ / 2);
  const int64_t grown = (want + (int64_t{2} << 20) - 1) / (int64_t{2} << 20) * (int64_t{2} << 20);
  if (async_alloc_) {
    // Stream-ordered: the free runs after every earlier use (the stream waited for done_ if it
    // changed), and nothing synchronises the device.
    if (workspace_ != nullptr) RA_CUDA_RETURN_IF_ERROR(cudaFreeAsync(workspace_, stream));
    workspace_ = nullptr;
    workspace_bytes_ = 0;
    RA_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&workspace_, static_cast<size_t>(grown), stream));
  } else {
    if (done_recorded_) RA_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done_));
    if (workspace_ != nullptr) RA_CUDA_RETURN_IF_ERROR(cudaFree(workspace_));
    workspace_ = nullptr;
    workspace_bytes_ = 0;
    RA_CUDA_RETURN_IF_ERROR(cudaMalloc(&workspace_, static_cast<size_t>(grown)));
  }
  workspace_bytes_ = grown;
  return absl::OkStatus();
}

SdpaGraphKey PlannedGraphKey(const AttentionParams& p, const CudnnMaskPlan& plan) {
  SdpaGraphKey key;
  key.dtype = p.dtype;
  key.batch = p.batch;
  key.heads = p.heads;
  key.heads_k = p.heads_k;
  key.seqlen_q = plan.q_count;
  key.seqlen_k = plan.k_count;
  key.head_dim = p.head_dim;
  const int64_t q_stride[3] = {p.q_batch_stride, p.q_head_stride, p.q_row_stride};
  const int64_t k_stride[3] = {p.k_batch_stride, p.k_head_stride, p.k_row_stride};
  const int64_t v_stride[3] = {p.v_batch_stride, p.v_head_stride, p.v_row_stride};
  for (int i = 0; i < 3; ++i) {
    key.q_stride[i] = q_stride[i];
    key.k_stride[i] = k_stride[i];
    key.v_stride[i] = v_stride[i];
  }
  key.has_right_bound = plan.has_right_bound;
  key.right_bound = plan.right_bound;
  key.has_left_bound = plan.has_left_bound;
  key.left_bound = plan.left_bound;
  key.padding_mask = plan.padding_mask;
  std::memcpy(&key.scale_bits, &p.softmax_scale, sizeof(key.scale_bits));
  return key;
}

std::vector<SdpaGraphKey> PrewarmKeys(const CudnnPrewarmSpec& spec) {
  constexpr int64_t kSeqlen = 256, kHeads = 8;
  std::vector<SdpaGraphKey> keys;
  for (DType dtype : spec.dtypes) {
    for (int64_t d : spec.head_dims) {
      for (bool causal : {false, true}) {
        for (bool backward : {false, true}) {
          if (backward ? !spec.backward : !spec.forward) continue;
          for (int64_t heads_k : {kHeads, kHeads / 4}) {
            if (!backward && heads_k != kHeads) continue;  // GQA is no class of its own forward
            SdpaGraphKey key;
            key.backward = backward;
            key.dtype = dtype;
            key.batch = 1;
            key.heads = kHeads;
            key.heads_k = heads_k;
            key.seqlen_q = key.seqlen_k = kSeqlen;
            key.head_dim = d;
            // [b, s, h, d]: {batch, head, row} strides.
            const int64_t q_stride[3] = {kSeqlen * kHeads * d, d, kHeads * d};
            const int64_t kv_stride[3] = {kSeqlen * heads_k * d, d, heads_k * d};
            for (int i = 0; i < 3; ++i) {
              key.q_stride[i] = key.o_stride[i] = q_stride[i];
              key.do_stride[i] = backward ? q_stride[i] : 0;
              key.k_stride[i] = key.v_stride[i] = kv_stride[i];
            }
            key.has_right_bound = causal;  // a causal self-attention call: the band j <= i
            const float scale = 1.0f / std::sqrt(static_cast<float>(d));
            std::memcpy(&key.scale_bits, &scale, sizeof(key.scale_bits));
            keys.push_back(key);
          }
        }
      }
    }
  }
  return keys;
}

absl::Status CudnnStatus(cudnnStatus_t s, const char* expr) {
  if (s == CUDNN_STATUS_SUCCESS) return absl::OkStatus();
  const std::string message =
      absl::StrCat(expr, " failed: ", cudnnGetErrorString(s), " (", static_cast<int>(s), ")");
  switch (s) {
    case CUDNN_STATUS_ALLOC_FAILED:
      return absl::ResourceExhaustedError(message);
    case CUDNN_STATUS_NOT_INITIALIZED:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace ringattn
