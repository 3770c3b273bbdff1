"""The client's pieces without a service: the bf16 conversion, the target check, the stream
assembler's checks (INTERNAL naming the tensor), the error classes, the descriptor build."""
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import grpc
import numpy as np

import support  # noqa: F401 (puts the package on the path)

import ringattn
from ringattn import _build_proto, _cuda_shm, _proto, _tensors, _wire, client as client_module


class Bf16Test(unittest.TestCase):
    def test_round_to_nearest_even_against_the_tests_own(self):
        rng = np.random.default_rng(0)
        x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 100,
                            np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 65504.0, 1e-40,
                                      np.inf, -np.inf], np.float32)])
        got = _tensors.bf16_bits_to_f32(_tensors.f32_to_bf16_bits(x))
        np.testing.assert_array_equal(got, support.bf16_round(x))
        # Ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
        self.assertEqual(float(got[10002]), 1.0)  # 1.0 -> 1.0
        self.assertEqual(float(got[10003]), 1.0)  # 1.00390625 -> 1.0 (even)
        self.assertEqual(float(got[10004]), 1.015625)  # 1.01171875 -> up (even)
        nan = _tensors.bf16_bits_to_f32(_tensors.f32_to_bf16_bits(np.array([np.nan], np.float32)))
        self.assertTrue(np.isnan(nan[0]))


class LikeTest(unittest.TestCase):
    def test_owned_buffers_become_results_without_a_copy_others_are_copied(self):
        buf = np.arange(2 * 3 * 4 * 2, dtype=np.float32).view(np.uint8)
        like = _tensors.Like(np.zeros((2, 3, 4, 2), np.float32), "bshd")
        owned = like.tensor(buf, "fp32", (2, 3, 4, 2), owned=True)
        self.assertTrue(np.shares_memory(owned, buf))
        copied = like.tensor(buf, "fp32", (2, 3, 4, 2))
        self.assertFalse(np.shares_memory(copied, buf))
        np.testing.assert_array_equal(owned, copied)
        # Another layout or dtype is a new array whoever owns the bytes.
        bhsd = _tensors.Like(np.zeros((2, 4, 3, 2), np.float32), "bhsd")
        moved = bhsd.tensor(buf, "fp32", (2, 3, 4, 2), owned=True)
        self.assertFalse(np.shares_memory(moved, buf))
        np.testing.assert_array_equal(moved, copied.transpose(0, 2, 1, 3))
        lse_owned = like.lse(buf[:4 * 3 * 4], (2, 3, 2), owned=True)
        self.assertTrue(np.shares_memory(lse_owned, buf))
        self.assertFalse(np.shares_memory(like.lse(buf[:4 * 3 * 4], (2, 3, 2)), buf))


class StridedSinkTest(unittest.TestCase):
    def test_chunks_at_any_boundary_land_in_the_parts_place(self):
        # A [6 rows, 4 heads, 3 bytes] result in 2 parts of 2 heads; part 1's contiguous bytes
        # (36) arrive in chunks that start and end mid-row; part 0's place stays untouched.
        whole = np.zeros((6, 4, 3), np.uint8)
        part = client_module._part_of(whole, 1, 2)
        sink = client_module._StridedSink(part)
        self.assertEqual(sink.nbytes, 36)
        want = np.arange(1, 37, dtype=np.uint8)
        for lo, hi in ((0, 5), (5, 6), (6, 19), (19, 24), (24, 36)):
            sink.write(lo, want[lo:hi].tobytes())
        np.testing.assert_array_equal(whole[:, 2:, :].reshape(-1), want)
        np.testing.assert_array_equal(whole[:, :2, :], 0)
        with self.assertRaises(ValueError):  # heads not contiguous within a row
            client_module._StridedSink(whole[:, ::2, :])


class TargetTest(unittest.TestCase):
    def test_loopback(self):
        for t in ("127.0.0.1:50051", "localhost:1", "[::1]:50051", "unix:/tmp/s",
                  "ipv4:127.0.0.2:5", "dns:///localhost:7"):
            self.assertTrue(ringattn.is_loopback_target(t), t)
        for t in ("10.0.0.1:50051", "example.com:443", "[2001:db8::1]:1", "dns:///coord:50051"):
            self.assertFalse(ringattn.is_loopback_target(t), t)


def header_message(rpc, **tensors):
    m = rpc.stream_response()
    for name, (dtype, shape) in tensors.items():
        t = getattr(m.header, name)
        t.dtype = _tensors.wire_enum(dtype)
        t.shape.extend(shape)
    return m


def chunk_message(rpc, name, offset, data):
    m = rpc.stream_response()
    m.chunk.tensor = client_module._which(name)
    m.chunk.offset = offset
    m.chunk.data = data
    return m


def raw(messages):
    return iter([m.SerializeToString() for m in messages])


class AssembleTest(unittest.TestCase):
    rpc = client_module._ATTEND
    outputs = [("out", "fp32", (1, 1, 1, 2)), ("lse", "fp32", (1, 1, 1))]

    def header(self):
        return header_message(self.rpc, out=("fp32", (1, 1, 1, 2)), lse=("fp32", (1, 1, 1)))

    def test_whole_response(self):
        msgs = [self.header(), chunk_message(self.rpc, "out", 0, b"a" * 4),
                chunk_message(self.rpc, "out", 4, b"b" * 4),
                chunk_message(self.rpc, "lse", 0, b"c" * 4)]
        header, buffers = client_module._assemble(self.rpc, raw(msgs), self.outputs)
        self.assertEqual(bytes(buffers["out"]), b"aaaabbbb")
        self.assertEqual(bytes(buffers["lse"]), b"cccc")

    def test_breaches(self):
        h = self.header
        c = lambda *a: chunk_message(self.rpc, *a)  # noqa: E731
        cases = {
            "got no message": [],
            "before the header": [c("out", 0, b"x" * 8)],
            "a second header": [h(), h()],
            "out chunk at offset 4; expected 0": [h(), c("out", 4, b"x" * 4)],
            "past its 8 bytes": [h(), c("out", 0, b"x" * 12)],
            "lse chunk at offset 0; expected 0": [h(), c("lse", 0, b"x" * 4)],
            "out has 4 of its 8 bytes": [h(), c("out", 0, b"x" * 4)],
            "which this call does not return": [h(), c("dq", 0, b"x")],
            "header: out is [1, 1, 1, 3]": [header_message(self.rpc, out=("fp32", (1, 1, 1, 3)),
                                                           lse=("fp32", (1, 1, 1)))],
            "header has no lse": [header_message(self.rpc, out=("fp32", (1, 1, 1, 2))),
                                  c("out", 0, b"x" * 8)],
            "a message with neither header nor chunk": [self.rpc.stream_response()],
        }
        for fragment, msgs in cases.items():
            with self.subTest(fragment):
                with self.assertRaises(ringattn.InternalError) as e:
                    client_module._assemble(self.rpc, raw(msgs), self.outputs)
                self.assertEqual(e.exception.code, grpc.StatusCode.INTERNAL)
                self.assertIn(fragment, e.exception.message)


class WireTest(unittest.TestCase):
    """The hand-written wire format against protobuf's."""

    def test_request_parses_as_the_whole_message(self):
        rng = np.random.default_rng(1)
        full = _proto.AttendBackwardRequest(request_id="x", layout=2)
        full.options.window_left = -1
        full.options.alibi_slopes.extend([0.5, 0.25])
        header = _proto.AttendBackwardRequest()
        data = {}
        for i, name in enumerate(("q", "k", "v", "out", "lse", "dout")):
            t = getattr(full, name)
            t.dtype = 1
            t.shape.extend([1, 3 + i, 2, 64])
            b = rng.integers(0, 256, 300 + 1000 * i, dtype=np.uint8).tobytes()
            t.data = b
            data[_wire.field_number(_proto.AttendBackwardRequest, name)] = b
        header.CopyFrom(full)
        for name in ("q", "k", "v", "out", "lse", "dout"):
            getattr(header, name).ClearField("data")
        got = _proto.AttendBackwardRequest.FromString(_wire.encode_request(header, data))
        self.assertEqual(got, full)

    def test_split_response(self):
        r = _proto.AttendResponse(request_id="abc")
        r.out.dtype = 3
        r.out.shape.extend([1, 70000, 1, 1])
        r.out.data = bytes(range(256)) * 547
        r.lse.dtype = 1
        r.lse.shape.extend([1, 1, 2])
        r.lse.data = b"12345678"
        r.timings.total_seconds = 1.5
        r.timings.workers.add(rank=1, compute_seconds=0.25)
        r.plan.rows_per_rank.extend([3, 4])
        meta, data = _wire.split_message(r.SerializeToString(), {2: "out", 3: "lse"})
        self.assertEqual(bytes(data["out"]), r.out.data)
        self.assertEqual(bytes(data["lse"]), r.lse.data)
        parsed = _proto.AttendResponse.FromString(meta)
        r.out.ClearField("data")
        r.lse.ClearField("data")
        self.assertEqual(parsed, r)

    def test_chunks(self):
        rpc = client_module._BACKWARD
        raw_chunk = _wire.encode_chunk(2, 7, 1 << 40, memoryview(b"abcdef")[1:4])
        m = rpc.stream_request.FromString(raw_chunk)
        self.assertEqual((m.chunk.tensor, m.chunk.offset, m.chunk.data), (7, 1 << 40, b"bcd"))
        back = rpc.stream_response(chunk=_proto.TensorChunk(tensor=8, offset=5, data=b"xyz"))
        kind, (which, offset, data) = _wire.decode_stream_message(back.SerializeToString(), 1, 2)
        self.assertEqual((kind, which, offset, bytes(data)), ("chunk", 8, 5, b"xyz"))
        for n in (0, 1, 127, 128, 300, 1 << 35):
            self.assertEqual(_wire._read_varint(_wire.varint(n), 0), (n, len(_wire.varint(n))))


class ErrorsTest(unittest.TestCase):
    def test_every_code_has_its_class(self):
        for code in grpc.StatusCode:
            if code == grpc.StatusCode.OK:
                continue
            e = ringattn.errors.error(code, "the message", "Attend")
            self.assertIsInstance(e, ringattn.RingAttnError)
            self.assertIsNot(type(e), ringattn.RingAttnError, code)
            self.assertEqual((e.code, e.message, e.rpc), (code, "the message", "Attend"))
            self.assertEqual(str(e), f"Attend: {code.name}: the message")


class ArgumentsTest(unittest.TestCase):
    def test_refused_before_any_call(self):
        c = ringattn.Client("127.0.0.1:1", retry=ringattn.NO_RETRY)
        q = np.zeros((1, 7, 4, 64), np.float32)
        with self.assertRaisesRegex(ValueError, "qkv_format"):
            c.attend(q, q, q, qkv_format="sbhd")
        with self.assertRaisesRegex(ValueError, "layout"):
            c.attend(q, q, q, layout="ring")
        with self.assertRaisesRegex(ValueError, "dtype"):
            c.attend(q, q, q, dtype="fp8")
        with self.assertRaisesRegex(TypeError, "k.dtype"):
            c.attend(q, q.astype(np.float16), q)
        with self.assertRaisesRegex(ValueError, "4-D"):
            c.attend(q[0], q, q)
        with self.assertRaisesRegex(TypeError, "numpy array or a torch tensor"):
            c.attend([1.0], q, q)
        with self.assertRaisesRegex(ValueError, "path"):
            c.attend(q, q, q, path="tcp")
        # CUDA shared memory takes torch tensors on a GPU only (refused before any call).
        with self.assertRaisesRegex(ValueError, "cuda_shm"):
            c.attend(q, q, q, path="cuda_shm")
        c.close()


class DescriptorTest(unittest.TestCase):
    def build_with(self, protoc_env):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "api.desc")
            env = dict(os.environ, **protoc_env)
            subprocess.run([sys.executable, _build_proto.__file__, out], check=True, env=env,
                           capture_output=True)
            from google.protobuf import descriptor_pb2
            with open(out, "rb") as f:
                files = descriptor_pb2.FileDescriptorSet.FromString(f.read())
            self.assertEqual([f.name for f in files.file], ["ringattn/v1/attention.proto"])
            names = [m.name for m in files.file[0].message_type]
            self.assertIn("AttendRequest", names)

    def test_build_from_proto(self):
        self.build_with({})

    @unittest.skipUnless(shutil.which("protoc"), "no protoc on PATH")
    def test_build_with_system_protoc(self):
        self.build_with({"PROTOC": shutil.which("protoc")})

    def test_messages_from_the_descriptor(self):
        r = _proto.AttendRequest()
        r.options.window_left = 3
        self.assertTrue(r.options.HasField("window_left"))  # proto3 optional survived
        self.assertFalse(r.options.HasField("softmax_scale"))
        self.assertEqual(_proto.method_path("AttendBackwardStream"),
                         "/ringattn.v1.AttentionService/AttendBackwardStream")


class IpcHandleTest(unittest.TestCase):
    """torch's storage handles: 64 raw bytes (older torch) or version + kind + 64 bytes."""

    def test_formats(self):
        raw = bytes(range(64))
        self.assertEqual(_cuda_shm.ipc_handle(raw), raw)
        self.assertEqual(_cuda_shm.ipc_handle(b"\x01c" + raw), raw)
        self.assertIsNone(_cuda_shm.ipc_handle(b"\x01e" + raw))  # expandable segment
        self.assertIsNone(_cuda_shm.ipc_handle(raw[:63]))
        self.assertIsNone(_cuda_shm.ipc_handle(b"\x01c" + raw + b"x"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
