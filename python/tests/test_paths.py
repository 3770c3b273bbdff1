"""The data paths: the chunked stream past a small unary limit (forward and backward, several
chunks each way), and system shared memory on the same host (used by default, switched off,
refused by the service, grown, shared by threads)."""
import threading
import unittest

import numpy as np

import support
from support import TOLERANCE, reference, rel_l2

import ringattn

# small: a 64-token fp32 request must stream.
SERVERS = support.Servers(small=("--max_unary_bytes=65536",), no_shm=("--shared_memory=false",))
setUpModule = SERVERS.start
tearDownModule = SERVERS.stop


class StreamingTest(support.ClientTest):
    target = staticmethod(lambda: SERVERS.small.target)
    client_options = dict(shared_memory=False)

    def test_limit_from_get_info(self):
        self.assertEqual(self.client.info().max_unary_bytes, 65536)

    def test_forward_and_backward_stream_past_the_unary_limit(self):
        q, k, v = support.inputs(20, 1, 64, 5, 1, 64, "fp32")
        dout = support.inputs(21, 1, 64, 5, 1, 64, "fp32", n=1)[0]
        want = reference(q, k, v, causal=True, dout=dout)
        r = self.client.attend(q, k, v, causal=True, return_lse=True)
        self.assertEqual(r.path, "stream")
        self.assertLessEqual(rel_l2(r.out, want[0]), TOLERANCE["fp32"][0])
        self.assertLessEqual(rel_l2(r.lse, want[1]), 1e-5)
        self.assertGreater(r.timings.receive_seconds, 0.0)
        g = self.client.attend_backward(q, k, v, r.out, r.lse, dout, causal=True)
        self.assertEqual(g.path, "stream")
        for got, w in ((g.dq, want[2]), (g.dk, want[3]), (g.dv, want[4])):
            self.assertLessEqual(rel_l2(got, w), TOLERANCE["fp32"][1])

    def test_small_request_stays_unary(self):
        q, k, v = support.inputs(22, 1, 7, 5, 1, 64, "bf16")
        r = self.client.attend(q, k, v, dtype="bf16")
        self.assertEqual(r.path, "unary")

    def test_forced_unary_past_the_limit_is_refused_by_the_service(self):
        # gRPC's receive limit is the unary limit plus 1 MiB: 1.8 MB of q, k and v pass it.
        q, k, v = support.inputs(23, 1, 1024, 5, 1, 64, "fp32")
        with self.assertRaises(ringattn.ResourceExhaustedError) as e:
            self.client.attend(q, k, v, path="unary")
        self.assertEqual(e.exception.code.name, "RESOURCE_EXHAUSTED")

    def test_parts_by_heads_over_connections(self):
        # Past the split size (lowered here to 0) a streamed request goes as parts by K/V heads,
        # one per connection: 3 parts of a GQA request with ALiBi, both layouts, forward and
        # backward, joined into the answers the whole request has.
        from ringattn import client as client_module
        saved = client_module._SPLIT_ABOVE_BYTES
        client_module._SPLIT_ABOVE_BYTES = 0
        c = ringattn.Client(SERVERS.small.target, shared_memory=False, connections=3)
        try:
            q, k, v = support.inputs(25, 2, 211, 6, 3, 64, "fp32")
            dout = support.inputs(26, 2, 211, 6, 3, 64, "fp32", n=1)[0]
            slopes = [2.0 ** (-8.0 * (i + 1) / 6) for i in range(6)]
            want = reference(q, k, v, causal=True, alibi=slopes, dout=dout)
            for fmt in ("bshd", "bhsd"):
                with self.subTest(fmt=fmt):
                    t = (lambda x: x.transpose(0, 2, 1, 3)) if fmt == "bhsd" else (lambda x: x)
                    r = c.attend(t(q), t(k), t(v), causal=True, alibi_slopes=slopes,
                                 return_lse=True, qkv_format=fmt, path="stream")
                    self.assertLessEqual(rel_l2(support.to_bshd(r.out, fmt), want[0]),
                                         TOLERANCE["fp32"][0])
                    self.assertLessEqual(rel_l2(r.lse, want[1]), 1e-5)
                    g = c.attend_backward(t(q), t(k), t(v), r.out, r.lse, t(dout), causal=True,
                                          alibi_slopes=slopes, qkv_format=fmt, path="stream")
                    for got, w in ((g.dq, want[2]), (g.dk, want[3]), (g.dv, want[4])):
                        self.assertLessEqual(rel_l2(support.to_bshd(got, fmt), w),
                                             TOLERANCE["fp32"][1])
        finally:
            client_module._SPLIT_ABOVE_BYTES = saved
            c.close()

    def test_response_in_several_chunks(self):
        # out of 1 x 3816 x 5 x 64 fp32 is 4.9 MB: two of the service's 4 MiB response chunks.
        q, k, v = support.inputs(24, 1, 3816, 5, 1, 64, "fp32")
        r = self.client.attend(q, k, v, causal=True, qkv_format="bshd")
        self.assertEqual(r.path, "stream")
        self.assertLessEqual(rel_l2(r.out, reference(q, k, v, causal=True)[0]),
                             TOLERANCE["fp32"][0])


class SharedMemoryTest(unittest.TestCase):
    def test_used_by_default_on_loopback_and_unregistered_on_close(self):
        client = ringattn.Client(SERVERS.small.target)
        # Local callers are one caller to the service (docs/security.md): tell this client's
        # region from any other's by difference.
        before = {region.name for region in client.system_shared_memory_status()}
        q, k, v = support.inputs(30, 1, 64, 5, 1, 64, "fp32")
        r = client.attend(q, k, v, causal=True, return_lse=True)
        self.assertEqual(r.path, "shm")  # no stream: the request carries references only
        self.assertTrue(client.shared_memory_active)
        want = reference(q, k, v, causal=True)
        self.assertLessEqual(rel_l2(r.out, want[0]), TOLERANCE["fp32"][0])
        self.assertLessEqual(rel_l2(r.lse, want[1]), 1e-5)
        self.assertTrue(any(w.shared_memory_read_seconds > 0 for w in r.timings.workers))
        names = [region.name for region in client.system_shared_memory_status()
                 if region.name not in before]
        self.assertEqual(len(names), 1)
        client.close()
        other = ringattn.Client(SERVERS.small.target)
        self.assertNotIn(names[0], [x.name for x in other.system_shared_memory_status()])
        other.close()

    def test_results_do_not_alias_the_reused_region(self):
        # The region is reused by the next call: a result must be the caller's own copy, not a
        # view of it (stream results, by contrast, are views of buffers made for that call).
        client = ringattn.Client(SERVERS.small.target)
        q, k, v = support.inputs(33, 1, 40, 5, 1, 64, "fp32")
        first = client.attend(q, k, v, causal=True, return_lse=True)
        self.assertEqual(first.path, "shm")
        kept_out, kept_lse = first.out.copy(), first.lse.copy()
        q2, k2, v2 = support.inputs(34, 1, 40, 5, 1, 64, "fp32")
        second = client.attend(q2, k2, v2, causal=True, return_lse=True)
        self.assertEqual(second.path, "shm")
        np.testing.assert_array_equal(first.out, kept_out)
        np.testing.assert_array_equal(first.lse, kept_lse)
        self.assertFalse(np.array_equal(first.out, second.out))
        client.close()

    def test_switched_off(self):
        client = ringattn.Client(SERVERS.small.target, shared_memory=False)
        q, k, v = support.inputs(31, 1, 7, 5, 1, 64, "fp32")
        self.assertEqual(client.attend(q, k, v).path, "unary")
        with self.assertRaisesRegex(RuntimeError, "shared memory is off"):
            client.attend(q, k, v, path="shm")
        client.close()

    def test_refused_by_the_service(self):
        q, k, v = support.inputs(32, 1, 7, 5, 1, 64, "fp32")
        auto = ringattn.Client(SERVERS.no_shm.target)
        r = auto.attend(q, k, v)
        self.assertEqual(r.path, "unary")
        self.assertFalse(auto.shared_memory_active)
        self.assertIn("disabled", auto.shared_memory_off_reason)
        auto.close()
        required = ringattn.Client(SERVERS.no_shm.target, shared_memory=True)
        with self.assertRaises(ringattn.FailedPreconditionError) as e:
            required.attend(q, k, v)
        self.assertIn("shared memory disabled", e.exception.message)
        required.close()

    def test_region_grows_and_backward(self):
        client = ringattn.Client(SERVERS.small.target)
        for seq in (7, 1000):
            q, k, v = support.inputs(33 + seq, 1, seq, 5, 1, 64, "fp16")
            dout = support.inputs(34 + seq, 1, seq, 5, 1, 64, "fp16", n=1)[0]
            want = reference(q, k, v, causal=True, dout=dout)
            f16 = [x.astype(np.float16) for x in (q, k, v)]
            r = client.attend(*f16, causal=True, return_lse=True)
            g = client.attend_backward(*f16, r.out, r.lse, dout.astype(np.float16), causal=True)
            self.assertEqual((r.path, g.path), ("shm", "shm"))
            self.assertLessEqual(rel_l2(r.out, want[0]), TOLERANCE["fp16"][0])
            for got, w in ((g.dq, want[2]), (g.dk, want[3]), (g.dv, want[4])):
                self.assertLessEqual(rel_l2(got, w), TOLERANCE["fp16"][1])
        client.close()

    def test_threads_share_a_client(self):
        client = ringattn.Client(SERVERS.small.target)
        cases = [support.inputs(40 + i, 1, 33, 5, 1, 64, "fp32") for i in range(4)]
        results = [None] * len(cases)

        def run(i):
            results[i] = client.attend(*cases[i], causal=True)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (q, k, v), r in zip(cases, results):
            self.assertEqual(r.path, "shm")
            self.assertLessEqual(rel_l2(r.out, reference(q, k, v, causal=True)[0]), 1e-5)
        client.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
