"""Shared by the Python client's tests: a `ringattn serve` on loopback, an fp64 reference
written here (independent of the package), inputs and tolerances."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the package from this checkout

try:
    import torch
except ImportError:
    torch = None
    print("NOTE: torch is not installed: the torch tests are skipped "
          "(scripts/setup.sh installs it into .deps/pyclient)", file=sys.stderr)

# rel_l2 tolerances against fp64 (cli/attend_command.cc's): out, gradients.
TOLERANCE = {"fp32": (1e-5, 1e-4), "fp16": (2e-3, 5e-3), "bf16": (1e-2, 2e-2)}


def ringattn_binary():
    path = os.environ.get("RINGATTN_BIN") or os.path.join(HERE, "..", "..", "build", "cli",
                                                          "ringattn")
    if not os.path.exists(path):
        raise unittest.SkipTest(f"no ringattn binary at {path} (build it, or set RINGATTN_BIN)")
    return path


class Server:
    """`ringattn serve --workers=N` on a free loopback port; stop() ends it."""

    def __init__(self, *flags, workers=2):
        self.log = tempfile.NamedTemporaryFile(prefix="ringattn_serve_", suffix=".log",
                                               delete=False)
        listen = [] if any(f.startswith("--listen=") for f in flags) else ["--listen=127.0.0.1:0"]
        self.proc = subprocess.Popen(
            [ringattn_binary(), "serve", f"--workers={workers}", *listen, "--metrics=", *flags],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.port = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = self.text()
            m = re.search(r"coordinator listening on port (\d+)", text)
            if m:
                self.port = int(m.group(1))
            if self.port and "workers ready" in text:
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("the server did not become ready:\n" + self.text())
        if self.proc.poll() is not None:
            raise RuntimeError("the server exited:\n" + self.text())
        self.target = f"127.0.0.1:{self.port}"

    def text(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


class Servers:
    """Servers a test module starts in setUpModule (start) and stops in tearDownModule (stop),
    by name: Servers(main=(), small=("--max_unary_bytes=65536",)) -> .main.target, ..."""

    def __init__(self, **flags_by_name):
        self._flags = flags_by_name
        self._servers = {}

    def start(self):
        for name, flags in self._flags.items():
            self._servers[name] = Server(*flags)

    def stop(self):
        for server in self._servers.values():
            server.stop()
        self._servers.clear()

    def __getattr__(self, name):
        servers = self.__dict__.get("_servers", {})
        if name in servers:
            return servers[name]
        raise AttributeError(name)


class ClientTest(unittest.TestCase):
    """A test case with `client`, a ringattn.Client of the server `target()` returns."""
    client_options = {}

    @staticmethod
    def target():
        raise NotImplementedError

    @classmethod
    def setUpClass(cls):
        import ringattn
        cls.client = ringattn.Client(cls.target(), **cls.client_options)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()


# ---- the fp64 reference ---------------------------------------------------------------------
def _allowed(s, causal, window, cu_seqlens):
    i = np.arange(s)[:, None]
    j = np.arange(s)[None, :]
    ok = np.ones((s, s), dtype=bool)
    left, right = window
    if causal:
        ok &= j <= i
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    if cu_seqlens is not None:
        seq_of = np.searchsorted(np.asarray(cu_seqlens), np.arange(s), side="right")
        ok &= seq_of[:, None] == seq_of[None, :]
    return ok


def reference(q, k, v, causal=False, window=(-1, -1), alibi=None, softcap=0.0, scale=None,
              cu_seqlens=None, dout=None):
    """fp64 attention of [b, s, h, d] inputs: out [b, s, h, d], lse [b, h, s]; with dout also
    dq, dk, dv. Every row must see at least one key."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, s, h, d = q.shape
    hk = k.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    ok = _allowed(s, causal, window, cu_seqlens)
    dist = np.abs(np.arange(s)[:, None] - np.arange(s)[None, :])
    out = np.zeros_like(q)
    lse = np.zeros((b, h, s))
    grads = dout is not None
    if grads:
        dout = np.asarray(dout, dtype=np.float64)
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            qm, km, vm = q[bi, :, hi], k[bi, :, kh], v[bi, :, kh]
            raw = qm @ km.T * scale
            sc = softcap * np.tanh(raw / softcap) if softcap > 0 else raw
            if alibi is not None:
                sc = sc - alibi[hi] * dist
            sc = np.where(ok, sc, -np.inf)
            m = sc.max(axis=1, keepdims=True)
            l = m[:, 0] + np.log(np.exp(sc - m).sum(axis=1))
            p = np.exp(sc - l[:, None])
            out[bi, :, hi] = p @ vm
            lse[bi, hi] = l
            if grads:
                do = dout[bi, :, hi]
                dp = do @ vm.T
                ds = p * (dp - (do * out[bi, :, hi]).sum(axis=1, keepdims=True))
                if softcap > 0:
                    ds = ds * (1 - np.tanh(raw / softcap) ** 2)
                dq[bi, :, hi] = ds @ km * scale
                dk[bi, :, kh] += ds.T @ qm * scale
                dv[bi, :, kh] += p.T @ do
    if grads:
        return out, lse, dq, dk, dv
    return out, lse


def rel_l2(got, want):
    """||got - want|| / ||want||; the norm is floored at 1e-6 per element's root, so that an
    all-zero gradient (dq at seq 1) compares to its fp64 rounding noise as zero."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    floor = 1e-6 * np.sqrt(max(want.size, 1))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), floor))


# ---- inputs ----------------------------------------------------------------------------------
def bf16_round(x):
    """float32 values rounded to bf16 (nearest even), as float32: written here, not the
    package's conversion."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def quantize(x, wire):
    """x as the wire dtype holds it, in float32."""
    if wire == "fp32":
        return x.astype(np.float32)
    if wire == "fp16":
        return x.astype(np.float16).astype(np.float32)
    return bf16_round(x)


def inputs(seed, b, s, h, hk, d, wire, n=3):
    """n tensors [b, s, h or hk, d] (first one h heads, others hk), values exact in `wire`."""
    rng = np.random.default_rng(seed)
    shapes = [(b, s, h, d)] + [(b, s, hk, d)] * (n - 1)
    return [quantize(rng.standard_normal(shape).astype(np.float32), wire) for shape in shapes]


def as_numpy_dtype(x, wire):
    """A float32 array exact in `wire` as the numpy array of that dtype (bf16: ml_dtypes)."""
    if wire == "fp32":
        return x.astype(np.float32)
    if wire == "fp16":
        return x.astype(np.float16)
    import ml_dtypes
    return x.astype(ml_dtypes.bfloat16)


def as_torch(x, wire):
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[wire]
    return torch.from_numpy(np.ascontiguousarray(x)).to(dt)


def to_bshd(x, fmt):
    """A result in format `fmt` as float64 [b, s, h, d]."""
    x = to_float64(x)
    return x.transpose(0, 2, 1, 3) if fmt == "bhsd" else x


def to_float64(x):
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x).astype(np.float64)
