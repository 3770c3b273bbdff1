"""CUDA shared memory from Python on a GPU machine (not run in CI: it needs a GPU): a service with
one cuda worker, torch tensors on the GPU; the default path is CUDA shared memory, whose forward
gives the bytes of the unary path and the fp64 reference's values, and whose AttendBackward
gives the unary path's gradients (dq to rounding: the GPU backward sums it with atomics in no
fixed order).

    RINGATTN_BIN=build/cli/ringattn PYTHONPATH=python:python/tests python3 -m unittest \\
        python/tests/gpu_cuda_shm_check.py
"""
import unittest

import support
from support import TOLERANCE, reference, rel_l2, torch

import ringattn


@unittest.skipUnless(torch is not None and torch.cuda.is_available(), "no CUDA device")
class CudaSharedMemoryTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = support.Server("--kernel=cuda", workers=1)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def test_forward_and_gradients(self):
        client = ringattn.Client(self.server.target)
        for seq, fmt in ((7, "bshd"), (3816, "bhsd")):
            with self.subTest(seq=seq, fmt=fmt):
                q, k, v = support.inputs(11, 1, seq, 5, 1, 128, "bf16")
                dev = [support.as_torch(x, "bf16").cuda() for x in (q, k, v)]  # [b, s, h, d]
                if fmt == "bhsd":
                    dev = [t.transpose(1, 2) for t in dev]
                r = client.attend(*dev, causal=True, return_lse=True, qkv_format=fmt)
                self.assertEqual(r.path, "cuda_shm")
                self.assertEqual(r.out.device.type, "cuda")
                u = client.attend(*dev, causal=True, return_lse=True, qkv_format=fmt,
                                  path="unary")
                self.assertTrue(torch.equal(r.out.cpu(), u.out.cpu()))
                self.assertTrue(torch.equal(r.lse.cpu(), u.lse.cpu()))
                out = r.out if fmt == "bshd" else r.out.transpose(1, 2)
                self.assertLessEqual(rel_l2(support.to_float64(out.cpu()),
                                            reference(q, k, v, True)[0]), TOLERANCE["bf16"][0])

                grads = {}
                dout = torch.ones_like(r.out)
                for path in ("cuda_shm", "unary"):
                    g = client.attend_backward(*dev, r.out, r.lse, dout, causal=True,
                                               qkv_format=fmt, path=path)
                    self.assertEqual(g.path, path)
                    grads[path] = [g.dq.cpu(), g.dk.cpu(), g.dv.cpu()]
                a, b = grads["cuda_shm"], grads["unary"]
                self.assertLessEqual(rel_l2(support.to_float64(a[0]), support.to_float64(b[0])),
                                     1e-2)
                self.assertTrue(torch.equal(a[1], b[1]))
                self.assertTrue(torch.equal(a[2], b[2]))
        client.close()


if __name__ == "__main__":
    unittest.main()
