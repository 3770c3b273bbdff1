"""The caller's arrays and tensors to and from the wire's bytes.

Inputs are numpy arrays (float32, float16, ml_dtypes.bfloat16; float64 only with an explicit
wire dtype) or torch tensors (float32, float16, bfloat16; CPU or CUDA). The wire is row-major
[batch, seq, heads, head_dim] in fp32, fp16 or bf16 (lse: [batch, heads, seq] fp32); the caller's
tensors may be [batch, heads, seq, head_dim] ("bhsd") instead, transposed in the one copy each
tensor takes on its way. Results come back as the query came: numpy or torch, its dtype, its
device, its format, each in memory of its own.
"""
import sys
import warnings

import numpy as np

from . import _proto

WIRE_DTYPES = ("fp32", "fp16", "bf16")
FORMATS = ("bshd", "bhsd")
_ENUM = {w: _proto.enum_value("DType", "DTYPE_" + w.upper()) for w in WIRE_DTYPES}
_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}

try:
    import ml_dtypes as _ml_dtypes

    _NP_BF16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # bf16 numpy arrays then travel as float32 rounded to bf16 bits here
    _NP_BF16 = None


def wire_enum(wire):
    return _ENUM[wire]


def wire_itemsize(wire):
    return _ITEMSIZE[wire]


def _torch():
    return sys.modules.get("torch")


def is_torch(x):
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def f32_to_bf16_bits(a):
    """float32 values -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    bits = rounded.astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        bits[nan] = 0x7FC0
    return bits


def bf16_bits_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _numpy_wire(dtype):
    if dtype == np.float32:
        return "fp32"
    if dtype == np.float16:
        return "fp16"
    if dtype.name == "bfloat16":
        return "bf16"
    return None


def _torch_wire(dtype):
    torch = _torch()
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)


def _torch_dtype(wire):
    torch = _torch()
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[wire]


def natural_wire(x, name):
    """The wire dtype of x's own dtype; TypeError when it has none."""
    if is_torch(x):
        wire = _torch_wire(x.dtype)
    elif isinstance(x, np.ndarray):
        wire = _numpy_wire(x.dtype)
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if wire is None:
        raise TypeError(f"{name}.dtype {x.dtype} is not served (float32, float16, bfloat16); "
                        "pass dtype='fp32', 'fp16' or 'bf16' to convert")
    return wire


class Operand:
    """One input: its wire dtype and shape, and its bytes written into a buffer or returned."""

    def __init__(self, x, name, wire, fmt="bshd", lse=False):
        self.name = name
        self.wire = wire
        if is_torch(x):
            t = x.detach()
            if t.dim() != (3 if lse else 4):
                raise ValueError(f"{name} must be {3 if lse else 4}-D, got shape {tuple(t.shape)}")
            if fmt == "bhsd" and not lse:
                t = t.transpose(1, 2)
            self._torch = t
            self.shape = tuple(int(d) for d in t.shape)
        else:
            a = np.asarray(x)
            if a.ndim != (3 if lse else 4):
                raise ValueError(f"{name} must be {3 if lse else 4}-D, got shape {a.shape}")
            if fmt == "bhsd" and not lse:
                a = a.transpose(0, 2, 1, 3)
            self._torch = None
            self._numpy = a
            self.shape = tuple(int(d) for d in a.shape)
        self.nbytes = _ITEMSIZE[wire] * int(np.prod(self.shape, dtype=np.int64))

    def cuda_tensor(self):
        """The input as a contiguous tensor of its wire dtype on its GPU (a copy on that GPU when
        the dtype or layout differ), or None when it is not on a GPU."""
        t = self._torch
        if t is None or t.device.type != "cuda":
            return None
        return t.to(dtype=_torch_dtype(self.wire)).contiguous()

    def write_into(self, dst):
        """Writes the wire bytes into dst, a writable contiguous uint8 numpy array of nbytes."""
        if self._torch is not None:
            torch = _torch()
            out = torch.from_numpy(dst).view(_torch_dtype(self.wire)).view(self.shape)
            out.copy_(self._torch)
            return
        a = self._numpy
        if self.wire == "bf16" and _NP_BF16 is None:
            dst.view(np.uint16).reshape(self.shape)[...] = f32_to_bf16_bits(a.astype(np.float32))
            return
        np_wire = {"fp32": np.float32, "fp16": np.float16, "bf16": _NP_BF16}[self.wire]
        np.copyto(dst.view(np_wire).reshape(self.shape), a, casting="unsafe")

    def wire_view(self):
        """The wire bytes, bytes-like: a view of the input where it already holds them (on the
        CPU, contiguous, in the wire's dtype), else a copy made once."""
        if self._torch is not None:
            t = self._torch.to(device="cpu", dtype=_torch_dtype(self.wire)).contiguous()
            return memoryview(t.view(-1).view(_torch().uint8).numpy())
        a = self._numpy
        if _numpy_wire(a.dtype) == self.wire and a.flags.c_contiguous:
            return memoryview(a.reshape(-1).view(np.uint8))
        buf = np.empty(self.nbytes, dtype=np.uint8)
        self.write_into(buf)
        return memoryview(buf)

    def to_bytes(self):
        """The wire bytes, as bytes."""
        return bytes(self.wire_view())


def tensor_message(op, data=True):
    """A ringattn.v1.Tensor of `op`, with its bytes when `data`."""
    t = _proto.Tensor(dtype=_ENUM[op.wire], shape=op.shape)
    if data:
        t.data = op.to_bytes()
    return t


class Like:
    """Results made the way the query came: numpy or torch, dtype, device, format."""

    def __init__(self, q, fmt):
        self.fmt = fmt
        if is_torch(q):
            self.torch = True
            self.dtype = q.dtype
            self.device = q.device
        else:
            self.torch = False
            self.dtype = np.asarray(q).dtype

    def tensor(self, src, wire, shape, owned=False):
        """src: a uint8 numpy array (may be read-only) of the wire bytes of `shape` (bshd).
        `owned`: src is the caller's to give away (a buffer the client assembled for this call
        alone, never a shared-memory region it reuses): when the result wants its dtype and
        layout as they are, on the CPU, it is returned as a view of it, without a copy."""
        as_is = owned and self.fmt == "bshd"
        if self.torch:
            torch = _torch()
            with warnings.catch_warnings():  # a read-only source is only read from
                warnings.simplefilter("ignore", UserWarning)
                s = torch.from_numpy(src).view(_torch_dtype(wire)).view(shape)
            if as_is and s.dtype == self.dtype and self.device.type == "cpu":
                return s
            if self.fmt == "bhsd":
                s = s.transpose(1, 2)
            out = torch.empty(s.shape, dtype=self.dtype, device=self.device)
            out.copy_(s)
            return out
        if wire == "bf16" and _NP_BF16 is None:
            s = bf16_bits_to_f32(src.view(np.uint16)).reshape(shape)
        else:
            s = src.view({"fp32": np.float32, "fp16": np.float16, "bf16": _NP_BF16}[wire])
            s = s.reshape(shape)
        dtype = self.dtype if (self.dtype.kind == "f" or self.dtype.name == "bfloat16") else np.float32
        if as_is and s.dtype == dtype:
            return s
        if self.fmt == "bhsd":
            s = s.transpose(0, 2, 1, 3)
        out = np.empty(s.shape, dtype=dtype)
        np.copyto(out, s, casting="unsafe")
        return out

    def from_device(self, t):
        """A result written on the query's GPU (wire dtype, bshd) in the query's dtype and format."""
        if self.fmt == "bhsd" and t.dim() == 4:
            t = t.transpose(1, 2)
        return t.to(dtype=self.dtype) if t.dtype != self.dtype else t

    def lse(self, src, shape, owned=False):
        """fp32 [batch, heads, seq]: numpy float32, or a float32 tensor on the query's device
        (a view of an `owned` src, as in tensor())."""
        if self.torch:
            torch = _torch()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                s = torch.from_numpy(src).view(torch.float32).view(shape)
            if owned and self.device.type == "cpu":
                return s
            out = torch.empty(shape, dtype=torch.float32, device=self.device)
            out.copy_(s)
            return out
        s = src.view(np.float32).reshape(shape)
        return s if owned else s.copy()


def as_list(x, name):
    """A sequence, numpy array or tensor of numbers as a list (None: empty)."""
    if x is None:
        return []
    if is_torch(x):
        return x.detach().cpu().reshape(-1).tolist()
    return np.asarray(x).reshape(-1).tolist()
