"""Each error the service answers reaches Python as an exception of its code with the
service's message; UNAVAILABLE is retried within the deadline."""
import socket
import threading
import time
import unittest
import uuid

import grpc
import numpy as np

import support

import ringattn

# small: a limit small enough to breach, 2 MB per request.
SERVERS = support.Servers(small=("--max_request_bytes=2000000",),
                          no_shm=("--shared_memory=false",))
setUpModule = SERVERS.start
tearDownModule = SERVERS.stop


class ServiceErrorsTest(support.ClientTest):
    target = staticmethod(lambda: SERVERS.small.target)
    client_options = dict(retry=ringattn.NO_RETRY)

    def assertCode(self, cls, code, fragment, fn, *args, **kwargs):
        with self.assertRaises(cls) as e:
            fn(*args, **kwargs)
        self.assertIsInstance(e.exception, ringattn.RingAttnError)
        self.assertEqual(e.exception.code, code)
        self.assertIn(fragment, e.exception.message)
        self.assertIn(code.name, str(e.exception))
        return e.exception

    def test_invalid_argument_on_every_path(self):
        q = np.zeros((1, 7, 4, 32), np.float32)
        k = np.zeros((1, 7, 2, 32), np.float32)
        for path in ("shm", "unary", "stream"):
            with self.subTest(path=path):
                self.assertCode(ringattn.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT,
                                "q.shape[3]: head_dim 32 not supported", self.client.attend,
                                q, k, k, path=path)
        q, k, v = support.inputs(1, 1, 7, 4, 2, 64, "fp32")
        self.assertCode(ringattn.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT,
                        "options.alibi_slopes must have 4 entries", self.client.attend, q, k, v,
                        alibi_slopes=[0.5, 0.25])
        self.assertCode(ringattn.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT,
                        "options.cu_seqlens", self.client.attend, q, k, v, cu_seqlens=[0, 5, 3])
        r = self.client.attend(q, k, v, return_lse=True)
        self.assertCode(ringattn.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT,
                        "lse", self.client.attend_backward, q, k, v, r.out, r.lse[:, :, :3], q,
                        path="unary")

    def test_resource_exhausted(self):
        q, k, v = support.inputs(2, 1, 1024, 5, 5, 64, "fp32")  # 3.9 MB
        for path in ("shm", "unary", "stream"):
            with self.subTest(path=path):
                self.assertCode(ringattn.ResourceExhaustedError,
                                grpc.StatusCode.RESOURCE_EXHAUSTED, "max_request_bytes",
                                self.client.attend, q, k, v, path=path)

    def test_deadline_exceeded(self):
        q, k, v = support.inputs(3, 1, 1024, 4, 1, 64, "fp32")
        self.assertCode(ringattn.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED, "",
                        self.client.attend, q, k, v, timeout=0.001)

    def test_shared_memory_registration_errors(self):
        name = "py-test-" + uuid.uuid4().hex[:8]
        self.assertCode(ringattn.NotFoundError, grpc.StatusCode.NOT_FOUND, name,
                        self.client.unregister_system_shared_memory, name)
        self.assertCode(ringattn.NotFoundError, grpc.StatusCode.NOT_FOUND, "shm_open",
                        self.client.register_system_shared_memory, name, "/" + name, 64)
        self.assertCode(ringattn.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "key",
                        self.client.register_system_shared_memory, name, "no-slash", 64)
        from ringattn import _shm
        region = _shm.Region(4096)
        try:
            self.client.register_system_shared_memory(name, region.key, 4096)
            self.assertCode(ringattn.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS, name,
                            self.client.register_system_shared_memory, name, region.key, 4096)
            self.client.unregister_system_shared_memory(name)
        finally:
            region.close()

    def test_failed_precondition_where_shared_memory_is_off(self):
        client = ringattn.Client(SERVERS.no_shm.target, shared_memory=True, retry=ringattn.NO_RETRY)
        q, k, v = support.inputs(4, 1, 7, 4, 2, 64, "fp32")
        self.assertCode(ringattn.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION,
                        "disabled", client.attend, q, k, v)
        client.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnavailableTest(unittest.TestCase):
    def test_no_server_without_retries(self):
        client = ringattn.Client(f"127.0.0.1:{free_port()}", retry=ringattn.NO_RETRY)
        q, k, v = support.inputs(5, 1, 7, 4, 2, 64, "fp32")
        with self.assertRaises(ringattn.UnavailableError) as e:
            client.attend(q, k, v)
        self.assertEqual(e.exception.code, grpc.StatusCode.UNAVAILABLE)
        client.close()

    def test_retries_stop_at_the_policy(self):
        policy = ringattn.RetryPolicy(max_attempts=3, initial_backoff=0.2, multiplier=2.0)
        client = ringattn.Client(f"127.0.0.1:{free_port()}", retry=policy)
        t0 = time.monotonic()
        with self.assertRaises(ringattn.UnavailableError):
            client.info()
        # Two waits: 0.2 and 0.4 s, each jittered by up to 20%.
        self.assertGreaterEqual(time.monotonic() - t0, 0.45)
        client.close()

    def test_retried_until_the_service_is_up(self):
        port = free_port()
        policy = ringattn.RetryPolicy(max_attempts=200, initial_backoff=0.1, max_backoff=0.3)
        client = ringattn.Client(f"127.0.0.1:{port}", retry=policy, timeout=120)
        q, k, v = support.inputs(6, 1, 7, 4, 2, 64, "fp32")
        result = {}

        def call():
            t0 = time.monotonic()
            try:
                result["r"] = client.attend(q, k, v, causal=True)
                result["seconds"] = time.monotonic() - t0
            except Exception as e:  # reported below
                result["e"] = e
        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.5)  # the call is failing and retrying now
        server = support.Server(f"--listen=127.0.0.1:{port}")
        try:
            thread.join(120)
        finally:
            server.stop()
            client.close()
        self.assertNotIn("e", result)
        # Started before the server existed: its first calls failed UNAVAILABLE.
        self.assertGreater(result["seconds"], 0.5)
        self.assertLessEqual(support.rel_l2(result["r"].out,
                                            support.reference(q, k, v, causal=True)[0]), 1e-5)


if __name__ == "__main__":
    unittest.main(verbosity=2)
