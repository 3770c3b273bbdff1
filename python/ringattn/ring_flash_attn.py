"""ring-flash-attention's entry points, computed by the service.

    # from ring_flash_attn import ring_flash_attn_func, ring_flash_attn_varlen_func
    from ringattn.ring_flash_attn import ring_flash_attn_func, ring_flash_attn_varlen_func

The same arguments and results, with these differences (docs/python.md):
  - q, k, v hold the whole sequence: the service's workers are the ring, so the caller does not
    shard. `group` must be None or a process group of one rank; a larger group raises
    ValueError rather than compute each rank's shard alone.
  - dropout_p must be 0 (NotImplementedError): ring-flash-attention's dropout draws flash-attn's
    RNG, which the service cannot reproduce; Client.attend(dropout_p=, dropout_seed=) has the
    service's own (CPU workers).
  - return_attn_probs=True returns (out, softmax_lse, None) as ring-flash-attention does: no
    probabilities, the LSE ([batch, heads, seq]; varlen: [num_seqs, heads, max_seqlen], -inf
    past each sequence's end).
  - deterministic is accepted and ignored.
  - The service's client is ringattn.default_client() ($RINGATTN_TARGET), or `client=`.
"""
import torch

from .torch import attention


def _check(dropout_p, group):
    if dropout_p:
        raise NotImplementedError(
            f"ringattn.ring_flash_attn: dropout_p={dropout_p} is not supported (flash-attn's "
            "dropout RNG cannot be reproduced by the service); use dropout_p=0, or "
            "ringattn.Client.attend(dropout_p=..., dropout_seed=...) for the service's dropout")
    if group is not None:
        import torch.distributed as dist

        size = dist.get_world_size(group)
        if size != 1:
            raise ValueError(
                f"ringattn.ring_flash_attn: group has {size} ranks; the service computes the "
                "whole sequence from one caller: pass q, k, v of the whole sequence from one "
                "process and group=None (its workers are the ring)")


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                         window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                         return_attn_probs=False, group=None, *, client=None):
    """q [batch, seq, heads, head_dim], k, v [batch, seq, heads_k, head_dim] (whole sequence)."""
    _check(dropout_p, group)
    out, lse = attention(q, k, v, causal=causal, window=window_size, alibi_slopes=alibi_slopes,
                         softmax_scale=softmax_scale, return_lse=True, client=client)
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0,
                                softmax_scale=None, causal=False, window_size=(-1, -1),
                                alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                group=None, *, client=None):
    """q [total_tokens, heads, head_dim], k, v [total_tokens, heads_k, head_dim]: sequences
    packed as cu_seqlens ([0, ..., total_tokens]) says, each attending only within itself."""
    _check(dropout_p, group)
    bounds = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor)
                               else cu_seqlens)]
    out, lse = attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal=causal,
                         window=window_size, alibi_slopes=alibi_slopes,
                         softmax_scale=softmax_scale, cu_seqlens=bounds, return_lse=True,
                         client=client)
    out = out.squeeze(0)
    if not return_attn_probs:
        return out
    heads = lse.shape[1]
    padded = torch.full((len(bounds) - 1, heads, int(max_seqlen)), float("-inf"),
                        dtype=torch.float32, device=lse.device)
    for i in range(len(bounds) - 1):
        n = bounds[i + 1] - bounds[i]
        padded[i, :, :n] = lse[0, :, bounds[i]:bounds[i + 1]]
    return out, padded, None
