"""One rank of test_torch's group test: ring-flash-attention's call with its shard of the
sequence and a gloo group of `world` ranks; writes its shards of out, lse and the gradients.

    group_rank.py RANK WORLD STORE_FILE TARGET OUT.npz func|varlen
"""
import os
import sys

import numpy as np

import support
from support import torch

import ringattn
from ringattn.ring_flash_attn import ring_flash_attn_func, ring_flash_attn_varlen_func

rank, world, store, target, out_path, mode = sys.argv[1:7]
rank, world = int(rank), int(world)
torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(store, world),
                                     rank=rank, world_size=world)
ringattn.set_default_client(target)
seq = 7 * world
wire = "bf16" if mode == "func" else "fp32"
q, k, v = support.inputs(50, 1, seq, 5, 1, 64, wire)
dout = support.inputs(51, 1, seq, 5, 1, 64, wire, n=1)[0]
if mode == "func":  # contiguous shards
    part = lambda x: x[:, rank * 7:(rank + 1) * 7]  # noqa: E731
else:  # the rank's share of each packed sequence (global bounds: 0, 4, 10, 14)
    local_bounds = [0, 2, 5, 7]
    part = lambda x: np.concatenate([x[:, 2 * a + rank * (b - a):2 * a + (rank + 1) * (b - a)]  # noqa
                                     for a, b in zip(local_bounds, local_bounds[1:])], axis=1)
tq, tk, tv = (support.as_torch(part(x), wire).requires_grad_() for x in (q, k, v))
if mode == "func":
    out, lse, _ = ring_flash_attn_func(tq, tk, tv, causal=True, return_attn_probs=True,
                                       group=torch.distributed.group.WORLD)
else:
    out, lse, _ = ring_flash_attn_varlen_func(tq[0], tk[0], tv[0], local_bounds, 3, causal=True,
                                              return_attn_probs=True,
                                              group=torch.distributed.group.WORLD)
    out = out.unsqueeze(0)
(out.float() * support.as_torch(part(dout), wire).float()).sum().backward()
np.savez(out_path, out=support.to_float64(out), lse=support.to_float64(lse),
         dq=support.to_float64(tq.grad), dk=support.to_float64(tk.grad),
         dv=support.to_float64(tv.grad))
# Both ranks past their last collective before either tears its gloo pairs down (a rank whose
# peer left mid-teardown could abort with "terminate called without an active exception").
torch.distributed.barrier()
torch.distributed.destroy_process_group()
ringattn.default_client().close()
sys.stdout.flush()
os._exit(0)  # the results are saved; skip interpreter teardown of torch's and grpc's threads
