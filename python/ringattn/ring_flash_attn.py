"""ring-flash-attention's entry points, computed by the service.

    # from ring_flash_attn import ring_flash_attn_func, ring_flash_attn_varlen_func
    from ringattn.ring_flash_attn import ring_flash_attn_func, ring_flash_attn_varlen_func

The same arguments and results, with these differences (docs/python.md):
  - group: None (or a group of one rank) means q, k, v hold the whole sequence. A group of W
    ranks holds it in shards as ring-flash-attention's callers do (ring_flash_attn_func: rank r
    has the r-th contiguous 1/W of the sequence; the varlen function: the r-th 1/W of every
    packed sequence, local cu_seqlens the same on every rank): the shards are gathered on the
    group's rank 0, which calls the service for the whole sequence, and each rank gets its
    shard of the results (the backward likewise). The service's workers are the ring.
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

from .client import default_client
from .torch import attention


def _check_dropout(dropout_p):
    if dropout_p:
        raise NotImplementedError(
            f"ringattn.ring_flash_attn: dropout_p={dropout_p} is not supported (flash-attn's "
            "dropout RNG cannot be reproduced by the service); use dropout_p=0, or "
            "ringattn.Client.attend(dropout_p=..., dropout_seed=...) for the service's dropout")


def _group_size(group):
    if group is None:
        return 1
    import torch.distributed as dist
    return dist.get_world_size(group)


class _Sharding:
    """Where each rank's rows sit in the whole sequence (dim `dim` of the tensors): rank r's
    local rows [a, b) are global rows [a + offset, b + offset) for each (a, b, offset) of
    pieces[r]."""

    def __init__(self, world, local_len, local_bounds=None):
        self.world = world
        if local_bounds is None:  # contiguous
            self.pieces = [[(0, local_len, r * local_len)] for r in range(world)]
        else:  # the r-th 1/W of every sequence
            self.pieces = []
            for r in range(world):
                p = []
                for i in range(len(local_bounds) - 1):
                    a, b = local_bounds[i], local_bounds[i + 1]
                    p.append((a, b, a * (world - 1) + r * (b - a)))
                self.pieces.append(p)

    def join(self, shards, dim):
        """The whole tensor from the W local shards."""
        parts = []
        for r, shard in enumerate(shards):
            for a, b, off in self.pieces[r]:
                parts.append((a + off, shard.narrow(dim, a, b - a)))
        parts.sort(key=lambda x: x[0])
        return torch.cat([p for _, p in parts], dim=dim)

    def split(self, whole, dim):
        """The W local shards of the whole tensor."""
        shards = []
        for r in range(self.world):
            shards.append(torch.cat([whole.narrow(dim, a + off, b - a)
                                     for a, b, off in self.pieces[r]], dim=dim).contiguous())
        return shards

    def global_bounds(self, local_bounds):
        return [x * self.world for x in local_bounds]


class _GroupCall:
    """The group's collectives around one call made by its rank 0."""

    def __init__(self, group):
        import torch.distributed as dist
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.root = dist.get_global_rank(group, 0)

    def gather(self, local):
        local = local.contiguous()
        shards = [torch.empty_like(local) for _ in range(self.dist.get_world_size(self.group))]
        self.dist.gather(local, shards if self.rank == 0 else None, dst=self.root,
                         group=self.group)
        return shards if self.rank == 0 else None

    def run(self, fn, device):
        """fn() on rank 0; its failure reaches every rank (the others raise RuntimeError)."""
        result, failure = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # re-raised below, after the others know
                failure = e
        flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=device)
        self.dist.broadcast(flag, src=self.root, group=self.group)
        if failure is not None:
            raise failure
        if flag.item():
            raise RuntimeError("ringattn.ring_flash_attn: the service call on rank 0 of the group "
                               "failed (its exception says why)")
        return result

    def scatter(self, shards, like):
        """This rank's shard (shaped as `like`) of rank 0's list."""
        out = torch.empty_like(like)
        self.dist.scatter(out, shards if self.rank == 0 else None, src=self.root,
                          group=self.group)
        return out


class _GroupAttention(torch.autograd.Function):
    """apply(q, k, v, client, options, group, sharding): this rank's shards of q, k, v -> its
    shards of out and lse (no gradient), the whole sequence computed by the service from the
    group's rank 0; the backward likewise through AttendBackward."""

    @staticmethod
    def forward(ctx, q, k, v, client, options, group, sharding):
        g = _GroupCall(group)
        shards = [g.gather(x.detach()) for x in (q, k, v)]

        def call():
            whole = [sharding.join(s, 1) for s in shards]
            r = client.attend(*whole, return_lse=True, **options)
            ctx.whole = (*whole, r.out, r.lse)  # for the backward, on rank 0 only
            return sharding.split(r.out, 1), sharding.split(r.lse, 2)
        out_shards, lse_shards = g.run(call, q.device) or (None, None)
        b, s, h, _ = q.shape
        out = g.scatter(out_shards, q)
        lse = g.scatter(lse_shards, torch.empty((b, h, s), dtype=torch.float32, device=q.device))
        ctx.client, ctx.options, ctx.group, ctx.sharding = client, options, group, sharding
        ctx.kv_shape = k.shape
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        g = _GroupCall(ctx.group)
        douts = g.gather(dout)
        sharding = ctx.sharding

        def call():
            q, k, v, out, lse = ctx.whole
            r = ctx.client.attend_backward(q, k, v, out, lse, sharding.join(douts, 1),
                                           **ctx.options)
            return [sharding.split(x, 1) for x in (r.dq, r.dk, r.dv)]
        dq_shards, dk_shards, dv_shards = g.run(call, dout.device) or (None, None, None)
        ctx.whole = None
        kv = torch.empty(ctx.kv_shape, dtype=dout.dtype, device=dout.device)
        return (g.scatter(dq_shards, dout), g.scatter(dk_shards, kv), g.scatter(dv_shards, kv),
                None, None, None, None)


def _attention(q, k, v, group, client, local_bounds=None, **options):
    """(out, lse) for q, k, v [batch, seq, heads, head_dim], whole or sharded over `group`;
    local_bounds: the packed sequences' cu_seqlens (of this rank's shard)."""
    client = client or default_client()
    world = _group_size(group)
    if world == 1:
        if local_bounds is not None:
            options["cu_seqlens"] = local_bounds
        return attention(q, k, v, return_lse=True, client=client, **options)
    sharding = _Sharding(world, q.shape[1], local_bounds)
    if local_bounds is not None:
        options["cu_seqlens"] = sharding.global_bounds(local_bounds)
    return _GroupAttention.apply(q, k, v, client, options, group, sharding)


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                         window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                         return_attn_probs=False, group=None, *, client=None):
    """q [batch, seq, heads, head_dim], k, v [batch, seq, heads_k, head_dim]: the whole
    sequence, or this rank's contiguous shard of it when `group` has several ranks."""
    _check_dropout(dropout_p)
    out, lse = _attention(q, k, v, group, client, causal=causal, window=window_size,
                          alibi_slopes=alibi_slopes, softmax_scale=softmax_scale)
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0,
                                softmax_scale=None, causal=False, window_size=(-1, -1),
                                alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                group=None, *, client=None):
    """q [total_tokens, heads, head_dim], k, v [total_tokens, heads_k, head_dim]: sequences
    packed as cu_seqlens ([0, ..., total_tokens]) says, each attending only within itself. With
    a group of several ranks: this rank's 1/W of every sequence, cu_seqlens and max_seqlen
    local (as ring-flash-attention's callers hold them)."""
    _check_dropout(dropout_p)
    bounds = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor)
                               else cu_seqlens)]
    out, lse = _attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), group, client,
                          local_bounds=bounds, causal=causal, window=window_size,
                          alibi_slopes=alibi_slopes, softmax_scale=softmax_scale)
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
