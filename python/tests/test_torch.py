"""ringattn.torch.attention's gradients through torch.autograd (AttendBackward on the service)
against the fp64 reference, and ring-flash-attention's entry points."""
import itertools
import os
import unittest

import numpy as np

import support
from support import TOLERANCE, reference, rel_l2, torch

import ringattn

SERVERS = support.Servers(main=())
tearDownModule = SERVERS.stop


def setUpModule():
    if torch is None:
        raise unittest.SkipTest("torch is not installed")
    SERVERS.start()


def leaf(x, wire, fmt="bshd", device="cpu"):
    if fmt == "bhsd":
        x = np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    return support.as_torch(x, wire).to(device).requires_grad_()


def target():
    return SERVERS.main.target


class AutogradTest(support.ClientTest):
    target = staticmethod(target)

    def check(self, seq, wire, fmt, heads_k=1, causal=True, seed=0, device="cpu", path=None,
              **options):
        q, k, v, g = support.inputs(seed, 1, seq, 5, heads_k, 64, wire, n=4)
        g = support.inputs(seed + 100, 1, seq, 5, 5, 64, wire, n=1)[0]
        tq, tk, tv = (leaf(x, wire, fmt, device) for x in (q, k, v))
        client = self.client
        out = ringattn.torch.attention(tq, tk, tv, causal=causal, qkv_format=fmt, client=client,
                                       **options)
        tg = support.as_torch(g if fmt == "bshd" else np.ascontiguousarray(
            g.transpose(0, 2, 1, 3)), wire).to(device)
        (out.float() * tg.float()).sum().backward()
        want = reference(q, k, v, causal=causal, window=options.get("window", (-1, -1)),
                         alibi=options.get("alibi_slopes"), softcap=options.get("softcap", 0.0),
                         cu_seqlens=options.get("cu_seqlens"), dout=g)
        name = f"seq {seq} {wire} {fmt} {options}"
        self.assertLessEqual(rel_l2(support.to_bshd(out, fmt), want[0]), TOLERANCE[wire][0], name)
        for label, t, w in (("dq", tq, want[2]), ("dk", tk, want[3]), ("dv", tv, want[4])):
            self.assertEqual(t.grad.dtype, t.dtype, f"{name} {label}")
            self.assertEqual(t.grad.device, t.device, f"{name} {label}")
            err = rel_l2(support.to_bshd(t.grad, fmt), w)
            self.assertLessEqual(err, TOLERANCE[wire][1], f"{name}: {label} rel_l2 {err}")

    def test_gradients_every_dtype_and_format(self):
        for seq, wire, fmt in itertools.product((1, 7), ("bf16", "fp16", "fp32"),
                                                ("bshd", "bhsd")):
            with self.subTest(seq=seq, wire=wire, fmt=fmt):
                self.check(seq, wire, fmt, heads_k=1 if seq == 7 else 5)

    def test_gradients_3816(self):
        self.check(3816, "bf16", "bshd", heads_k=1, seed=5)

    def test_gradients_with_options(self):
        slopes = [2.0 ** (-8 * (i + 1) / 5) for i in range(5)]
        self.check(7, "fp32", "bshd", window=(3, 1), alibi_slopes=slopes, softcap=3.0,
                   layout="zigzag")
        self.check(7, "fp32", "bhsd", cu_seqlens=[0, 2, 7], causal=False)

    def test_gradients_streamed(self):
        q, k, v = support.inputs(8, 1, 7, 5, 1, 64, "fp32")
        grads = []
        for path in ("unary", "stream"):
            client = ringattn.Client(target(), shared_memory=False)
            tq, tk, tv = (leaf(x, "fp32") for x in (q, k, v))
            r = client.attend(tq, tk, tv, causal=True, return_lse=True, path=path)
            b = client.attend_backward(tq, tk, tv, r.out, r.lse, torch.ones_like(r.out),
                                       causal=True, path=path)
            self.assertEqual(b.path, path)
            grads.append([b.dq, b.dk, b.dv])
            client.close()
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_no_grad_is_plain_attend(self):
        q, k, v = support.inputs(6, 1, 7, 5, 1, 64, "bf16")
        with torch.no_grad():
            out = ringattn.torch.attention(*(leaf(x, "bf16") for x in (q, k, v)), causal=True,
                                           client=self.client)
        self.assertFalse(out.requires_grad)
        self.assertLessEqual(rel_l2(support.to_float64(out), reference(q, k, v, True)[0]),
                             TOLERANCE["bf16"][0])

    def test_default_client_from_environment(self):
        import os
        os.environ["RINGATTN_TARGET"] = target()
        ringattn.set_default_client(target())
        q, k, v = support.inputs(7, 1, 7, 5, 5, 64, "fp32")
        out = ringattn.torch.attention(*(support.as_torch(x, "fp32") for x in (q, k, v)))
        self.assertLessEqual(rel_l2(support.to_float64(out), reference(q, k, v)[0]), 1e-5)

    @unittest.skipUnless(torch is not None and torch.cuda.is_available(), "no CUDA device")
    def test_cuda_tensors(self):
        self.check(7, "bf16", "bshd", device="cuda")
        self.check(7, "fp16", "bhsd", device="cuda", path=None)


class RingFlashAttnTest(support.ClientTest):
    target = staticmethod(target)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        from ringattn import ring_flash_attn
        cls.rfa = ring_flash_attn
        ringattn.set_default_client(cls.client)

    def test_func_forward_backward(self):
        q, k, v = support.inputs(10, 2, 7, 5, 1, 64, "bf16")
        g = support.inputs(11, 2, 7, 5, 1, 64, "bf16", n=1)[0]
        tq, tk, tv = (leaf(x, "bf16") for x in (q, k, v))
        out, lse, probs = self.rfa.ring_flash_attn_func(
            tq, tk, tv, 0.0, None, True, (-1, -1), None, False, True, None)
        self.assertIsNone(probs)
        (out.float() * support.as_torch(g, "bf16").float()).sum().backward()
        want = reference(q, k, v, causal=True, dout=g)
        self.assertLessEqual(rel_l2(support.to_float64(out), want[0]), TOLERANCE["bf16"][0])
        self.assertLessEqual(rel_l2(support.to_float64(lse), want[1]), 1e-5)
        for t, w in ((tq, want[2]), (tk, want[3]), (tv, want[4])):
            self.assertLessEqual(rel_l2(support.to_float64(t.grad), w), TOLERANCE["bf16"][1])
        only_out = self.rfa.ring_flash_attn_func(tq, tk, tv, causal=True, window_size=(2, 0),
                                                 softmax_scale=0.2)
        self.assertLessEqual(
            rel_l2(support.to_float64(only_out),
                   reference(q, k, v, causal=True, window=(2, 0), scale=0.2)[0]),
            TOLERANCE["bf16"][0])

    def test_varlen(self):
        bounds = [0, 3, 4, 9, 16]
        q, k, v = support.inputs(12, 1, 16, 5, 1, 64, "fp16")
        g = support.inputs(13, 1, 16, 5, 1, 64, "fp16", n=1)[0]
        tq, tk, tv = (support.as_torch(x[0], "fp16").requires_grad_() for x in (q, k, v))
        cu = torch.tensor(bounds, dtype=torch.int32)
        out, lse, probs = self.rfa.ring_flash_attn_varlen_func(
            tq, tk, tv, cu, 7, causal=True, return_attn_probs=True)
        self.assertIsNone(probs)
        self.assertEqual(tuple(out.shape), (16, 5, 64))
        self.assertEqual(tuple(lse.shape), (4, 5, 7))
        (out.float() * support.as_torch(g[0], "fp16").float()).sum().backward()
        want = reference(q, k, v, causal=True, cu_seqlens=bounds, dout=g)
        self.assertLessEqual(rel_l2(support.to_float64(out), want[0][0]), TOLERANCE["fp16"][0])
        for i in range(4):
            n = bounds[i + 1] - bounds[i]
            np.testing.assert_allclose(support.to_float64(lse[i, :, :n]),
                                       want[1][0][:, bounds[i]:bounds[i + 1]], atol=1e-3)
            self.assertTrue(torch.isinf(lse[i, :, n:]).all())
        for t, w in ((tq, want[2]), (tk, want[3]), (tv, want[4])):
            self.assertLessEqual(rel_l2(support.to_float64(t.grad), w[0]), TOLERANCE["fp16"][1])

    def test_refusals(self):
        q, k, v = (support.as_torch(x, "bf16") for x in support.inputs(14, 1, 7, 5, 1, 64, "bf16"))
        with self.assertRaisesRegex(NotImplementedError, "dropout_p"):
            self.rfa.ring_flash_attn_func(q, k, v, dropout_p=0.1)
        with self.assertRaisesRegex(NotImplementedError, "dropout_p"):
            self.rfa.ring_flash_attn_varlen_func(q[0], k[0], v[0], [0, 7], 7, dropout_p=0.1)

    def test_group_of_two_ranks(self):
        # Each rank holds its shard, as ring-flash-attention's callers do: the service computes
        # the whole sequence once, each rank gets its shard of the results and gradients.
        import subprocess
        import sys
        import tempfile
        for mode, wire, bounds in (("func", "bf16", None), ("varlen", "fp32", [0, 4, 10, 14])):
            with self.subTest(mode=mode), tempfile.TemporaryDirectory() as d:
                store = os.path.join(d, "store")
                procs = [subprocess.Popen(
                    [sys.executable, os.path.join(support.HERE, "group_rank.py"), str(r), "2",
                     store, target(), os.path.join(d, f"{r}.npz"), mode]) for r in range(2)]
                for p in procs:
                    self.assertEqual(p.wait(120), 0)
                ranks = [np.load(os.path.join(d, f"{r}.npz")) for r in range(2)]
                q, k, v = support.inputs(50, 1, 14, 5, 1, 64, wire)
                dout = support.inputs(51, 1, 14, 5, 1, 64, wire, n=1)[0]
                want = reference(q, k, v, causal=True, cu_seqlens=bounds, dout=dout)
                if mode == "func":
                    whole = {n: np.concatenate([r[n] for r in ranks], axis=2 if n == "lse" else 1)
                             for n in ("out", "lse", "dq", "dk", "dv")}
                else:  # rank r has the r-th half of each sequence; lse per sequence, padded
                    whole = {}
                    for n in ("out", "dq", "dk", "dv"):
                        whole[n] = np.concatenate(
                            [ranks[r][n][:, a // 2:b // 2] for a, b in zip(bounds, bounds[1:])
                             for r in range(2)], axis=1)
                    whole["lse"] = np.concatenate(
                        [ranks[r]["lse"][i:i + 1, :, :(b - a) // 2]
                         for i, (a, b) in enumerate(zip(bounds, bounds[1:])) for r in range(2)],
                        axis=2)
                self.assertLessEqual(rel_l2(whole["out"], want[0]), TOLERANCE[wire][0])
                self.assertLessEqual(rel_l2(whole["lse"], want[1]), 1e-5)
                for n, w in (("dq", want[2]), ("dk", want[3]), ("dv", want[4])):
                    self.assertLessEqual(rel_l2(whole[n], w), TOLERANCE[wire][1], n)

    def test_group_of_one_rank(self):
        import tempfile
        import torch.distributed as dist
        with tempfile.NamedTemporaryFile() as f:
            store = dist.FileStore(f.name, 1)
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
            try:
                q, k, v = support.inputs(15, 1, 7, 5, 1, 64, "fp32")
                out = self.rfa.ring_flash_attn_func(
                    *(support.as_torch(x, "fp32") for x in (q, k, v)), causal=True,
                    group=dist.group.WORLD)
                self.assertLessEqual(rel_l2(support.to_float64(out), reference(q, k, v, True)[0]),
                                     1e-5)
            finally:
                dist.destroy_process_group()


if __name__ == "__main__":
    unittest.main(verbosity=2)
