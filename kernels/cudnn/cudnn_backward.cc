// The backward of the cudnn backend (see cudnn_backward.h): validation, Backward and
// ComputeDelta.
#include "kernels/cudnn/cudnn_backward.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cuda/flash_bwd.h"
#include "kernels/cudnn/cudnn_backend.h"
#include "kernels/cudnn/cudnn_context.h"
#include "kernels/cudnn/merge_kernel.h"
#include "kernels/cudnn/sdpa_graph_cache.h"

namespace ringattn {
namespace {

// The backward's own alignment rule for out and dout (cuDNN loads them like q).
absl::Status CheckOutAlignment(const AttentionBackwardParams& p, const CudnnMaskPlan& plan) {
  const int64_t sizes[3] = {p.fwd.batch, p.fwd.heads, plan.q_count};
  struct T {
    const char* name;
    const void* ptr;
    const char* stride_names[3];
    int64_t strides[3];
  };
  const T tensors[2] = {
      {"out",
       p.out,
       {"out_batch_stride", "out_head_stride", "out_row_stride"},
       {p.out_batch_stride, p.out_head_stride, p.out_row_stride}},
      {"dout",
       p.dout,
       {"dout_batch_stride", "dout_head_stride", "dout_row_stride"},
       {p.dout_batch_stride, p.dout_head_stride, p.dout_row_stride}},
  };
  for (const T& t : tensors) {
    if (!Aligned16(Advance(t.ptr, plan.q_begin * t.strides[2], p.out_dtype))) {
      return absl::InvalidArgumentError(
          absl::StrCat("the cudnn backward needs ", t.name,
                       " 16-byte aligned at its first live row (pointer not 16-byte aligned)"));
    }
    for (int i = 0; i < 3; ++i) {
      if (sizes[i] > 1 && t.strides[i] % 8 != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the cudnn backward needs out/dout batch/head/row strides in multiples of 8 "
            "elements (cuDNN's vector loads); got ",
            t.stride_names[i], " = ", t.strides[i]));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<CudnnMaskPlan> PlanBackward(const AttentionBackwardParams& p) {
  RA_RETURN_IF_ERROR(ValidateBackwardParams(p));
  // The forward's rules (dtype, alibi, softcap, masks, q/k/v alignment).
  // fwd.o, fwd.lse and merge_into_output are not the backward's: validated as
  // ValidateBackwardParams does, with dout in o's place.
  AttentionParams fwd = p.fwd;
  fwd.o = const_cast<void*>(p.dout);
  fwd.o_dtype = p.out_dtype;
  fwd.lse = nullptr;
  fwd.merge_into_output = false;
  RA_RETURN_IF_ERROR(CudnnSupports(fwd));
  if (p.out == nullptr) {
    return absl::InvalidArgumentError(
        "the cudnn backward needs out (cuDNN computes D = rowsum(dO * O) from O itself); got "
        "out = null");
  }
  if (p.out_dtype != p.fwd.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the cudnn backward needs out_dtype == dtype (cuDNN reads O and dO in the input dtype); "
        "got out_dtype ",
        std::string(DTypeName(p.out_dtype)), " with dtype ", std::string(DTypeName(p.fwd.dtype))));
  }
  RA_ASSIGN_OR_RETURN(CudnnMaskPlan plan, PlanCudnnCall(p.fwd));
  if (!plan.empty) RA_RETURN_IF_ERROR(CheckOutAlignment(p, plan));
  return plan;
}

}  // namespace

absl::Status CudnnBackwardSupports(const AttentionBackwardParams& p) {
  return PlanBackward(p).status();
}

absl::Status CudnnBackward(CudnnDeviceContext& c, const AttentionBackwardParams& p,
                           cudaStream_t stream) {
  RA_ASSIGN_OR_RETURN(const CudnnMaskPlan plan, PlanBackward(p));
  const AttentionParams& f = p.fwd;
  std::lock_guard<std::mutex> lock(c.mutex());
  RA_RETURN_IF_ERROR(c.WaitForPrevious(stream));
  // cuDNN's backward rejects one query against one key ("s_q = s_kv = 1 is not supported" at
  // graph validation), which rings with single-row segments produce (seq 7 over 4 ranks). Such
  // a call is one dot product per head; it runs our kernel (flash_bwd.h) on the same stream.
  if (!plan.empty && plan.q_count == 1 && plan.k_count == 1) {
    RA_RETURN_IF_ERROR(FlashBackwardAllocatingDelta(p, stream));
    return c.RecordDone(stream);
  }

  GradToFloatParams gq, gk, gv;
  gq.batch = gk.batch = gv.batch = f.batch;
  gq.head_dim = gk.head_dim = gv.head_dim = f.head_dim;
  gq.src_dtype = gk.src_dtype = gv.src_dtype = f.dtype;
  gq.accumulate = gk.accumulate = gv.accumulate = p.accumulate;
  gq.rows = f.seqlen_q;
  gq.heads = f.heads;
  gk.rows = gv.rows = f.seqlen_k;
  gk.heads = gv.heads = f.heads_k;
  gq.dst = p.dq;
  gq.dst_batch_stride = p.dq_batch_stride;
  gq.dst_row_stride = p.dq_row_stride;
  gq.dst_head_stride = p.dq_head_stride;
  gk.dst = p.dk;
  gk.dst_batch_stride = p.dk_batch_stride;
  gk.dst_row_stride = p.dk_row_stride;
  gk.dst_head_stride = p.dk_head_stride;
  gv.dst = p.dv;
  gv.dst_batch_stride = p.dv_batch_stride;
  gv.dst_row_stride = p.dv_row_stride;
  gv.dst_head_stride = p.dv_head_stride;

  if (!plan.empty) {
    RA_RETURN_IF_ERROR(c.EnsureHandle());
    const int64_t b = f.batch, h = f.heads, hk = f.heads_k, d = f.head_dim;
    const int64_t sq = plan.q_count, sk = plan.k_count;
    SdpaGraphKey key = PlannedGraphKey(f, plan);
    key.backward = true;
    const int64_t o_stride[3] = {p.out_batch_stride, p.out_head_stride, p.out_row_stride};
    const int64_t do_stride[3] = {p.dout_batch_stride, p.dout_head_stride, p.dout_row_stride};
    for (int i = 0; i < 3; ++i) {
      key.o_stride[i] = o_stride[i];
      key.do_stride[i] = do_stride[i];
    }
    // A graph not built yet: our kernel computes the whole call while the graph is built in the
    // background (nothing was enqueued on `stream` so far but the wait for the previous call).
    if (c.MayBuildInBackground(key) && CheckFlashBackwardSupport(p).ok() &&
        c.RequestBackgroundBuild(key)) {
      RA_RETURN_IF_ERROR(FlashBackwardAllocatingDelta(p, stream));
      return c.RecordDone(stream);
    }
    RA_ASSIGN_OR_RETURN(const SdpaGraph* graph, c.graphs().GetOrBuild(c.handle(), key));

    // Workspace: [cuDNN's][stats][dQ][dK][dV][seq_len_q, seq_len_kv].
    const int64_t es = DTypeSize(f.dtype);
    const int64_t cudnn_bytes = Align256(SdpaWorkspaceBytes(*graph));
    const int64_t stats_bytes = Align256(b * h * sq * static_cast<int64_t>(sizeof(float)));
    const int64_t dq_bytes = Align256(b * sq * h * d * es);
    const int64_t dkv_bytes = Align256(b * sk * hk * d * es);
    const int64_t seqlen_bytes = plan.padding_mask ? Align256(2 * b * sizeof(int32_t)) : 0;
    RA_RETURN_IF_ERROR(c.EnsureWorkspace(
        cudnn_bytes + stats_bytes + dq_bytes + 2 * dkv_bytes + seqlen_bytes, stream));
    char* const base = c.workspace();
    float* const stats = reinterpret_cast<float*>(base + cudnn_bytes);
    char* const dq = base + cudnn_bytes + stats_bytes;
    char* const dk = dq + dq_bytes;
    char* const dv = dk + dkv_bytes;
    int32_t* const seqlens = reinterpret_cast<int32_t*>(dv + dkv_bytes);

    RA_RETURN_IF_ERROR(LaunchGatherLse(p.lse, p.lse_batch_stride, p.lse_head_stride, b, h,
                                       plan.q_begin, sq, stats, stream));
    SdpaBackwardTensors t;
    t.q = Advance(f.q, plan.q_begin * f.q_row_stride, f.dtype);
    t.k = Advance(f.k, plan.k_begin * f.k_row_stride, f.dtype);
    t.v = Advance(f.v, plan.k_begin * f.v_row_stride, f.dtype);
    t.o = Advance(p.out, plan.q_begin * p.out_row_stride, f.dtype);
    t.dout = Advance(p.dout, plan.q_begin * p.dout_row_stride, f.dtype);
    t.stats = stats;
    t.dq = dq;
    t.dk = dk;
    t.dv = dv;
    if (plan.padding_mask) {
      t.seq_len_q = seqlens;
      t.seq_len_kv = seqlens + b;
      RA_RETURN_IF_ERROR(LaunchFillInt32(t.seq_len_q, b, static_cast<int32_t>(sq), stream));
      RA_RETURN_IF_ERROR(LaunchFillInt32(t.seq_len_kv, b, static_cast<int32_t>(sk), stream));
    }
    RA_RETURN_IF_ERROR(c.BindHandle(stream));
    RA_RETURN_IF_ERROR(ExecuteSdpaBackward(*graph, c.handle(), t, base));
    gq.src = dq;
    gq.live_begin = plan.q_begin;
    gq.live_count = sq;
    gk.src = dk;
    gv.src = dv;
    gk.live_begin = gv.live_begin = plan.k_begin;
    gk.live_count = gv.live_count = sk;
  }
  RA_RETURN_IF_ERROR(LaunchGradToFloat(gq, stream));
  RA_RETURN_IF_ERROR(LaunchGradToFloat(gk, stream));
  RA_RETURN_IF_ERROR(LaunchGradToFloat(gv, stream));
  return c.RecordDone(stream);
}

absl::Status CudnnComputeDelta(CudnnDeviceContext& c, const AttentionBackwardParams& p,
                               float* delta, cudaStream_t stream) {
  // Only out, dout and their sizes are read (a ring computes D before any step, from a params
  // struct that has no lse or gradients yet).
  if (p.fwd.batch < 0 || p.fwd.seqlen_q < 0 || p.fwd.heads <= 0 || p.fwd.head_dim <= 0) {
    return absl::InvalidArgumentError("ComputeDelta: batch, seqlen_q, heads, head_dim invalid");
  }
  if (p.fwd.batch * p.fwd.seqlen_q == 0) return absl::OkStatus();
  if (p.out == nullptr || p.dout == nullptr || delta == nullptr) {
    return absl::InvalidArgumentError("ComputeDelta needs out, dout and delta (got a null one)");
  }
  std::lock_guard<std::mutex> lock(c.mutex());
  RA_RETURN_IF_ERROR(c.WaitForPrevious(stream));
  RA_RETURN_IF_ERROR(LaunchComputeDelta(p, delta, stream));
  return c.RecordDone(stream);
}

}  // namespace ringattn
