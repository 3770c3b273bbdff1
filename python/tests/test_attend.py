"""Attend from Python against the fp64 reference: seq 1, 7 and 3816, 5 heads with GQA,
bf16/fp16/fp32, numpy and torch inputs, both formats, through `ringattn serve` (CPU workers)."""
import itertools
import unittest

import numpy as np

import support
from support import TOLERANCE, reference, rel_l2, torch

SERVERS = support.Servers(main=())
setUpModule = SERVERS.start
tearDownModule = SERVERS.stop


def make(x, kind, wire, fmt):
    """float32 [b, s, h, d] data as the caller would hold it."""
    if fmt == "bhsd":
        x = np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    if kind == "numpy":
        return support.as_numpy_dtype(x, wire)
    return support.as_torch(x, wire)


class AttendTest(support.ClientTest):
    target = staticmethod(lambda: SERVERS.main.target)

    def check(self, seq, wire, kind, fmt, heads_k=1, causal=True, seed=0, path=None, **options):
        q, k, v = support.inputs(seed, 2 if seq < 100 else 1, seq, 5, heads_k, 64, wire)
        want_out, want_lse = reference(q, k, v, causal=causal,
                                       window=options.get("window", (-1, -1)),
                                       alibi=options.get("alibi_slopes"),
                                       softcap=options.get("softcap", 0.0),
                                       scale=options.get("softmax_scale"),
                                       cu_seqlens=options.get("cu_seqlens"))
        r = self.client.attend(make(q, kind, wire, fmt), make(k, kind, wire, fmt),
                               make(v, kind, wire, fmt), causal=causal, return_lse=True,
                               qkv_format=fmt, path=path, **options)
        name = f"seq {seq} {wire} {kind} {fmt} heads_k {heads_k} {options}"
        # As the caller's tensors came.
        if kind == "torch":
            self.assertIsInstance(r.out, torch.Tensor, name)
            self.assertEqual(r.out.dtype, make(q[:1, :1], kind, wire, fmt).dtype, name)
            self.assertIsInstance(r.lse, torch.Tensor, name)
        else:
            self.assertIsInstance(r.out, np.ndarray, name)
            self.assertEqual(r.out.dtype, make(q[:1, :1], kind, wire, fmt).dtype, name)
        want_shape = q.shape if fmt == "bshd" else (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
        self.assertEqual(tuple(r.out.shape), want_shape, name)
        self.assertEqual(tuple(r.lse.shape), (q.shape[0], 5, seq), name)
        err = rel_l2(support.to_bshd(r.out, fmt), want_out)
        self.assertLessEqual(err, TOLERANCE[wire][0], f"{name}: out rel_l2 {err}")
        lse = support.to_float64(r.lse)
        self.assertLessEqual(rel_l2(lse, want_lse), 1e-5, name)
        self.assertLessEqual(float(np.abs(lse - want_lse).max()), 1e-3, name)
        self.assertGreater(r.timings.total_seconds, 0.0, name)
        # The client times the call on a monotonic clock, the service on the wall clock, which
        # NTP may slew while the call runs (seen: 0.16% on a loaded CI machine): 1% + 2 ms slack.
        self.assertGreaterEqual(r.timings.client_seconds,
                                r.timings.total_seconds * 0.99 - 0.002, name)
        self.assertEqual(len(r.timings.workers), 2, name)
        return r

    def kinds(self):
        return ["numpy", "torch"] if torch is not None else ["numpy"]

    def test_short_every_dtype_kind_format(self):
        # Every data path in turn: shared memory, one message, the chunked stream.
        paths = itertools.cycle(["shm", "unary", "stream"])
        for seq, wire, kind, fmt in itertools.product((1, 7), ("bf16", "fp16", "fp32"),
                                                      self.kinds(), ("bshd", "bhsd")):
            path = next(paths)
            with self.subTest(seq=seq, wire=wire, kind=kind, fmt=fmt, path=path):
                r = self.check(seq, wire, kind, fmt, heads_k=1 if seq == 7 else 5, path=path)
                self.assertEqual(r.path, path)

    def test_3816(self):
        cases = [("bf16", "numpy", "bshd", True), ("fp32", "numpy", "bhsd", False)]
        if torch is not None:
            cases += [("fp16", "torch", "bhsd", True), ("bf16", "torch", "bshd", False)]
        for wire, kind, fmt, causal in cases:
            with self.subTest(wire=wire, kind=kind, fmt=fmt, causal=causal):
                self.check(3816, wire, kind, fmt, heads_k=1, causal=causal, seed=3)

    def test_options(self):
        slopes = np.array([2.0 ** (-8 * (i + 1) / 5) for i in range(5)])
        for options in (dict(window=(3, 1)), dict(alibi_slopes=slopes), dict(softcap=2.0),
                        dict(softmax_scale=0.3), dict(cu_seqlens=[0, 1, 3, 3, 7]),
                        dict(layout="zigzag"), dict(layout="stripe"),
                        dict(window=(2, 0), alibi_slopes=slopes, softcap=5.0,
                             layout="contiguous")):
            with self.subTest(options=str(options)):
                self.check(7, "fp32", "numpy", "bshd", heads_k=1, **options)

    def test_plan_and_request_id(self):
        q, k, v = support.inputs(1, 1, 7, 5, 5, 64, "fp32")
        r = self.client.attend(q, k, v, layout="stripe", request_id="py-test-id")
        self.assertEqual(r.request_id, "py-test-id")
        self.assertEqual(r.plan.world_size, 2)
        self.assertEqual(sum(r.plan.rows_per_rank), 7)
        self.assertIsNone(r.lse)

    def test_dtype_conversion_without_matching_inputs(self):
        # float32 numpy inputs sent as bf16: the result is float32 holding bf16 values.
        q, k, v = support.inputs(2, 1, 7, 5, 1, 64, "bf16")
        want, _ = reference(q, k, v, causal=True)
        r = self.client.attend(q, k, v, causal=True, dtype="bf16")
        self.assertEqual(r.out.dtype, np.float32)
        np.testing.assert_array_equal(r.out, support.bf16_round(r.out))
        self.assertLessEqual(rel_l2(r.out, want), TOLERANCE["bf16"][0])
        with self.assertRaises(TypeError):
            self.client.attend(q.astype(np.float64), k, v)

    def test_unary_response_past_grpc_default_limit(self):
        # fp32 out of 1 x 3816 x 5 x 64 is 4.9 MB, past gRPC's default 4 MiB receive limit.
        r = self.check(3816, "fp32", "numpy", "bshd", heads_k=5, causal=True, seed=4,
                       path="unary")
        self.assertEqual(r.path, "unary")
        self.assertGreater(r.out.nbytes, 4 << 20)


if __name__ == "__main__":
    unittest.main(verbosity=2)
