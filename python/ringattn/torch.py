"""Differentiable attention on the service for torch code.

    import ringattn.torch
    out = ringattn.torch.attention(q, k, v, causal=True)   # [batch, seq, heads, head_dim]
    out.sum().backward()                                   # AttendBackward on the service

The forward is one Attend (with the LSE when a gradient may be wanted); the backward is one
AttendBackward with the forward's inputs, out and lse. Tensors stay on their device (CPU or
CUDA), dtype bf16, fp16 or fp32. With no gradient wanted (torch.no_grad(), or no input that
requires grad) the forward asks for no LSE and saves nothing.
"""
import torch

from .client import default_client

_OPTION_NAMES = ("causal", "window", "alibi_slopes", "softcap", "softmax_scale", "dropout_p",
                 "dropout_seed", "cu_seqlens", "layout", "timeout", "dtype")


class AttentionFunction(torch.autograd.Function):
    """apply(q, k, v, client, options, qkv_format) -> (out, lse); lse has no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, client, options, qkv_format):
        r = client.attend(q, k, v, return_lse=True, qkv_format=qkv_format, **options)
        ctx.save_for_backward(q, k, v, r.out, r.lse)
        ctx.client = client
        ctx.options = options
        ctx.qkv_format = qkv_format
        ctx.mark_non_differentiable(r.lse)
        return r.out, r.lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        g = ctx.client.attend_backward(q, k, v, out, lse, dout.contiguous(),
                                       qkv_format=ctx.qkv_format, **ctx.options)
        return g.dq, g.dk, g.dv, None, None, None


def attention(q, k, v, *, causal=False, window=(-1, -1), alibi_slopes=None, softcap=0.0,
              softmax_scale=None, dropout_p=0.0, dropout_seed=0, cu_seqlens=None,
              layout="auto", qkv_format="bshd", dtype=None, timeout=None, return_lse=False,
              client=None):
    """Attention of q over k, v on the service (client: ringattn.default_client() when None).
    Arguments as Client.attend. Returns out, or (out, lse) with return_lse; differentiable in
    q, k and v."""
    client = client or default_client()
    options = dict(causal=causal, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                   softmax_scale=softmax_scale, dropout_p=dropout_p, dropout_seed=dropout_seed,
                   cu_seqlens=cu_seqlens, layout=layout, timeout=timeout, dtype=dtype)
    wants_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v))
    if not wants_grad:
        r = client.attend(q, k, v, return_lse=return_lse, qkv_format=qkv_format, **options)
        return (r.out, r.lse) if return_lse else r.out
    out, lse = AttentionFunction.apply(q, k, v, client, options, qkv_format)
    return (out, lse) if return_lse else out
